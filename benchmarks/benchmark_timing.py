"""Timing helper shared by the benchmark scripts (run as scripts, their folder is on sys.path)."""

from __future__ import annotations

import time


def best_time(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls of fn, after one untimed call (compilation, warm-up)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)
