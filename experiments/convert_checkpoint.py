r"""Converts CPM-LM and PLUG checkpoints between model-parallel shards, Hugging Face and cpm_jax's Orbax layout.

The released model-parallel shards -> an Orbax checkpoint that train / evaluate / generate load:
  python experiments/convert_checkpoint.py --from=megatron --input=/data/CPM-large --output=/ckpt/cpm_large \
      --gin_file=gin_configs/models/cpm_large.gin --tokenizer=../shared/vocab/cpm/chinese_vocab.model
The Hugging Face upload (GPT2LMHeadModel) -> Orbax:  --from=hf --input=/data/CPM-Generate --output=...
Orbax -> Hugging Face / Megatron at any MP degree:    --to=hf ... | --to=megatron --mp=4 ...
Orbax -> Orbax on another mesh:                       --mesh_fsdp=... --mesh_tensor=...
A training workdir (its latest checkpoint's params) -> any of these:  --input=WORKDIR (--from=orbax)
Any -> an int8 Orbax checkpoint for serving (weight-only, a scale per output channel; evaluate / generate serve it
as int8 and read its dequantised floats for anything else):  --weights=int8 (bfloat16: --dtype=bfloat16)
PLUG (--model=plug; the model is read from an Orbax input's metadata, and a gin PlugConfig implies it):
  PLUG's 8-way DeepSpeed release -> Orbax:  --model=plug --from=megatron --input=/data/PLUG --output=...
      --tokenizer=../shared/vocab/plug/vocab.txt      (the shapes are checked against PLUG 27B or a gin PlugConfig)
  Orbax -> DeepSpeed shards at any rank count:       --to=megatron --mp=8 ...
  Hugging Face BertForMaskedLM (post-LN) -> encoder:  --model=plug --from=hf --gin_file=models/structbert_large.gin
The output must not exist yet; it appears only once complete. Errors name the file and key and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags

from cpm_jax import checkpointing, gin_setup, partitioning, programs, serving_weights
from cpm_jax.models import registry

FORMATS = sorted({name for family in registry.FAMILIES for name in registry.formats(family)})
_MODEL = flags.DEFINE_enum("model", None, sorted(registry.FAMILIES), "Model family (default: an Orbax input's "
                           "metadata, else the family whose config the gin files bind, else cpm).")
_FROM = flags.DEFINE_enum("from", "orbax", FORMATS, "Format of --input (megatron: mp_rank_XX_model_states.pt "
                          "shards, CPM's Megatron and PLUG's DeepSpeed release; hf: GPT-2 for CPM, BERT for PLUG).")
_TO = flags.DEFINE_enum("to", "orbax", FORMATS, "Format of --output.")
_INPUT = flags.DEFINE_string("input", None, "Checkpoint directory to read (--from=orbax: a params-only checkpoint "
                             "or a training workdir, whose latest checkpoint is read).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write (must not exist).", required=True)
_MP = flags.DEFINE_integer("mp", 1, "--to=megatron: number of model-parallel ranks to split into.")
_TAG = flags.DEFINE_string("tag", None, "--from=megatron: iteration/tag directory to read (default: the one named "
                           "by latest_checkpointed_iteration.txt or latest).")
_OUTPUT_TAG = flags.DEFINE_string("output_tag", "release", "--to=megatron: iteration/tag directory to write.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Attention heads; Megatron shards do not record them (default: "
                                  "the gin model config, else the released CPM size with this hidden size).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype written, e.g. float32, bfloat16 (default: the input's).")
_WEIGHTS = flags.DEFINE_enum("weights", None, ["int8"], "--to=orbax: store the weights int8 serving quantises "
                              "(serving_weights, per output channel) as int8 with their scales.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "--to=orbax: tokenizer to record in the metadata (CPM: "
                                 "SentencePiece model; PLUG: vocab.txt).")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "Let torch files hold arbitrary Python objects (unsafe: "
                                  "only for files you trust).")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files (paths, or relative to gin_configs/): a model "
                                       "config (CPMConfig / PlugConfig) the checkpoint must match, a MeshConfig for "
                                       "the Orbax output's sharding.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'MeshConfig.tensor = 2'.")
_MESH = {axis: flags.DEFINE_integer(f"mesh_{axis}", None, f"--to=orbax: size of mesh axis '{axis}' (-1 = the rest; "
                                    "default: gin MeshConfig).") for axis in partitioning.MESH_AXES}
# The format options each flag sets (convert.common.Format.load_options / save_options).
_LOAD_OPTIONS = {"num_heads": _NUM_HEADS, "tag": _TAG, "trust_pickle": _TRUST_PICKLE}
_SAVE_OPTIONS = {"num_ranks": _MP, "tag": _OUTPUT_TAG}


def model_family(source: str) -> registry.Family:
  """--model, else what an Orbax input's metadata names, else the family whose config gin binds, else cpm."""
  if source == "orbax":
    stored = checkpointing.read_record(_INPUT.value)[0].get("model")
    if _MODEL.value and stored and stored != _MODEL.value:
      raise app.UsageError(f"--model={_MODEL.value} but {_INPUT.value} holds a {stored!r} checkpoint.")
    if stored in registry.FAMILIES:
      return registry.FAMILIES[stored]
  if _MODEL.value:
    return registry.FAMILIES[_MODEL.value]
  return registry.gin_bound_family() or registry.FAMILIES[registry.DEFAULT]


