"""Orbax checkpoints: params-only exports, the training checkpoint manager, preemption.

Two layouts, both readable on any mesh (each array is read straight into its target sharding):
- params-only (`save_params` / `restore_params`): `<dir>/params` (an Orbax pytree) + `<dir>/metadata.json`
  (model config, tokenizer path, ...). Written by the converters and for fine-tuning starts.
- training (`Checkpointer`): `<directory>/<step>/state` (params, optimizer, step, rng, ...) and
  `<directory>/<step>/data/shard_<i>-of-<n>.json` (the iterator state of each data shard, restored on any process
  count that divides n: cpm_jax.data.processes.ShardedIterator).
Every write goes to a temporary path renamed when complete, so an interrupted save is never restored. Both layouts
record a checksum of every array (cpm_jax.checksums), checked whenever arrays are read (`verify=False` skips it):
files changed or damaged after the save are an error naming the array, never silently different weights.
Warm starts (`RestoreCheckpointConfig`, `warm_start`) read a chosen part of either layout's params into a new run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import threading
from typing import Any, Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from cpm_jax import checksums
from cpm_jax.checksums import CheckpointDamaged
from cpm_jax.gin_setup import ConfigError

PARAMS_DIR = "params"
METADATA_FILE = "metadata.json"
CHECKSUMS_FILE = "checksums.json"  # a params-only checkpoint's checksums.record of its params
MODEL_RECORD = "model.json"  # a training workdir's record of its model (registry.record), written by train_loop


# ---- tree checks -------------------------------------------------------------------------------

_path_name = checksums.path_name


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


# ---- reading arrays: storage errors in one line, checksums verified ----------------------------

_STATUS = re.compile(r"^([A-Z_]{4,}): (.*)$")  # how tensorstore's errors begin: "OUT_OF_RANGE: Error reading ..."
_ARRAY_KEY = re.compile(r'Error reading "([^"/]+)/')  # tensorstore names the array's key: "embed.wte/0.0"


def _storage_reason(error: BaseException) -> str | None:
  """One line saying why reading a checkpoint failed, from the storage error (tensorstore's, or a damaged JSON
  file) somewhere in `error`'s chain; None when the chain holds none (a bug: let it propagate as it is)."""
  seen = error
  while seen is not None:
    if isinstance(seen, json.JSONDecodeError):
      return f"a metadata file is damaged ({seen})."
    first_line = str(seen).strip().split("\n")[0]
    status = _STATUS.match(first_line)
    if status:
      code, detail = status.groups()
      array = _ARRAY_KEY.search(detail)
      what = f"array {array.group(1).replace('.', '/')!r}" if array else "an array"
      detail = detail.rsplit('": ', 1)[-1]
      return f"{what} cannot be read ({code}: {detail}): the checkpoint's files are truncated or damaged."
    seen = seen.__cause__ or seen.__context__
  return None


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
  """Turns storage errors raised while reading the checkpoint `where` into a one-line CheckpointDamaged."""
  try:
    yield
  except CheckpointDamaged:
    raise
  except Exception as e:  # Orbax wraps tensorstore's errors in a bare Exception
    reason = _storage_reason(e)
    if reason is None:
      raise
    raise CheckpointDamaged(f"{where}: {reason}") from e


