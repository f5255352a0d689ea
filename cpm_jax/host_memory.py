"""Process-wide host memory setting for programs that compute on CPU (XLA:CPU)."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
  """Keeps the memory XLA:CPU frees inside the process, for its next allocation, instead of returning it to the OS.

  XLA:CPU allocates a compiled program's temporaries in one block per execution and frees it afterwards. From its
  worker threads glibc serves a block that large with a fresh mmap and unmaps it on free, so every train step
  touches all of its temporaries as new pages: a minor page fault per 4 KiB (~280,000 a cpm_small step, 1.1 GB),
  spent in the kernel, and slower still when other work in the process or on the machine competes for it. With one
  malloc arena, no mmap and no trimming, the block is reused from the heap and a step faults nothing (for
  temporaries up to 2 GiB, the largest trim threshold glibc takes). The cost: the process keeps its peak heap.

  Call it before the first JAX computation (XLA's threads pick their malloc arena at their first allocation).
  Returns whether the setting was applied (False where the C library is not glibc).
  """
  library = ctypes.util.find_library("c")
  mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
  if mallopt is None:
    return False
  return all(mallopt(option, value) == 1 for option, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
