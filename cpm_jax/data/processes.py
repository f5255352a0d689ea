"""Which share of each global batch this process loads (every pipeline splits its batches the same way)."""

from __future__ import annotations

import jax


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