def _dtypes_by_path(tree: Any) -> dict[str, Any]:
  return {_path_name(path): leaf.dtype for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _read_verified(read: Any, target: Any, stored_tree: Any, record: dict | None, where: str, prefix: str = "",
                   cast: Any = checksums.cast) -> Any:
  """`read(target')` with target' = `target` in the dtypes the arrays are stored in, checked against the checksum
  `record` (None: not checked), then `cast` to `target`'s dtypes."""
  stored_dtypes = _dtypes_by_path(stored_tree)

  def as_stored(path, leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return leaf
    return jax.ShapeDtypeStruct(leaf.shape, stored_dtypes.get(_path_name(path), leaf.dtype), sharding=leaf.sharding)

  with _reading(where):
    values = read(jax.tree_util.tree_map_with_path(as_stored, target))
  if record is not None:
    checksums.verify(values, record, where, prefix)
  return cast(values, jax.tree.map(lambda leaf: leaf.dtype, target))


def _read_checksums(path: epath.Path, where: str, verify: bool) -> dict | None:
  """The checksum record at `path` (None when not verifying; a warning for checkpoints written without one)."""
  if not verify:
    return None
  if not path.exists():
    logging.warning("%s was written without checksums (by an older cpm_jax): its arrays are not verified.", where)
    return None
  with _reading(where):
    return json.loads(path.read_text())


# ---- params-only checkpoints -------------------------------------------------------------------

def absolute_path(directory: epath.PathLike) -> epath.Path:
  """`directory` as an absolute path: Orbax refuses relative ones, so a local relative path (e.g. a workdir flag
  such as workdir/demo) is taken from the current directory. Remote paths (gs://...) are kept as given."""
  path = epath.Path(directory)
  if "://" in os.fspath(directory) or path.is_absolute():
    return path
  return epath.Path(os.path.abspath(os.fspath(directory)))


def save_params(directory: epath.PathLike, params: Any, metadata: dict) -> epath.Path:
  """Writes `params` (Orbax), their checksums and `metadata` (JSON) to `directory`, atomically; call on every
  process.

  The files are written under `<directory>.incomplete` and renamed once complete.
  """
  directory = absolute_path(directory)
  try:
    metadata_text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False)
  except TypeError as e:
    raise TypeError(f"save_params({directory}): metadata must be JSON-serialisable: {e}") from e
  if directory.exists():
    raise FileExistsError(f"save_params: {directory} already exists; remove it or choose another path.")
  record = checksums.record(params)
  incomplete = directory.parent / f"{directory.name}.incomplete"
  if jax.process_index() == 0:
    if incomplete.exists():
      incomplete.rmtree()
    incomplete.mkdir(parents=True)
  _sync("cpm_jax_save_params_start")
  # Uncompressed: zstd buffers a second host copy of every array while writing, which made converting a
  # checkpoint peak at ~2x its size; float weights barely compress anyway.
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
    checkpointer.save(incomplete / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
  if jax.process_index() == 0:
    (incomplete / CHECKSUMS_FILE).write_text(json.dumps(record, indent=0))
    (incomplete / METADATA_FILE).write_text(metadata_text)
    incomplete.rename(directory)
  _sync("cpm_jax_save_params_done")
  return directory


def read_metadata(directory: epath.PathLike) -> dict:
  """The metadata dict that `save_params` wrote beside the params."""
  path = epath.Path(directory) / METADATA_FILE
  if not path.exists():
    raise FileNotFoundError(f"No params checkpoint at {directory}: {path} does not exist (save_params writes "
                            f"{PARAMS_DIR}/ and {METADATA_FILE}).")
  with _reading(f"params checkpoint {directory}"):
    return json.loads(path.read_text())


def restore_params(directory: epath.PathLike, abstract_params: Any = None, shardings: Any = None,
                   verify: bool = True) -> tuple[Any, dict]:
  """Reads a `save_params` checkpoint: returns (params, metadata).

  With `abstract_params` (ShapeDtypeStructs, e.g. `cpm.abstract_params(config)`) the stored tree must match it
  path for path and shape for shape (ValueError naming the first difference); dtypes are cast to it.
  Each array is read directly into its sharding from `shardings` (default: the first local device) and, with
  `verify`, checked against its checksum (CheckpointDamaged naming the array).
  """
  directory = absolute_path(directory)
  metadata = read_metadata(directory)
  source = stored_params(directory, verify)
  if abstract_params is None:
    abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), source.tree)
  else:
    check_tree_matches(abstract_params, source.tree, source.where)
  return source.read(_restore_target(abstract_params, shardings)), metadata


