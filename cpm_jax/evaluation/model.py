"""Loading a checkpoint of either model family and putting it behind the LanguageModel interface.

`load_checkpoint(path)` reads a params-only checkpoint (`checkpointing.save_params` / convert_checkpoint.py:
metadata.json records the model family, its config and the tokenizer path) or the latest checkpoint of a
training workdir (train.py writes the same record to model.json), onto any mesh. `language_model` wraps it:
CPM-LM scores and generates; PLUG generates with its decoder and classifies with its [CLS] head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any

import jax
from etils import epath

from cpm_jax import checkpointing, decoding, partitioning
from cpm_jax.evaluation import plug_model, scoring
from cpm_jax.evaluation.interface import LanguageModel
from cpm_jax.models import cpm, families
from cpm_jax.tokenization import BertTokenizer, CPMTokenizer


@dataclasses.dataclass
class Checkpoint:
  """A model's params (sharded as its family's logical axes say), config and recorded metadata."""

  family: families.Family
  params: dict
  config: Any
  metadata: dict  # the record: "model", "model_config", "tokenizer", for classifiers "labels", ...


def param_shardings(family: families.Family, config: Any, mesh: jax.sharding.Mesh | None) -> Any:
  """NamedShardings of the family's params on `mesh` (None: the first local device)."""
  if mesh is None:
    return None
  return partitioning.tree_shardings(family.logical_axes(config), mesh, family.abstract_params(config))


def load_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> Checkpoint:
  """A params-only checkpoint or the latest checkpoint of a training workdir, read into shardings on `mesh`."""
  path = epath.Path(path)
  if (path / checkpointing.METADATA_FILE).exists():
    where = path / checkpointing.METADATA_FILE
    meta = checkpointing.read_metadata(path)
  elif (path / "checkpoints").is_dir():
    where = path / checkpointing.MODEL_RECORD
    if not where.exists():
      raise FileNotFoundError(f"Training workdir {path} has no {checkpointing.MODEL_RECORD} (train.py writes it at "
                              "start) to say which model its checkpoints hold.")
    meta = json.loads(where.read_text())
  else:
    raise FileNotFoundError(f"--checkpoint {path}: neither a params-only checkpoint ({checkpointing.METADATA_FILE}) "
                            "nor a training workdir (checkpoints/).")
  family, config = families.from_record(meta, str(where))
  params = checkpointing.restore_any_params(path, family.abstract_params(config),
                                            param_shardings(family, config, mesh))
  return Checkpoint(family, params, config, meta)


def untrained_params(config: Any, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> dict:
  """Freshly initialised params of `config` (the chance baseline of an evaluation), sharded over `mesh`."""
  family = families.of_config(config)
  init = jax.jit(lambda key: family.init(config, key), out_shardings=param_shardings(family, config, mesh))
  return init(jax.random.key(seed))


def load_tokenizer(checkpoint: Checkpoint, path: str | None = None) -> CPMTokenizer | BertTokenizer:
  """The tokenizer at `path`, else at the path the checkpoint records (SentencePiece for CPM, vocab.txt for PLUG)."""
  path = path or checkpoint.metadata.get("tokenizer")
  if not path:
    raise ValueError("The checkpoint records no tokenizer path; pass --tokenizer.")
  tokenizer_class = CPMTokenizer if checkpoint.family.name == "cpm" else BertTokenizer
  return tokenizer_class(os.path.expanduser(path))


def cpm_language_model(params: dict, config: cpm.CPMConfig, tokenizer: Any, *, batch_size: int = 8,
                       decoding_config: decoding.DecodingConfig | None = None, mesh=None, strict: bool = False,
                       progress: bool = False) -> LanguageModel:
  """CPM-LM behind the LanguageModel interface (greedy decoding of 64 tokens unless told otherwise)."""
  score_fn = scoring.cpm_score_fn(config)
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)

  def score(requests, names=None):
    with partitioning.activate(mesh) if mesh is not None else contextlib.nullcontext():
      return scoring.score_requests(score_fn, params, requests, max_length=config.max_positions,
                                    batch_size=batch_size, pad_id=tokenizer.pad_id, strict=strict,
                                    progress=progress, names=names)

  decoding_params = functools.cache(lambda: cpm.decode_layout(params))  # one copy for every generate call

  def generate(prompts):
    return decoding.generate(decoding_params(), prompts, config, decoding_config, eod_id=tokenizer.eod_id,
                             pad_id=tokenizer.pad_id, batch_size=batch_size, strict=strict, mesh=mesh,
                             progress=progress)

  return LanguageModel(tokenizer, score, generate)


def language_model(checkpoint: Checkpoint, tokenizer: Any, params: dict | None = None, **options) -> LanguageModel:
  """The checkpoint's model (or `params` of its shape) behind the LanguageModel interface; options as
  cpm_language_model's (batch_size, decoding_config, mesh, strict, progress)."""
  params = checkpoint.params if params is None else params
  if checkpoint.family.name == "cpm":
    return cpm_language_model(params, checkpoint.config, tokenizer, **options)
  return plug_model.plug_language_model(params, checkpoint.config, tokenizer,
                                        labels=checkpoint.metadata.get("labels", ()), **options)
