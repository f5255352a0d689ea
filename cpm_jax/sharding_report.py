"""Where a sharded params tree lives: each parameter's logical axes, PartitionSpec and per-device shard shape, and
the bytes each device holds; for notebooks and logs (`format_table` renders rows as a text table)."""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import jax

from cpm_jax import partitioning


def parameter_rows(params: Any, logical_axes: Any) -> list[dict[str, str]]:
  """One row per parameter of a tree of placed jax.Arrays: name, shape, logical axes, PartitionSpec, the shape of
  the shard each device holds and its MiB."""
  axes = jax.tree.leaves(logical_axes, is_leaf=partitioning.is_logical_axes)
  rows = []
  for (path, leaf), names in zip(jax.tree_util.tree_flatten_with_path(params)[0], axes, strict=True):
    shard = leaf.sharding.shard_shape(leaf.shape)
    rows.append({"parameter": jax.tree_util.keystr(path, simple=True, separator="/"), "shape": str(tuple(leaf.shape)), "logical axes": str(names),
                 "spec": str(tuple(leaf.sharding.spec)), "shard / device": str(tuple(shard)),
                 "MiB / device": f"{leaf.dtype.itemsize * math.prod(shard) / 2**20:.3f}"})
  return rows


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
  """The bytes of `tree`'s arrays that each device holds (its addressable shards)."""
  held: dict[jax.Device, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return dict(held)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows of equal keys as an aligned text table."""
  columns = list(rows[0])
  widths = [max(len(column), *(len(str(row[column])) for row in rows)) for column in columns]
  lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
  lines.append("  ".join("-" * width for width in widths))
  lines += ["  ".join(str(row[column]).ljust(width) for column, width in zip(columns, widths)) for row in rows]
  return "\n".join(lines)