@dataclasses.dataclass(frozen=True)
class StoredParams:
  """A checkpoint's params on disk: the Orbax item holding them, their metadata tree (shape and dtype per leaf)
  and their key in that item ("params" in a train state, None in a params-only checkpoint)."""

  item: epath.Path
  tree: Any
  key: str | None
  where: str  # for error messages
  checksums: dict | None = None  # the checkpoint's checksums.record (None: not verified)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """Shape of every stored param by its path ("encoder/blocks/attn/qkv_kernel")."""
    return _shapes_by_path(self.tree)

  def read(self, target: Any, restore_args: Any = None) -> Any:
    """The arrays of `target` (ShapeDtypeStructs with shardings; any subtree of the stored params), each read
    straight into its sharding, checked against its checksum and cast to its dtype; or as `restore_args` (Orbax's,
    a tree like `target`) say, e.g. ocp.RestoreArgs(restore_type=np.ndarray, dtype=...) for host arrays."""
    def read(stored_target):
      item_target, item_args = stored_target, ocp.checkpoint_utils.construct_restore_args(stored_target)
      if restore_args is not None:  # read in the stored dtypes (what the checksums are of), cast below
        item_args = jax.tree.map(lambda args, leaf: dataclasses.replace(args, dtype=leaf.dtype), restore_args,
                                 stored_target)
      if self.key is not None:
        item_target, item_args = {self.key: item_target}, {self.key: item_args}
      with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(self.item, args=ocp.args.PyTreeRestore(
            item_target, restore_args=item_args, partial_restore=True))
      return restored if self.key is None else restored[self.key]

    prefix = "" if self.key is None else f"{self.key}/"
    cast = checksums.cast if restore_args is None else checksums.cast_on_host
    return _read_verified(read, target, self.tree, self.checksums, self.where, prefix, cast)


def stored_params(directory: epath.PathLike, verify: bool = True) -> StoredParams:
  """The params of the `save_params` checkpoint at `directory`, or of the latest checkpoint of the training workdir
  there (read-only: a run still writing there is not disturbed); `verify`: reads check the checksums."""
  directory = absolute_path(directory)
  if (directory / METADATA_FILE).exists():
    where = f"params checkpoint {directory}"
    with _reading(where), ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.metadata(directory / PARAMS_DIR).item_metadata.tree
    return StoredParams(directory / PARAMS_DIR, tree, None, where,
                        _read_checksums(directory / CHECKSUMS_FILE, where, verify))
  if (directory / "checkpoints").is_dir():
    with Checkpointer(directory / "checkpoints", read_only=True) as checkpointer:
      step = checkpointer.latest_step()
      if step is None:
        raise FileNotFoundError(f"Training workdir {directory} holds no complete checkpoint in checkpoints/ yet "
                                "(train.py saves every Checkpointer.save_interval_steps steps and at the end).")
      return checkpointer.stored_params(step, verify)
  raise _not_a_checkpoint(directory)


def _not_a_checkpoint(directory: epath.Path) -> FileNotFoundError:
  if not directory.exists():
    return FileNotFoundError(f"Checkpoint {directory} does not exist.")
  return FileNotFoundError(f"{directory} is neither a params-only checkpoint (it has no {METADATA_FILE}) nor a "
                          "training workdir (no checkpoints/).")


def restore_any_params(directory: epath.PathLike, abstract_params: Any = None, shardings: Any = None,
                       verify: bool = True) -> Any:
  """Params of the `save_params` checkpoint at `directory`, or of the latest checkpoint of the training workdir
  there (its optimizer state is not read); checked and placed as in `restore_params`."""
  source = stored_params(directory, verify)
  if abstract_params is None:
    abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), source.tree)
  else:
    check_tree_matches(abstract_params, source.tree, source.where)
  return source.read(_restore_target(abstract_params, shardings))


def read_record(path: epath.PathLike) -> tuple[dict, str]:
  """(the model record, the file it was read from) of a params-only checkpoint (metadata.json) or a training
  workdir (MODEL_RECORD, written by the train loop): what family, config and tokenizer its params belong to."""
  path = epath.Path(path)
  if (path / METADATA_FILE).exists():
    return read_metadata(path), str(path / METADATA_FILE)
  if (path / "checkpoints").is_dir():
    where = path / MODEL_RECORD
    if not where.exists():
      raise FileNotFoundError(f"Training workdir {path} has no {MODEL_RECORD} (train.py writes it at start) to say "
                              "which model its checkpoints hold.")
    with _reading(f"training workdir {path}"):
      return json.loads(where.read_text()), str(where)
  raise _not_a_checkpoint(path)


