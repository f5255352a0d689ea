"""Key tables: how each parameter of a family's params tree is stored in a foreign checkpoint, and loading and
writing by such a table, one parameter group at a time.

A family describes a format by a sequence of `Entry`s, one per stored tensor ("{i}" in the key = layer i of a
stacked parameter). `load_params` assembles the params tree from per-tensor reads; `stored_tensors` and
`stored_arrays` give the tensors to write, in the stored layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from cpm_jax import layers, partitioning
from cpm_jax.convert.common import ConversionError, TargetParams, device_placer, flatten


@dataclasses.dataclass(frozen=True)
class Split:
  """How one tensor is laid out over model-parallel ranks (axis None: replicated; see convert.megatron)."""

  axis: int | None
  parts: int = 1


REPLICATED = Split(None)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One stored tensor: the params path it holds (a layer of it if the key has "{i}"), its split over model-parallel
  ranks, and its layout.

  in_dims: how many leading dims of the (per-layer) param form the stored matrix's rows (0: a flattened vector).
  transposed: the stored tensor is that [rows, cols] matrix transposed (a torch Linear weight, [out, in]).
  """

  target: str
  key: str
  split: Split = REPLICATED
  in_dims: int = 0
  transposed: bool = False

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.key

  def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of one layer of the param, whose shape is `shape`."""
    if not self.in_dims:
      return (math.prod(shape),)
    rows, cols = math.prod(shape[:self.in_dims]), math.prod(shape[self.in_dims:])
    return (cols, rows) if self.transposed else (rows, cols)

  def from_stored(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A stored tensor as (one layer of) the param of `shape`."""
    array = array.T if self.transposed else array
    return array if tuple(array.shape) == tuple(shape) else array.reshape(shape)

  def to_stored(self, array: np.ndarray) -> np.ndarray:
    """(One layer of) a param in the stored layout."""
    shape = self.stored_shape(array.shape)
    return array.reshape(shape[::-1]).T if self.transposed else array.reshape(shape)


Reader = Callable[[str, Split], tuple[np.ndarray, str]]  # (key, split) -> (stored array, "file: key")


def load_params(specs: Any, param_dtype: str, entries: Sequence[Entry], read: Reader, *,
                mesh: jax.sharding.Mesh | None = None, config_summary: str = "",
                fresh: Mapping[str, np.ndarray] | None = None) -> dict:
  """The params of `specs` (a tree of layers.ParamSpec) in `param_dtype` from `read(key, split)` of every entry's
  tensors.

  Each parameter (all layers of a stacked one) is assembled on the host, placed with its NamedSharding on `mesh`
  (without one: kept as a numpy array) and freed before the next; `fresh` gives the paths no entry covers (e.g.
  heads a source lacks, freshly initialised). Every parameter is assigned exactly once with its shape; a stored
  tensor of the wrong shape is a ConversionError naming it (and `config_summary`, what the config says).
  """
  abstract = layers.abstract_params(specs, param_dtype)
  place = None
  if mesh is not None:
    place = device_placer(partitioning.tree_shardings(layers.logical_axes(specs), mesh, abstract))
  target = TargetParams(abstract, place)
  for entry in entries:
    shape = target.specs[entry.target].shape
    if entry.per_layer:
      buffer = target.new_buffer(entry.target)
      for layer in range(shape[0]):
        buffer[layer] = _from_stored(entry, *read(entry.key.format(i=layer), entry.split), shape[1:],
                                     config_summary)
      target.assign(entry.target, buffer, entry.key)
    else:
      array, origin = read(entry.key, entry.split)
      target.assign(entry.target, _from_stored(entry, array, origin, shape, config_summary), origin)
  for path, value in (fresh or {}).items():
    target.assign(path, value, "fresh init")
  return target.result()


def _from_stored(entry: Entry, array: np.ndarray, origin: str, shape: tuple[int, ...], summary: str) -> np.ndarray:
  expected = entry.stored_shape(shape)
  if tuple(array.shape) != expected:
    raise ConversionError(f"{origin}: shape {tuple(array.shape)}, expected {expected} for {entry.target} "
                          f"{tuple(shape)}; the checkpoint does not match the model config"
                          f"{f' ({summary})' if summary else ''}.")
  return entry.from_stored(array, shape)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One stored tensor of a params tree: an entry's layer (None for unstacked params), key, stored shape, dtype."""

  entry: Entry
  layer: int | None
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype


def stored_tensors(params: Any, entries: Sequence[Entry], prefix: str = "") -> list[Tensor]:
  """Every stored tensor of `params` (arrays or ShapeDtypeStructs), entry by entry, keyed `prefix + key`."""
  flat = flatten(params)
  out = []
  for entry in entries:
    leaf = flat[entry.target]
    shape = leaf.shape[1:] if entry.per_layer else leaf.shape
    for layer in range(leaf.shape[0]) if entry.per_layer else (None,):
      out.append(Tensor(entry, layer, prefix + entry.key.format(i=layer), entry.stored_shape(shape),
                        np.dtype(leaf.dtype)))
  return out


def stored_arrays(params: dict, tensors: Sequence[Tensor]) -> Iterator[np.ndarray]:
  """The stored-layout host arrays of `tensors` (from `stored_tensors(params, ...)`), in order; one parameter is
  fetched to the host at a time."""
  flat = flatten(params)
  name, group = None, None
  for tensor in tensors:
    if tensor.entry.target != name:
      group = None  # free the previous parameter before fetching the next
      name = tensor.entry.target
      group = np.asarray(flat[name])
    yield tensor.entry.to_stored(group if tensor.layer is None else group[tensor.layer])
