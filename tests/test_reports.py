"""What notebooks show: TensorBoard scalars read back from tensorboardX's files, and a params tree's sharding table."""

import jax
import numpy as np
import pytest
from tensorboardX import SummaryWriter

from cpm_jax import partitioning, sharding_report, tensorboard_scalars
from cpm_jax.models import cpm


def test_read_scalars_gives_what_tensorboardx_wrote(tmp_path):
  for run, steps in (("first", range(1, 4)), ("resumed", range(3, 6))):  # step 3 written twice: the last wins
    writer = SummaryWriter(str(tmp_path / "tensorboard" / run))
    for step in steps:
      writer.add_scalar("train/loss", 10.0 / step + (run == "resumed"), step)
      writer.add_scalar("validation/perplexity", float(step * step), step)
    writer.close()
  scalars = tensorboard_scalars.read_scalars(tmp_path / "tensorboard")
  assert sorted(scalars) == ["train/loss", "validation/perplexity"]
  assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [10.0, 5.0, 10 / 3 + 1, 3.5, 3.0], rtol=1e-6)
  assert scalars["validation/perplexity"][-1] == (5, 25.0)
  with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
    tensorboard_scalars.read_scalars(tmp_path / "empty")


def test_sharding_rows_and_bytes_per_device_match_the_placed_shards():
  config = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=16, num_heads=4, max_positions=32)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  axes = cpm.logical_axes(config)
  shardings = partitioning.tree_shardings(axes, mesh, cpm.abstract_params(config))
  params = jax.jit(lambda key: cpm.init(config, key), out_shardings=shardings)(jax.random.key(0))
  rows = sharding_report.parameter_rows(params, axes)
  leaves = jax.tree.leaves(params)
  assert len(rows) == len(leaves)
  for row, leaf in zip(rows, leaves):
    assert row["shard / device"] == str(tuple(leaf.addressable_shards[0].data.shape)), row
    assert row["spec"] == str(tuple(leaf.sharding.spec))
  assert any(row["shard / device"] != row["shape"] for row in rows)  # something is split on this mesh
  held = sharding_report.bytes_per_device(params)
  assert len(held) == 8
  assert sum(held.values()) == sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
  total = sum(leaf.nbytes for leaf in leaves)
  assert total / 8 <= max(held.values()) < total
  table = sharding_report.format_table(rows)
  assert table.splitlines()[0].split()[:2] == ["parameter", "shape"] and len(table.splitlines()) == len(rows) + 2
