"""Which share of the data each process loads; every family's pipelines split the same way.

Training: process p of P reads the examples (documents) p, p + P, ... and batches them itself (`process_examples`).
Evaluation: every process makes the same global batches in the same order (the last one padded with empty rows) and
takes its own rows of each (`process_rows`), so all processes see the same number of batches (a process that ran out
first would leave the others waiting in a collective) and the result does not depend on the process count.
Empty rows are all zeros: their segment ids and weights are 0, so they count nowhere.
Resuming on another process count: a run's training data is split into a fixed number of shards, each read as one
process of that many would read it, and every process reads several when there are fewer (`ShardedIterator`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from cpm_jax.gin_setup import ConfigError


def process_share(process_index: int | None, process_count: int | None,
                  global_batch_size: int) -> tuple[int, int, int]:
  """(process index, process count, rows per process), defaulting to this JAX process; checks the batch splits."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, process_count={count}).")
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of the {count} processes.")
  return index, count, global_batch_size // count


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessShare:
  """The base of every family's train-loop data class: whose share of each global batch this process reads.

  process_index / process_count: default jax's processes; `shard` picks another (ShardedIterator reads a run's data
  in shards, tests emulate hosts). Subclasses define `global_batch_size`.
  """

  process_index: int | None = None
  process_count: int | None = None

  def shard(self, index: int, count: int):
    """This data as process `index` of `count` reads it (a shard of ShardedIterator)."""
    return dataclasses.replace(self, process_index=index, process_count=count)

  def process_share(self) -> tuple[int, int, int]:
    """(this process's index, the number of processes, its rows of each global batch)."""
    return process_share(self.process_index, self.process_count, self.global_batch_size)


def process_examples(dataset: grain.MapDataset, index: int, count: int, what: str = "examples") -> grain.MapDataset:
  """The examples p, p + P, ... of `dataset` for process `index` of `count`; a ValueError if it gets none."""
  share = dataset[index::count]
  if not len(share):
    raise ValueError(f"Process {index} of {count} gets no {what}: the source holds fewer than {count}.")
  return share


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """A (final, partial) batch padded with all-zero rows up to `rows`."""
  return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def _rows(batch: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
  return {k: v[start:stop] for k, v in batch.items()}


def process_rows(global_batches: grain.IterDataset, global_batch_size: int, index: int,
                 count: int) -> grain.IterDataset:
  """Process `index`'s rows of each global batch (the last padded with empty rows first)."""
  rows = global_batch_size // count
  return (global_batches.map(functools.partial(pad_rows, rows=global_batch_size))
          .map(functools.partial(_rows, start=index * rows, stop=(index + 1) * rows)))


class ShardedIterator:
  """This process's training batches when a run's data is split into `shard_count` shards, whatever the process count.

  Shard s of S is what process s of S processes would read (`make_shard(s, S)`: an iterator of its rows of each
  global batch, with get_state / set_state). Process p of P (P divides S) reads shards p * S/P ... (p + 1) * S/P - 1
  and returns their rows side by side, so the global batches are the same on any P dividing S, and each shard's
  iterator state (`shard_states`) restores on any of them: a run checkpointed on 2 processes resumes on 1, and one
  started with 2 shards on 1 process resumes on 2 (cpm_jax.checkpointing saves one state file per shard).
  """

  def __init__(self, make_shard: Callable[[int, int], Iterator[Mapping[str, np.ndarray]]], shard_count: int,
               process_index: int | None = None, process_count: int | None = None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if shard_count < 1 or shard_count % count:
      raise ConfigError(f"train.data_shards = {shard_count}: the data's shards must split evenly over the {count} "
                        f"processes (a run keeps the shard count it started with; resume on a process count that "
                        f"divides it).")
    self.shard_count = shard_count
    per_process = shard_count // count
    self.shard_indices = tuple(range(index * per_process, (index + 1) * per_process))
    self._iterators = [make_shard(shard, shard_count) for shard in self.shard_indices]

  def __iter__(self) -> "ShardedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(iterator) for iterator in self._iterators]
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

  def shard_states(self) -> dict[int, Any]:
    """The iterator state of each of this process's shards, by shard index."""
    return {shard: iterator.get_state() for shard, iterator in zip(self.shard_indices, self._iterators)}

  def set_shard_states(self, states: Mapping[int, Any]) -> None:
    """Continues each shard after the batch its state (from `shard_states`, on any process) was taken at."""
    for shard, iterator in zip(self.shard_indices, self._iterators):
      iterator.set_state(states[shard])
