r"""Converts CPM-LM checkpoints between Megatron/DeepSpeed shards, Hugging Face GPT-2 and cpm_jax's Orbax layout.

The released model-parallel shards -> an Orbax checkpoint that train / evaluate / generate load:
  python experiments/convert_checkpoint.py --from=megatron --input=/data/CPM-large --output=/ckpt/cpm_large \
      --gin_file=gin_configs/models/cpm_large.gin --tokenizer=../shared/vocab/cpm/chinese_vocab.model
The Hugging Face upload (GPT2LMHeadModel) -> Orbax:  --from=hf --input=/data/CPM-Generate --output=...
Orbax -> Hugging Face / Megatron at any MP degree:    --to=hf ... | --to=megatron --mp=4 ...
Orbax -> Orbax on another mesh:                       --mesh_fsdp=... --mesh_tensor=...
The output must not exist yet; it appears only once complete. Errors name the file and key and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import sys

import gin
from absl import app, flags

from cpm_jax import convert, partitioning
from cpm_jax.models import cpm

FORMATS = sorted(convert.LOADERS)
_FROM = flags.DEFINE_enum("from", "orbax", FORMATS, "Format of --input.")
_TO = flags.DEFINE_enum("to", "orbax", FORMATS, "Format of --output.")
_INPUT = flags.DEFINE_string("input", None, "Checkpoint directory to read.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write (must not exist).", required=True)
_MP = flags.DEFINE_integer("mp", 1, "--to=megatron: number of model-parallel ranks to split into.")
_TAG = flags.DEFINE_string("tag", None, "--from=megatron: iteration/tag directory to read (default: the one named "
                           "by latest_checkpointed_iteration.txt or latest).")
_OUTPUT_TAG = flags.DEFINE_string("output_tag", "release", "--to=megatron: iteration/tag directory to write.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads; Megatron shards do not record them (default: "
                                  "the gin model config, else the released CPM size with this hidden size).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype written, e.g. float32, bfloat16 (default: the input's).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "--to=orbax: tokenizer model path to record in the metadata.")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "Let torch files hold arbitrary Python objects (unsafe: "
                                  "only for files you trust).")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files: a model config (CPMConfig) the checkpoint must "
                                       "match, a MeshConfig for the Orbax output's sharding.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'MeshConfig.tensor = 2'.")
_MESH = {axis: flags.DEFINE_integer(f"mesh_{axis}", None, f"--to=orbax: size of mesh axis '{axis}' (-1 = the rest; "
                                    "default: gin MeshConfig).") for axis in partitioning.MESH_AXES}


def gin_model_config() -> cpm.CPMConfig | None:
  """CPMConfig() when gin binds any of its fields (a model config to check against), else None."""
  for field in dataclasses.fields(cpm.CPMConfig):
    try:
      gin.query_parameter(f"CPMConfig.{field.name}")
    except ValueError:
      continue
    return cpm.CPMConfig()
  return None


def _refuse(flag: flags.FlagHolder, applies: bool, when: str) -> None:
  if not applies and flag.present:
    raise app.UsageError(f"--{flag.name} applies only {when}.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gin.parse_config_files_and_bindings(_GIN_FILES.value, _GIN_BINDINGS.value)
  source, target = _FROM.value, _TO.value
  _refuse(_NUM_HEADS, source != "orbax", "to --from=hf or --from=megatron")
  _refuse(_TRUST_PICKLE, source != "orbax", "to --from=hf or --from=megatron")
  _refuse(_TAG, source == "megatron", "to --from=megatron")
  _refuse(_MP, target == "megatron", "to --to=megatron")
  _refuse(_OUTPUT_TAG, target == "megatron", "to --to=megatron")
  _refuse(_TOKENIZER, target == "orbax", "to --to=orbax")
  for flag in _MESH.values():
    _refuse(flag, target == "orbax", "to --to=orbax")

  options = {"config": gin_model_config(), "dtype": _DTYPE.value}
  if target == "orbax":
    sizes = {axis: flag.value for axis, flag in _MESH.items() if flag.value is not None}
    options["mesh"] = partitioning.make_mesh(dataclasses.replace(partitioning.MeshConfig(), **sizes))
  if source != "orbax":
    options.update(num_heads=_NUM_HEADS.value, trust_pickle=_TRUST_PICKLE.value)
  if source == "megatron":
    options["tag"] = _TAG.value
  try:
    loaded = convert.LOADERS[source](_INPUT.value, **options)
    for note in loaded.notes:
      print(note)
    if target == "orbax":
      metadata = {key: value for key, value in loaded.metadata.items() if key not in ("model", "model_config")}
      metadata["converted_from"] = {"format": source, "path": _INPUT.value}
      if _TOKENIZER.value:
        metadata["tokenizer"] = _TOKENIZER.value
      output = convert.save_orbax(loaded.params, loaded.config, _OUTPUT.value, **metadata)
    elif target == "hf":
      output = convert.save_hf(loaded.params, loaded.config, _OUTPUT.value)
    else:
      output = convert.save_megatron(loaded.params, loaded.config, _OUTPUT.value, _MP.value, _OUTPUT_TAG.value)
  except (convert.ConversionError, FileExistsError) as e:
    sys.exit(f"convert_checkpoint: {e}")
  print(f"Wrote {output} ({target}) from {_INPUT.value} ({source}): {loaded.config}")


if __name__ == "__main__":
  app.run(main)
