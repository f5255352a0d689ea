"""Which share of the data each process loads; every family's pipelines split the same way.

Training: process p of P reads the examples (documents) p, p + P, ... and batches them itself (`process_examples`).
Evaluation: every process makes the same global batches in the same order (the last one padded with empty rows) and
takes its own rows of each (`process_rows`), so all processes see the same number of batches (a process that ran out
first would leave the others waiting in a collective) and the result does not depend on the process count.
Empty rows are all zeros: their segment ids and weights are 0, so they count nowhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import grain
import jax
import numpy as np


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
