r"""Which mesh, will it fit, how fast could it be: the planner's table for training a model (cpm_jax.planning).

  python experiments/plan.py --gin_file=models/cpm_large.gin --device=V100-32GB --devices=8 \
      --global_batch=3072 --seq_len=1024

Lists candidate layouts (data x fsdp x tensor x stage, pipeline microbatches, gradient accumulation) with each
device's GiB of params, gradients, optimizer state, activations and temporaries, whether they fit, TFLOPs and the
GB each device sends per step (ICI / DCN), the recommended layout first, then the gin bindings that select it in
experiments/train.py. Nothing is allocated: shapes only. --scaling=8,64,256 prints the recommended layout and
speed-up for each device count instead.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from cpm_jax import adapters, gin_setup, planning, programs
from cpm_jax.models import registry

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Model gin files (paths, or relative to gin_configs/), e.g. "
                                       "models/cpm_large.gin.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'CPMConfig.remat_policy = \"full\"'.")
_MODEL = flags.DEFINE_string("model", None, "The training model class (e.g. Seq2SeqModel, StructBertModel); default: "
                             "the first of the family the gin files configure.")
_DEVICE = flags.DEFINE_enum("device", "A100-80GB", sorted(planning.DEVICES), "The accelerator.")
_DEVICES = flags.DEFINE_integer("devices", 8, "How many accelerators.")
_HOSTS = flags.DEFINE_integer("hosts", None, "How many hosts they span (default: the device's usual per host).")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", None, "Sequences per step.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per sequence (the encoder's, for PLUG).", required=True)
_TARGET_LEN = flags.DEFINE_integer("target_len", 0, "Decoder tokens per sequence (PLUG's Seq2SeqModel; default: "
                                   "seq_len / 4).")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "full", "dots", "dots_no_batch"], "Override the config's "
                           "remat_policy.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Override the config's compute dtype.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "> 0: plan LoRA fine-tuning of this rank (cpm_jax.adapters) on a "
                                  "frozen base stored in --dtype (default bfloat16).")
_LIMIT = flags.DEFINE_integer("limit", 12, "Rows of the table.")
_SCALING = flags.DEFINE_list("scaling", [], "Device counts: print the recommended layout of each and its speed-up.")


def _model():
  gin_setup.parse(_GIN_FILES.value, _GIN_BINDINGS.value)
  family = registry.gin_bound_family() or registry.get(registry.DEFAULT)
  classes = {cls.__name__: cls for cls in family.training_models}
  name = _MODEL.value or family.training_models[0].__name__
  if name not in classes:
    raise gin_setup.ConfigError(f"--model={name!r} is none of the {family.name} family's {sorted(classes)}.")
  config = family.config_class()
  overrides = {"remat_policy": _REMAT.value, "dtype": _DTYPE.value or ("bfloat16" if _LORA_RANK.value else None)}
  config = dataclasses.replace(config, **{key: value for key, value in overrides.items() if value is not None})
  model = classes[name](config=config)
  if _LORA_RANK.value:
    model = adapters.AdaptedModel(model, lora=adapters.LoraConfig(rank=_LORA_RANK.value), base_dtype=config.dtype)
  return model


def main(argv):
  del argv
  model = _model()
  sizes = dict(global_batch=_GLOBAL_BATCH.value, seq_len=_SEQ_LEN.value, target_len=_TARGET_LEN.value)
  if _SCALING.value:
    print(planning.scaling_table(model, _DEVICE.value, [int(count) for count in _SCALING.value], **sizes))
    return
  print(planning.plan_table(model, _DEVICE.value, _DEVICES.value, hosts=_HOSTS.value, limit=_LIMIT.value, **sizes))


if __name__ == "__main__":
  programs.run(main)
