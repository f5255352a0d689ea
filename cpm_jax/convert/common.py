"""Model-agnostic conversion bookkeeping: errors, key ledgers, exactly-once target filling, atomic output, file reads
and writes at an offset.

Every converter (CPM <-> HF / Megatron, PLUG <-> DeepSpeed) uses the same two ledgers, so nothing is
silently left at a random init and nothing in a source file is silently ignored:
  `KeyLedger`     every source key read at most once; `check_all_taken` names any key never read.
  `TargetParams`  every target leaf assigned exactly once with the declared shape; `result` names any gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import uuid
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from flax import traverse_util


class ConversionError(ValueError):
  """A checkpoint could not be converted; the message names the file, key and what was expected."""


@dataclasses.dataclass
class Loaded:
  """Converted params with their config and notes on how the config was found (e.g. the heads)."""

  params: dict
  config: Any
  notes: list[str]
  metadata: dict = dataclasses.field(default_factory=dict)  # what an Orbax input stored beside its params


@dataclasses.dataclass(frozen=True)
class Format:
  """One checkpoint format of a family: how to read it into params and write params out (either may be None).

  load(path, *, config, dtype, mesh, **options) -> Loaded; save(params, config, path, **options) -> path.
  load_options / save_options name the extra keywords each takes (convert_checkpoint.py maps its flags onto them:
  num_heads, tag, trust_pickle / num_ranks, tag). needs_config: the weights do not fix the model config, so loading
  needs one (a gin model config).
  """

  load: Callable[..., Loaded] | None = None
  save: Callable[..., pathlib.Path] | None = None
  load_options: tuple[str, ...] = ()
  save_options: tuple[str, ...] = ()
  needs_config: bool = False


def flatten(tree: dict) -> dict[str, Any]:
  """Nested dicts -> {"a/b/c": leaf}."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
  """{"a/b/c": leaf} -> nested dicts."""
  return traverse_util.unflatten_dict(flat, sep="/")


class KeyLedger:
  """The keys a source offers and which of them were read (each at most once)."""

  def __init__(self, keys: Iterable[str], where: str):
    self.where = where
    self._keys = set(keys)
    self._taken: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self._keys

  def take(self, key: str) -> None:
    if key not in self._keys:
      raise ConversionError(f"{self.where}: missing key {key!r}.")
    if key in self._taken:
      raise ConversionError(f"{self.where}: key {key!r} was read twice; the conversion table maps it to two "
                            "targets.")
    self._taken.add(key)

  def expect(self, keys: Iterable[str], ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Fails before any tensor is read if a key in `keys` is absent or the source holds one outside them."""
    keys = set(keys)
    missing = sorted(keys - self._keys)
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise ConversionError(f"{self.where}: missing key {missing[0]!r}{more}.")
    self._reject(self._keys - keys, ignore)

  def check_all_taken(self, ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Fails if a key was never read: nothing in the source may be silently dropped."""
    self._reject(self._keys - self._taken, ignore)

  def _reject(self, keys: set[str], ignore: Callable[[str], bool]) -> None:
    left = sorted(key for key in keys if not ignore(key))
    if left:
      shown = ", ".join(repr(key) for key in left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
      raise ConversionError(f"{self.where}: unknown keys {shown}; they belong to no parameter of the target "
                            "model (wrong model type or a different architecture?).")


class TargetParams:
  """Fills a tree of target parameters leaf by leaf: each exactly once, with the declared shape.

  abstract: nested dicts of jax.ShapeDtypeStruct (e.g. `cpm.abstract_params(config)`); values are cast to
  its dtypes. place: optional (path, np.ndarray) -> array, e.g. `device_placer(...)`, applied as each leaf
  arrives so only one converted tensor group is ever held on the host.
  """

  def __init__(self, abstract: dict, place: Callable[[str, np.ndarray], Any] | None = None):
    self.specs = flatten(abstract)
    self._place = place or (lambda path, value: value)
    self._values: dict[str, Any] = {}

  def new_buffer(self, path: str) -> np.ndarray:
    """An uninitialised host array of `path`'s shape and dtype, to be filled and then `assign`ed."""
    spec = self._spec(path)
    return np.empty(spec.shape, spec.dtype)

  def assign(self, path: str, value: np.ndarray, origin: str) -> None:
    spec = self._spec(path)
    if path in self._values:
      raise ConversionError(f"{origin}: target parameter {path!r} was already assigned; two sources map to it.")
    if tuple(value.shape) != tuple(spec.shape):
      raise ConversionError(f"{origin}: shape {tuple(value.shape)} does not fit parameter {path!r} of shape "
                            f"{tuple(spec.shape)} (the model config disagrees with the checkpoint).")
    if not (value.flags.owndata and value.dtype == spec.dtype):
      value = np.array(value, dtype=spec.dtype)  # own the data: never keep a view into a source file
    self._values[path] = self._place(path, value)

  def result(self) -> dict:
    missing = sorted(set(self.specs) - set(self._values))
    if missing:
      raise ConversionError(f"Parameters {missing} were never assigned by the conversion; refusing to leave them "
                            "at a random init.")
    return unflatten(self._values)

  def _spec(self, path: str):
    if path not in self.specs:
      raise ConversionError(f"{path!r} is not a parameter of the target model; known: {sorted(self.specs)}.")
    return self.specs[path]


def device_placer(shardings: dict) -> Callable[[str, np.ndarray], jax.Array]:
  """(path, host array) -> jax.Array with that path's NamedSharding, e.g. from `partitioning.tree_shardings`.

  Blocks until the transfer is done so that the host buffer can be freed before the next tensor.
  """
  flat = flatten(shardings)

  def place(path: str, value: np.ndarray) -> jax.Array:
    return jax.device_put(value, flat[path]).block_until_ready()

  return place


@contextlib.contextmanager
def atomic_output_dir(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `directory`; renames it to `directory` only if the block completes.

  On any error the temporary directory is removed, so no partial output is ever left behind.
  """
  final = pathlib.Path(directory)
  if final.exists():
    raise ConversionError(f"Output {final} already exists; remove it or choose another path.")
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
    tmp.rename(final)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def read_at(path: pathlib.Path, offset: int, array: np.ndarray, what: str) -> np.ndarray:
  """Fills `array` (C-contiguous) with the bytes of `path` from `offset` on and returns it; a file that ends early is
  a ConversionError naming `what`."""
  with open(path, "rb") as f:
    f.seek(offset)
    if array.nbytes and f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
      raise ConversionError(f"{path}: file ends inside {what} (truncated download?).")
  return array


def write_at(path: pathlib.Path, offset: int, array: np.ndarray) -> None:
  """Writes the bytes of `array` (in C order) into the existing file `path` at `offset`."""
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