def _options(flag_of: dict[str, flags.FlagHolder], accepted: tuple[str, ...], where: str) -> dict:
  """The options the format accepts, from their flags; a flag given for an option it does not take is an error."""
  for option, flag in flag_of.items():
    if option not in accepted and flag.present:
      raise app.UsageError(f"--{flag.name} does not apply to {where}.")
  return {option: flag_of[option].value for option in accepted}


def gin_model_config(family: registry.Family):
  """The family's config from gin when gin binds any of its fields (a config to check against), else None."""
  return family.config_class() if registry.gin_bound_family() is family else None


def main(argv: list[str]) -> None:
  del argv
  programs.require_existing(_INPUT)
  if os.path.exists(_OUTPUT.value):  # before any shard is read
    raise FileExistsError(f"--output={_OUTPUT.value} already exists; remove it or choose another path.")
  gin_setup.parse(_GIN_FILES.value, _GIN_BINDINGS.value)
  source, target = _FROM.value, _TO.value
  family = model_family(source)
  formats = registry.formats(family.name)
  for name, direction, side in (("--from", source, "load"), ("--to", target, "save")):
    if direction not in formats or getattr(formats[direction], side) is None:
      available = sorted(f for f, fmt in formats.items() if getattr(fmt, side) is not None)
      raise app.UsageError(f"{name}={direction} is not available for {family.name} checkpoints (it takes "
                           f"{', '.join(available)}).")
  reader, writer = formats[source], formats[target]
  options = {"config": gin_model_config(family), "dtype": _DTYPE.value,
             **_options(_LOAD_OPTIONS, reader.load_options, f"--from={source} for {family.name}")}
  save_options = _options(_SAVE_OPTIONS, writer.save_options, f"--to={target} for {family.name}")
  if reader.needs_config and options["config"] is None:
    raise app.UsageError(f"--from={source} for {family.name} needs the model's config from gin (the weights do not "
                         "fix it), e.g. --gin_file=models/structbert_large.gin.")
  if _WEIGHTS.value and target != "orbax":
    raise app.UsageError("--weights applies only to --to=orbax.")
  if _WEIGHTS.value and family.quantized is None:
    raise app.UsageError(f"--weights=int8: family {family.name} has no int8 weights.")
  if _TOKENIZER.present and target != "orbax":
    raise app.UsageError("--tokenizer applies only to --to=orbax.")
  for flag in _MESH.values():
    if flag.present and target != "orbax":
      raise app.UsageError(f"--{flag.name} applies only to --to=orbax.")
  if target == "orbax":
    sizes = {axis: flag.value for axis, flag in _MESH.items() if flag.value is not None}
    options["mesh"] = partitioning.make_mesh(dataclasses.replace(partitioning.MeshConfig(), **sizes))
  loaded = reader.load(_INPUT.value, **options)
  for note in loaded.notes:
    print(note)
  if target == "orbax":
    metadata = {key: value for key, value in loaded.metadata.items() if key not in ("model", "model_config")}
    metadata["converted_from"] = {"format": source, "path": _INPUT.value}
    if _TOKENIZER.value:
      metadata["tokenizer"] = _TOKENIZER.value
    save_options.update(metadata)
  params = loaded.params
  if _WEIGHTS.value:
    params = serving_weights.to_checkpoint(params, family.quantized)
    save_options["weights"] = _WEIGHTS.value
  output = writer.save(params, loaded.config, _OUTPUT.value, **save_options)
  print(f"Wrote {output} ({family.name}, {target}) from {_INPUT.value} ({source}): {loaded.config}")


if __name__ == "__main__":
  programs.run(main)