# ---- warm starts and partial restores ----------------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """Which params a new run takes from an existing checkpoint; the others keep their fresh init (T5X's
  RestoreCheckpointConfig). `train.init_from` takes one: stage 2 from stage 1, a classifier from an encoder.

  path: a params-only checkpoint (convert_checkpoint.py, save_params) or a training workdir (its latest
    checkpoint; the optimizer state is not read).
  include: regexes matched at the start of each param path (e.g. "encoder/blocks/attn/qkv_kernel"), so a path
    prefix such as "encoder/" selects a subtree; default every param.
  exclude: regexes, matched the same way, of params never restored (e.g. "classifier/").
  fallback_to_init: a selected param the checkpoint lacks or holds with another shape keeps its init (each is
    logged); False: that is an error naming the param.
  dtype: the dtype restored arrays are cast to (default: each param's own in the configured model).
  """

  path: str = gin.REQUIRED
  include: Sequence[str] = (".*",)
  exclude: Sequence[str] = ()
  fallback_to_init: bool = False
  dtype: str | None = None

  def selects(self, name: str) -> bool:
    return (any(re.match(pattern, name) for pattern in self.include)
            and not any(re.match(pattern, name) for pattern in self.exclude))


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """What `warm_start` did: the params, and the paths taken from the checkpoint or kept at init."""

  params: Any
  restored: list[str]
  initialised: list[str]


def warm_start(config: RestoreCheckpointConfig, init_params: Any) -> WarmStart:
  """`init_params` (fresh arrays, sharded as the run places them) with every param that `config` selects read
  from its checkpoint into that param's sharding; see RestoreCheckpointConfig. Raises ConfigError naming the param
  (or, if nothing matches, the checkpoint) where the checkpoint cannot supply what is asked."""
  source = stored_params(config.path)
  stored = source.shapes()
  where = f"RestoreCheckpointConfig.path = {config.path!r} ({source.where})"
  targets, restored, initialised = {}, [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(init_params)[0]:
    name = _path_name(path)
    if not config.selects(name):
      initialised.append(name)
      continue
    if stored.get(name) == tuple(leaf.shape):
      targets[tuple(key.key for key in path)] = jax.ShapeDtypeStruct(
          leaf.shape, jnp.dtype(config.dtype or leaf.dtype), sharding=leaf.sharding)
      restored.append(name)
      continue
    found = "lacks it" if name not in stored else f"holds it with shape {stored[name]}"
    if not config.fallback_to_init:
      raise ConfigError(f"{where}: the model's param {name!r} (shape {tuple(leaf.shape)}) is selected but the "
                        f"checkpoint {found}; exclude it (RestoreCheckpointConfig.exclude) or set "
                        "RestoreCheckpointConfig.fallback_to_init = True to keep its init.")
    logging.info("Warm start: %s keeps its init (the checkpoint %s).", name, found)
    initialised.append(name)
  if not restored:
    raise ConfigError(f"{where}: no param of the model is selected and held by the checkpoint with its shape (the "
                      f"model has e.g. {initialised[:3]}, the checkpoint {sorted(stored)[:3]}).")
  values = traverse_util.flatten_dict(source.read(traverse_util.unflatten_dict(targets)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: values.get(tuple(key.key for key in path), leaf), init_params)
  return WarmStart(params, restored, initialised)


# ---- the data iterator's state, one file per data shard ----------------------------------------

def _shard_state_file(shard: int, count: int) -> str:
  return f"shard_{shard}-of-{count}.json"


_SHARD_STATE_FILE = re.compile(r"(?:shard|process)_(\d+)-of-(\d+)\.json$")  # process_*: before data shards


def data_shard_count(directory: epath.Path) -> int | None:
  """The number of data shards whose iterator states the checkpoint's data item at `directory` holds."""
  counts = {int(match.group(2)) for path in directory.glob("*.json") if (match := _SHARD_STATE_FILE.match(path.name))}
  if len(counts) > 1:
    raise CheckpointDamaged(f"{directory}: data-iterator states of different shard counts {sorted(counts)}.")
  return counts.pop() if counts else None


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves the iterator state of each data shard this process reads (processes.ShardedIterator.shard_states: JSON-able
  dicts or bytes) to its own file, and restores a process's shards from them on any process count."""

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    for shard, state in args.iterator.shard_states().items():
      record = {"bytes": state.decode("latin-1")} if isinstance(state, bytes) else {"json": state}
      (directory / _shard_state_file(shard, args.iterator.shard_count)).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    states = {}
    for shard in args.iterator.shard_indices:
      path = directory / _shard_state_file(shard, args.iterator.shard_count)
      if not path.exists():  # written before data shards: one state per process
        path = directory / f"process_{shard}-of-{args.iterator.shard_count}.json"
      if not path.exists():
        found = sorted(p.name for p in directory.glob("*.json"))
        raise FileNotFoundError(f"No data-iterator state for shard {shard} of {args.iterator.shard_count} at "
                                f"{directory}; the checkpoint holds {found}.")
      record = json.loads(path.read_text())
      states[shard] = record["bytes"].encode("latin-1") if "bytes" in record else record["json"]
    args.iterator.set_shard_states(states)
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


# ---- the training checkpoint manager -----------------------------------------------------------

STATE_ITEM, DATA_ITEM, CHECKSUMS_ITEM = "state", "data", "checksums"


@gin.configurable
class Checkpointer:
  """Saves and restores the train state and every process's data-iterator state in `directory`.

  Saves are asynchronous (training goes on while arrays are written) and atomic; retention keeps the last
  `max_to_keep` checkpoints plus every step divisible by `keep_period`. Every save records the checksum of each
  array of the state, and restores check them unless `verify_checksums=False`. Call every method on every process.
  """

  def __init__(self, directory: epath.PathLike, *, save_interval_steps: int = 1000, max_to_keep: int = 3,
               keep_period: int | None = None, async_save: bool = True, read_only: bool = False,
               verify_checksums: bool = True):
    self.directory = absolute_path(directory)
    self._save_interval_steps = save_interval_steps
    self._verify = verify_checksums
    if read_only:  # what Orbax would otherwise reset with a warning each
      save_interval_steps, max_to_keep, keep_period = 0, None, None
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only, read_only=read_only,
        create=not read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: DataIteratorHandler(),
                       CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(filename=CHECKSUMS_FILE)})

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (None when there is none)."""
    return self._manager.latest_step()

  def data_shard_count(self, step: int) -> int | None:
    """How many data shards the checkpoint of `step` holds iterator states of (None: it holds none)."""
    data = self.directory / str(step) / DATA_ITEM
    return data_shard_count(data) if data.exists() else None

  def complete_steps_on_disk(self) -> list[int]:
    """The steps whose checkpoint is complete in the directory now (a save still being written is not one)."""
    return sorted(int(path.name) for path in self.directory.iterdir() if path.name.isdigit())

  def restore(self, abstract_state: Any, state_shardings: Any, data_iterator: Any = None,
              step: int | None = None) -> Any:
    """The state saved at `step` (default: the latest), each array read into its sharding in `state_shardings`
    (None: the first local device).

    With `data_iterator`, also restores this process's iterator state into it (in place).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {self.directory} to restore.")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; complete checkpoints: "
                              f"{self.all_steps()}.")
    where = f"checkpoint {self.directory}/{step}"
    stored = self._stored_state(step)
    check_tree_matches(abstract_state, stored, where)
    if data_iterator is not None and not (self.directory / str(step) / DATA_ITEM).exists():
      raise FileNotFoundError(f"Checkpoint {self.directory}/{step} holds no data-iterator state (it was saved "
                              "without a data iterator).")

    def read(target):
      args = {STATE_ITEM: ocp.args.StandardRestore(target)}
      if data_iterator is not None:
        args[DATA_ITEM] = DataIteratorRestore(data_iterator)
      return self._manager.restore(step, args=ocp.args.Composite(**args))[STATE_ITEM]

    return _read_verified(read, _restore_target(abstract_state, state_shardings), stored, self._checksums(step),
                          where)

  def _stored_state(self, step: int) -> Any:
    with _reading(f"checkpoint {self.directory}/{step}"):
      return self._manager.item_metadata(step)[STATE_ITEM].tree

  def _checksums(self, step: int, verify: bool | None = None) -> dict | None:
    return _read_checksums(self.directory / str(step) / CHECKSUMS_ITEM / CHECKSUMS_FILE,
                           f"checkpoint {self.directory}/{step}", self._verify if verify is None else verify)

  def stored_params(self, step: int, verify: bool | None = None) -> StoredParams:
    """The params of the train state saved at `step` (for reading them without the optimizer state); `verify`:
    check their checksums (default: as this Checkpointer does)."""
    stored = self._stored_state(step)
    if "params" not in stored:
      raise ValueError(f"Checkpoint {self.directory}/{step} holds no params (it has {sorted(stored)}).")
    return StoredParams(self.directory / str(step) / STATE_ITEM, stored["params"], "params",
                        f"checkpoint {self.directory}/{step}", self._checksums(step, verify))

  def maybe_save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
    """Starts an asynchronous save when `step` is a multiple of the save interval (or `force`).

    Returns whether a save started; a step that already has a checkpoint is skipped with a warning (that
    happens when resuming from an older step than the latest).
    """
    if not force and step % self._save_interval_steps:
      return False
    if step in self._manager.all_steps():
      logging.warning("Not saving step %d: %s already holds a checkpoint for it.", step, self.directory)
      return False
    args = {STATE_ITEM: ocp.args.StandardSave(state), CHECKSUMS_ITEM: ocp.args.JsonSave(checksums.record(state))}
    if data_iterator is not None:
      args[DATA_ITEM] = DataIteratorSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def wait(self) -> None:
    """Blocks until the pending save (if any) is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---- preemption and Ctrl-C --------------------------------------------------------------------

class PreemptionGuard:
  """Turns SIGTERM (the eviction notice of schedulers and cloud VMs) and Ctrl-C (SIGINT) into a stop the loop polls
  every step: it finishes the step, saves it and returns.

  Single process: a handler sets a flag; further SIGTERMs only set it again, a second SIGINT raises
  KeyboardInterrupt (the user insists: abort the save). Under jax.distributed, JAX's preemption service catches
  SIGTERM on any process and `should_stop(step)` becomes true on every process at the same step, so all of them save
  that step together; a first SIGINT is passed to that service as a SIGTERM to this process.

  Guards nest (a program that runs several trainings holds one around them all): an inner guard starts requested if
  the one around it was, and hands its own request to that one when it closes, so the program stops at its next
  check instead of starting another training.
  """

  _open: list["PreemptionGuard"] = []  # the guards in place, outermost first

  def __init__(self):
    self._requested = threading.Event()
    self.signal_name: str | None = None  # the first stop request's signal ("SIGTERM", "SIGINT")
    self._outer = PreemptionGuard._open[-1] if PreemptionGuard._open else None
    if self._outer is not None and self._outer.requested:
      self._request(self._outer.signal_name)
    PreemptionGuard._open.append(self)
    self._distributed = jax.process_count() > 1
    self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_signal)}
    if not self._distributed:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.signal_name is not None:
      raise KeyboardInterrupt
    if self.signal_name is None and signum == signal.SIGINT:
      logging.warning("Ctrl-C: finishing this step, then saving it (Ctrl-C again aborts without saving).")
    if self._distributed:
      self.signal_name = self.signal_name or signal.Signals(signum).name
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service agrees the step with the other processes
    else:
      self._request(signal.Signals(signum).name)

  def _request(self, signal_name: str | None) -> None:
    self.signal_name = self.signal_name or signal_name
    self._requested.set()

  @property
  def requested(self) -> bool:
    """True once this process received SIGTERM or SIGINT (or, multi-process, once a stop step was agreed)."""
    return self._requested.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; call once per step on every process."""
    if self._distributed and multihost_utils.reached_preemption_sync_point(step):
      self._request("SIGTERM")
    return self.requested

  def close(self) -> None:
    """Reinstates the signal handlers that were in place before; a request goes on to the guard around this one."""
    for signum, previous in self._previous.items():
      if signal.getsignal(signum) == self._on_signal:
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    if self in PreemptionGuard._open:
      PreemptionGuard._open.remove(self)
    if self._outer is not None and self.requested:
      self._outer._request(self.signal_name)

  def __enter__(self) -> "PreemptionGuard":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
