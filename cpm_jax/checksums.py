"""Checksums of arrays for checkpoint integrity: computed on device when a checkpoint is saved, checked when read.

An array's checksum depends on its values and their positions only, not on its sharding or on which process holds
which part: every 32-bit word of the array is xored with a hash of its flat index, mixed by MurmurHash3's finaliser,
and the words are summed modulo 2**32. Integer sums are exact in any order, so any mesh and any process count
compute the same checksum of the same array, and a checkpoint written on one topology is checked on another. One
changed element always changes the sum (the finaliser is a bijection), and random damage goes unnoticed with
probability 2**-32. The cost is one fused pass over the arrays where they live (benchmarks/checkpoint_checksums.py:
about 1 s for cpm_small's 415 MiB on one CPU device, 0.56-0.75x a plain Orbax save of them; BUILD.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

ALGORITHM = "cpm_jax-fmix32-sum-v1"  # what checkpoints record beside the checksums


class CheckpointDamaged(ValueError):
  """A checkpoint's files do not hold what was saved (changed, truncated or unreadable); names the array."""


def path_name(path) -> str:
  """A pytree path as checkpoints name arrays: "params/blocks/attn/qkv_kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (one per element; two per element of a 64-bit dtype, on a last axis)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x).astype(jnp.uint32)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.sum(_fmix32(words ^ (index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


_tree_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def compute(tree: Any) -> dict[str, str]:
  """The checksum of every array of `tree` (sharded or not; call on every process), by path name, as hex."""
  sums = jax.device_get(_tree_checksums(tree))
  return {path_name(path): f"{int(value):08x}" for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def record(tree: Any) -> dict:
  """What a checkpoint stores beside `tree`'s arrays: the algorithm and every array's checksum."""
  return {"algorithm": ALGORITHM, "arrays": compute(tree)}


def verify(tree: Any, stored: Mapping[str, Any], where: str, prefix: str = "") -> None:
  """Raises CheckpointDamaged naming the first array of `tree` (read from the checkpoint `where`) whose checksum
  differs from the one `stored` (a `record`) holds for `prefix` + its path."""
  if stored.get("algorithm") != ALGORITHM:
    raise CheckpointDamaged(f"{where}: checksums of an unknown kind {stored.get('algorithm')!r} (this version "
                            f"reads {ALGORITHM!r}).")
  expected = stored["arrays"]
  for name, value in compute(tree).items():
    saved = expected.get(prefix + name)
    if saved is None:
      raise CheckpointDamaged(f"{where}: array {prefix + name!r} has no checksum in the checkpoint, which records "
                              f"{len(expected)} others: its records were changed after it was saved.")
    if saved != value:
      raise CheckpointDamaged(f"{where}: array {prefix + name!r} does not hold what was saved (checksum {value}, "
                              f"saved {saved}): the checkpoint's files were changed or damaged after it was written.")


def cast(tree: Any, dtypes: Any) -> Any:
  """`tree`'s arrays cast to `dtypes` (a matching tree of dtypes), one array at a time (each donated), so that
  the peak is the tree plus one array."""
  def one(x, dtype):
    if x.dtype == dtype:
      return x
    return jax.jit(lambda a: a.astype(dtype), donate_argnums=0, out_shardings=x.sharding)(x)
  return jax.tree.map(one, tree, dtypes)


def cast_on_host(tree: Any, dtypes: Any) -> Any:
  """`cast` for host (numpy) arrays."""
  return jax.tree.map(lambda x, dtype: x.astype(dtype, copy=False), tree, dtypes)
