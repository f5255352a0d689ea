"""What every family's evaluation adapter does with its model: run it over many inputs in batches of one size (one
compiled shape; the last batch padded), with a progress bar, under the mesh; and decode from a decode layout made
once for every generate call."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence, TypeVar

import jax

from cpm_jax import logging_setup, partitioning, transformer

Item = TypeVar("Item")


def in_batches(items: Sequence[Item], batch_size: int, run: Callable[[list[Item]], Sequence[Any]], *, pad: Item,
               desc: str, progress: bool = False, mesh: jax.sharding.Mesh | None = None) -> list:
  """run(batch) for consecutive batches of `batch_size` items, the last filled up with `pad`, under `mesh` (its
  activations sharded by the logical-axis rules); returns the results of the real items, in order."""
  results = []
  starts = range(0, len(items), batch_size)
  for start in logging_setup.progress(starts, desc=desc, total=len(starts), unit="batches", enabled=progress):
    batch = list(items[start:start + batch_size])
    with partitioning.on_mesh(mesh):
      out = run(batch + [pad] * (batch_size - len(batch)))
    results.extend(out[:len(batch)])
  return results


@dataclasses.dataclass
class ModelRunner:
  """A family's params as an adapter runs them: `in_batches` with its batch size, mesh and progress bars, and
  `decode_params`, the decode layout (`decode_layout(params)`, a copy of the block weights) made on first use."""

  params: Any
  decode_layout: Callable[[Any], transformer.DecodeParams]
  batch_size: int = 8
  mesh: jax.sharding.Mesh | None = None
  progress: bool = False

  @functools.cached_property
  def decode_params(self) -> transformer.DecodeParams:
    return self.decode_layout(self.params)

  def in_batches(self, items: Sequence[Item], run: Callable[[list[Item]], Sequence[Any]], *, pad: Item,
                 desc: str) -> list:
    return in_batches(items, self.batch_size, run, pad=pad, desc=desc, progress=self.progress, mesh=self.mesh)
