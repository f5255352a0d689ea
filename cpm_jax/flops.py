"""Peak FLOP/s of the devices, for MFU: published figures for accelerators, measured for CPUs."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bfloat16 peak per chip (FLOP/s), from the vendors' data sheets.
PUBLISHED_PEAK_FLOPS = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA V100": 125e12,
}


def measure_matmul_flops(sizes=(1024, 2048, 3072), repeats: int = 3, dtype=jnp.float32,
                         device: jax.Device | None = None) -> float:
  """Best FLOP/s of square jnp.dot over several sizes: a machine's practical matmul peak."""
  device = device or jax.local_devices()[0]
  best = 0.0
  for n in sizes:
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      dot(a, a).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - start))
  return best


@functools.cache
def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s, where the figure came from) for one device; a CPU's is measured (seconds) once per process."""
  device = device or jax.local_devices()[0]
  kind = device.device_kind
  for name, flops in PUBLISHED_PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops, f"published bf16 peak of {name}"
  return measure_matmul_flops(device=device), f"measured float32 matmul peak of {kind}"
