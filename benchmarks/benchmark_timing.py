"""Timing helper shared by the benchmark scripts (run as scripts, their folder is on sys.path)."""

from __future__ import annotations

import time


def best_times(fns, repeats: int) -> list[float]:
  """Best wall time of each function over `repeats` rounds, after one untimed call each (compilation, warm-up).

  Each round calls every function once, in turn, so all of them meet the same load: on a shared machine the
  ratios between them stay meaningful when the absolute times drift.
  """
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times):
      start = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - start)
  return [min(fn_times) for fn_times in times]


def best_time(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls of fn, after one untimed call."""
  return best_times([fn], repeats)[0]
