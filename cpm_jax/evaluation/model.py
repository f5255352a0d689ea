"""Loading a checkpoint of any model family and putting it behind its family's evaluation adapter.

`load_checkpoint(path)` reads a params-only checkpoint (`checkpointing.save_params` / convert_checkpoint.py:
metadata.json records the model family, its config and the tokenizer path) or the latest checkpoint of a
training workdir (train.py writes the same record to model.json), onto any mesh. `language_model` wraps it with
the family's adapter (for text families a cpm_jax.evaluation.interface.LanguageModel).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from cpm_jax import checkpointing, partitioning
from cpm_jax.models import registry
from cpm_jax.models.family import Family


@dataclasses.dataclass
class Checkpoint:
  """A model's params (sharded as its family's logical axes say), config and recorded metadata."""

  family: Family
  params: dict
  config: Any
  metadata: dict  # the record: "model", "model_config", "tokenizer", for classifiers "labels", ...


def param_shardings(family: Family, config: Any, mesh: jax.sharding.Mesh | None, stored=None) -> Any:
  """NamedShardings of the family's params on `mesh` (None: the first local device); `stored`: the (abstract, axes)
  a checkpoint stores instead (Family.stored_params)."""
  if mesh is None:
    return None
  abstract, axes = stored or (family.abstract_params(config), family.logical_axes(config))
  return partitioning.tree_shardings(axes, mesh, abstract)


def load_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                    serving: tuple[str, str] | None = None) -> Checkpoint:
  """A params-only checkpoint or the latest checkpoint of a training workdir, read into shardings on `mesh`.
  serving: (kind, what needs it), e.g. ("text", "generate.py"): a model whose family serves another kind of task
  (Family.serves) is a ValueError saying so, before its params are read."""
  meta, where = checkpointing.read_record(path)
  family, config = registry.from_record(meta, where)
  if serving is not None and family.serves != serving[0]:
    raise ValueError(f"{where}: holds a {family.name!r} model, which serves {family.serves} tasks; {serving[1]} "
                     f"needs a model that serves {serving[0]} tasks.")
  abstract, axes, restored = family.stored_params(config, meta, where)  # int8 checkpoints: dequantised here
  params = checkpointing.restore_any_params(path, abstract, param_shardings(family, config, mesh, (abstract, axes)))
  return Checkpoint(family, restored(params), config, meta)


def untrained_params(checkpoint: Checkpoint, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> dict:
  """Freshly initialised params of the checkpoint's model (the chance baseline of an evaluation), on `mesh`."""
  family, config = checkpoint.family, checkpoint.config
  init = jax.jit(lambda key: family.init(config, key), out_shardings=param_shardings(family, config, mesh))
  return init(jax.random.key(seed))


def load_tokenizer(checkpoint: Checkpoint, path: str | None = None) -> Any:
  """The family's tokenizer at `path`, else at the path the checkpoint records."""
  path = path or checkpoint.metadata.get("tokenizer")
  if not path:
    raise ValueError("The checkpoint records no tokenizer path; pass --tokenizer.")
  return checkpoint.family.tokenizer(os.path.expanduser(path))


def language_model(checkpoint: Checkpoint, tokenizer: Any, params: dict | None = None, **options) -> Any:
  """The checkpoint's model (or `params` of its shape) behind its family's adapter; options: batch_size,
  decoding_config, mesh, strict, progress, weights (default: int8 for an int8 checkpoint, else the params as
  stored), long_text."""
  params = checkpoint.params if params is None else params
  if options.get("weights") is None:
    options["weights"] = checkpoint.metadata.get("weights")
  return checkpoint.family.language_model(params, checkpoint.config, tokenizer, checkpoint.metadata, **options)
