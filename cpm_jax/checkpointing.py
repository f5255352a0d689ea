"""Orbax checkpoints: params-only exports, the training checkpoint manager, preemption.

Two layouts, both readable on any mesh (each array is read straight into its target sharding):
- params-only (`save_params` / `restore_params`): `<dir>/params` (an Orbax pytree) + `<dir>/metadata.json`
  (model config, tokenizer path, ...). Written by the converters and for fine-tuning starts.
- training (`Checkpointer`): `<workdir>/<step>/state` (params, optimizer, step, rng, ...) and
  `<workdir>/<step>/data/process_<i>-of-<n>.json` (each process's data-iterator state).
Every write goes to a temporary path renamed when complete, so an interrupted save is never restored.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PARAMS_DIR = "params"
METADATA_FILE = "metadata.json"


# ---- tree checks -------------------------------------------------------------------------------

def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """Shape as stored by Orbax: typed PRNG keys are stored as their raw key data."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(leaf.shape)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  return {_path_name(path): _stored_shape(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_tree_matches(expected: Any, stored: Any, where: str) -> None:
  """Raises ValueError naming the first parameter path whose presence or shape differs.

  `expected` is the configured tree (arrays or ShapeDtypeStructs); `stored` the checkpoint's metadata tree.
  """
  want, have = _shapes_by_path(expected), _shapes_by_path(stored)
  for name, shape in want.items():
    if name not in have:
      raise ValueError(f"{where}: parameter {name!r} (shape {shape} in the configured model) is missing from "
                       f"the checkpoint, which holds {len(have)} arrays (e.g. {sorted(have)[:3]}).")
    if have[name] != shape:
      raise ValueError(f"{where}: parameter {name!r} has shape {have[name]} in the checkpoint but {shape} in "
                       "the configured model.")
  extra = [name for name in have if name not in want]
  if extra:
    raise ValueError(f"{where}: the checkpoint holds parameter {extra[0]!r} (shape {have[extra[0]]}) that the "
                     f"configured model lacks ({len(extra)} such arrays).")


def _restore_target(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the sharding each array is read into (default: the first local device)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if shardings is None:
    shardings = jax.tree.map(lambda leaf: getattr(leaf, "sharding", None) or default, abstract)
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract, shardings)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---- params-only checkpoints -------------------------------------------------------------------

def save_params(directory: epath.PathLike, params: Any, metadata: dict) -> epath.Path:
  """Writes `params` (Orbax) and `metadata` (JSON) to `directory`, atomically; call on every process.

  The files are written under `<directory>.incomplete` and renamed once complete.
  """
  directory = epath.Path(directory)
  try:
    metadata_text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False)
  except TypeError as e:
    raise TypeError(f"save_params({directory}): metadata must be JSON-serialisable: {e}") from e
  if directory.exists():
    raise FileExistsError(f"save_params: {directory} already exists; remove it or choose another path.")
  incomplete = directory.parent / f"{directory.name}.incomplete"
  if jax.process_index() == 0:
    if incomplete.exists():
      incomplete.rmtree()
    incomplete.mkdir(parents=True)
  _sync("cpm_jax_save_params_start")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(incomplete / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (incomplete / METADATA_FILE).write_text(metadata_text)
    incomplete.rename(directory)
  _sync("cpm_jax_save_params_done")
  return directory


def read_metadata(directory: epath.PathLike) -> dict:
  """The metadata dict that `save_params` wrote beside the params."""
  path = epath.Path(directory) / METADATA_FILE
  if not path.exists():
    raise FileNotFoundError(f"No params checkpoint at {directory}: {path} is missing (save_params writes "
                            f"{PARAMS_DIR}/ and {METADATA_FILE}).")
  return json.loads(path.read_text())


def restore_params(directory: epath.PathLike, abstract_params: Any = None,
                   shardings: Any = None) -> tuple[Any, dict]:
  """Reads a `save_params` checkpoint: returns (params, metadata).

  With `abstract_params` (ShapeDtypeStructs, e.g. `cpm.abstract_params(config)`) the stored tree must match it
  path for path and shape for shape (ValueError naming the first difference); dtypes are cast to it.
  Each array is read directly into its sharding from `shardings` (default: the first local device).
  """
  directory = epath.Path(directory)
  metadata = read_metadata(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(directory / PARAMS_DIR).item_metadata.tree
    if abstract_params is None:
      abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
    else:
      check_tree_matches(abstract_params, stored, f"params checkpoint {directory}")
    params = checkpointer.restore(directory / PARAMS_DIR, _restore_target(abstract_params, shardings))
  return params, metadata
