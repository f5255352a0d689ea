r"""Converts CPM-LM and PLUG checkpoints between model-parallel shards, Hugging Face and cpm_jax's Orbax layout.

The released model-parallel shards -> an Orbax checkpoint that train / evaluate / generate load:
  python experiments/convert_checkpoint.py --from=megatron --input=/data/CPM-large --output=/ckpt/cpm_large \
      --gin_file=gin_configs/models/cpm_large.gin --tokenizer=../shared/vocab/cpm/chinese_vocab.model
The Hugging Face upload (GPT2LMHeadModel) -> Orbax:  --from=hf --input=/data/CPM-Generate --output=...
Orbax -> Hugging Face / Megatron at any MP degree:    --to=hf ... | --to=megatron --mp=4 ...
Orbax -> Orbax on another mesh:                       --mesh_fsdp=... --mesh_tensor=...
PLUG (--model=plug; the model is read from an Orbax input's metadata, and a gin PlugConfig implies it):
  PLUG's 8-way DeepSpeed release -> Orbax:  --model=plug --from=megatron --input=/data/PLUG --output=...
      --tokenizer=../shared/vocab/plug/vocab.txt      (the shapes are checked against PLUG 27B or a gin PlugConfig)
  Orbax -> DeepSpeed shards at any rank count:       --to=megatron --mp=8 ...
  Hugging Face BertForMaskedLM (post-LN) -> encoder:  --model=plug --from=hf --gin_file=models/structbert_large.gin
The output must not exist yet; it appears only once complete. Errors name the file and key and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import sys

import gin
from absl import app, flags

from cpm_jax import checkpointing, convert, partitioning
from cpm_jax.models import cpm, families, plug

FORMATS = sorted(convert.FORMATS["cpm"].loaders)
_MODEL = flags.DEFINE_enum("model", None, sorted(families.FAMILIES), "Model family (default: an Orbax input's "
                           "metadata, else plug if gin binds PlugConfig, else cpm).")
_FROM = flags.DEFINE_enum("from", "orbax", FORMATS, "Format of --input (megatron: mp_rank_XX_model_states.pt "
                          "shards, CPM's Megatron and PLUG's DeepSpeed release; hf: GPT-2 for CPM, BERT for PLUG).")
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
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "--to=orbax: tokenizer to record in the metadata (CPM: "
                                 "SentencePiece model; PLUG: vocab.txt).")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "Let torch files hold arbitrary Python objects (unsafe: "
                                  "only for files you trust).")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files: a model config (CPMConfig / PlugConfig) the "
                                       "checkpoint must match, a MeshConfig for the Orbax output's sharding.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'MeshConfig.tensor = 2'.")
_MESH = {axis: flags.DEFINE_integer(f"mesh_{axis}", None, f"--to=orbax: size of mesh axis '{axis}' (-1 = the rest; "
                                    "default: gin MeshConfig).") for axis in partitioning.MESH_AXES}


def gin_model_config(config_class: type) -> cpm.CPMConfig | plug.PlugConfig | None:
  """config_class() when gin binds any of its fields (a model config to check against), else None."""
  for field in dataclasses.fields(config_class):
    try:
      gin.query_parameter(f"{config_class.__name__}.{field.name}")
    except ValueError:
      continue
    return config_class()
  return None


def model_family(source: str) -> str:
  """--model, else what an Orbax input's metadata names, else plug if gin binds PlugConfig, else cpm."""
  if source == "orbax":
    try:
      stored = checkpointing.read_metadata(_INPUT.value).get("model")
    except FileNotFoundError as e:
      raise app.UsageError(str(e)) from e
    if _MODEL.value and stored and stored != _MODEL.value:
      raise app.UsageError(f"--model={_MODEL.value} but {_INPUT.value} holds a {stored!r} checkpoint.")
    if stored in families.FAMILIES:
      return stored
  if _MODEL.value:
    return _MODEL.value
  return "plug" if gin_model_config(plug.PlugConfig) else "cpm"


def _refuse(flag: flags.FlagHolder, applies: bool, when: str) -> None:
  if not applies and flag.present:
    raise app.UsageError(f"--{flag.name} applies only {when}.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gin.parse_config_files_and_bindings(_GIN_FILES.value, _GIN_BINDINGS.value)
  source, target = _FROM.value, _TO.value
  family = model_family(source)
  formats = convert.FORMATS[family]
  for name, direction, available in (("--from", source, formats.loaders), ("--to", target, formats.savers)):
    if direction not in available:
      raise app.UsageError(f"{name}={direction} is not available for {family} checkpoints (it takes "
                           f"{', '.join(sorted(available))}).")
  _refuse(_NUM_HEADS, source != "orbax" and family == "cpm", "to CPM with --from=hf or --from=megatron")
  _refuse(_TRUST_PICKLE, source != "orbax", "to --from=hf or --from=megatron")
  _refuse(_TAG, source == "megatron", "to --from=megatron")
  _refuse(_MP, target == "megatron", "to --to=megatron")
  _refuse(_OUTPUT_TAG, target == "megatron", "to --to=megatron")
  _refuse(_TOKENIZER, target == "orbax", "to --to=orbax")
  for flag in _MESH.values():
    _refuse(flag, target == "orbax", "to --to=orbax")

  options = {"config": gin_model_config(families.FAMILIES[family].config_class), "dtype": _DTYPE.value}
  if family == "plug" and source == "hf" and options["config"] is None:
    raise app.UsageError("--model=plug --from=hf needs the encoder's config: a gin PlugConfig with "
                         "encoder_pre_ln=False, e.g. --gin_file=models/structbert_large.gin.")
  if target == "orbax":
    sizes = {axis: flag.value for axis, flag in _MESH.items() if flag.value is not None}
    options["mesh"] = partitioning.make_mesh(dataclasses.replace(partitioning.MeshConfig(), **sizes))
  if source != "orbax":
    options["trust_pickle"] = _TRUST_PICKLE.value
  if source != "orbax" and family == "cpm":
    options["num_heads"] = _NUM_HEADS.value
  if source == "megatron":
    options["tag"] = _TAG.value
  try:
    loaded = formats.loaders[source](_INPUT.value, **options)
    for note in loaded.notes:
      print(note)
    if target == "orbax":
      metadata = {key: value for key, value in loaded.metadata.items() if key not in ("model", "model_config")}
      metadata["converted_from"] = {"format": source, "path": _INPUT.value}
      if _TOKENIZER.value:
        metadata["tokenizer"] = _TOKENIZER.value
      output = formats.savers["orbax"](loaded.params, loaded.config, _OUTPUT.value, **metadata)
    elif target == "hf":
      output = formats.savers["hf"](loaded.params, loaded.config, _OUTPUT.value)
    else:
      output = formats.savers["megatron"](loaded.params, loaded.config, _OUTPUT.value, _MP.value, _OUTPUT_TAG.value)
  except (convert.ConversionError, FileExistsError) as e:
    sys.exit(f"convert_checkpoint: {e}")
  print(f"Wrote {output} ({family}, {target}) from {_INPUT.value} ({source}): {loaded.config}")


if __name__ == "__main__":
  app.run(main)
