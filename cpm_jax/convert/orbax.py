"""cpm_jax's own params-only Orbax checkpoints (`checkpointing.save_params` + the family record), for any family.

The registry gives every family this format as "orbax"; it reads the stored config from metadata.json (a training
workdir's model.json), checks a given (gin) config against it field by field, and reads the arrays one at a time,
each straight into its sharding on a mesh (a whole-tree restore stages the checkpoint on the host first: ~0.8x its
size more at the peak).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpm_jax import checkpointing, partitioning
from cpm_jax.convert.common import ConversionError, Loaded, flatten, unflatten


def check_config(given: Any, stored: Any, where: str) -> None:
  """Raises a ConversionError naming every field (other than the config's execution options) where a given model
  config disagrees with the one a checkpoint stores."""
  mismatched = [f"{field.name}: checkpoint {getattr(stored, field.name)!r}, given {getattr(given, field.name)!r}"
                for field in dataclasses.fields(given)
                if field.name not in given.execution_fields and getattr(given, field.name) != getattr(stored,
                                                                                                      field.name)]
  if mismatched:
    raise ConversionError(f"{where} does not match the given {type(given).__name__}: {'; '.join(mismatched)}.")


def load_orbax(family: Any, path: str | os.PathLike, *, config: Any = None, dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None) -> Loaded:
  """Params written by `save_orbax` for `family` (a registry.Family), or those of the latest checkpoint of a
  training workdir (its model.json names the model), read straight into their shardings on `mesh` (without one:
  numpy host arrays). `config` (e.g. from gin) must match the stored one in every structural field; its execution
  options (dtype, remat, ...) are used. dtype: of the params (default: the stored ones')."""
  try:
    meta, where = checkpointing.read_record(path)
    stored = family.config_from_record(meta, where)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from e
  if config is not None:
    check_config(config, stored, where)
  config = dataclasses.replace(config or stored, param_dtype=dtype or stored.param_dtype)
  abstract, axes, restored = family.stored_params(config, meta, where)  # int8 checkpoints: dequantised here
  shardings = None if mesh is None else partitioning.tree_shardings(axes, mesh, abstract)
  try:
    params = restore_by_array(path, abstract, shardings)
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from e
  return Loaded(restored(params), config, [], {k: v for k, v in meta.items() if k != "weights"})


def restore_by_array(path: str | os.PathLike, abstract: dict, shardings: dict | None = None) -> dict:
  """The params of a params-only checkpoint or of a training workdir's latest checkpoint (checkpointing.stored_params),
  checked against `abstract` (path for path, shape for shape, cast to its dtypes) and read one array at a time, the
  largest first: into its sharding in `shardings`, or without them as numpy host arrays (what the other formats'
  loaders give without a mesh)."""
  source = checkpointing.stored_params(path)
  checkpointing.check_tree_matches(abstract, source.tree, source.where)
  flat_shardings = flatten(shardings) if shardings is not None else None
  params = {}
  for name, leaf in sorted(flatten(abstract).items(), key=lambda item: -math.prod(item[1].shape)):
    if flat_shardings is None:
      restored = source.read(unflatten({name: leaf}),
                             unflatten({name: ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)}))
    else:
      restored = source.read(unflatten({name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                   sharding=flat_shardings[name])}))
    params[name] = flatten(restored)[name]
  return unflatten(params)


def save_orbax(family: Any, params: dict, config: Any, path: str | os.PathLike, **extra_metadata) -> pathlib.Path:
  """A params-only Orbax checkpoint (atomic) whose metadata records `family` and `config` (and `extra_metadata`,
  e.g. the tokenizer path), as train / evaluate / generate read it."""
  return pathlib.Path(checkpointing.save_params(path, params, family.record(config, **extra_metadata)))
