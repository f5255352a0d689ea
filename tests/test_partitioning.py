"""Mesh construction, logical rules, and the invariant: same seed + data -> same training on every mesh."""

import jax
import numpy as np
import pytest

from cpm_jax import partitioning, training
from cpm_jax.models import cpm

TINY = cpm.CPMConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8, max_positions=64, dropout_rate=0.0)

MESHES = [
    dict(data=1, fsdp=1, tensor=1),
    dict(data=8, fsdp=1, tensor=1),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=1, fsdp=1, tensor=8),
    dict(data=2, fsdp=2, tensor=2),
    dict(data=2, fsdp=1, tensor=4),
]


def test_mesh_config_resolves_minus_one_and_rejects_bad_sizes():
  assert partitioning.MeshConfig(data=-1, tensor=2).resolve(8) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="does not divide"):
    partitioning.MeshConfig(data=-1, tensor=3).resolve(8)
  with pytest.raises(ValueError, match="multiply to 4"):
    partitioning.MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
  with pytest.raises(ValueError, match="at most one axis"):
    partitioning.MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_indivisible_parameter_names_path_and_axis():
  config = cpm.CPMConfig(vocab_size=100, num_layers=1, embed_dim=32, num_heads=8, max_positions=16)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=1, tensor=8))
  with pytest.raises(ValueError, match=r"embed/wte: dimension 0 \(logical axis 'vocab'\).*'tensor' of size 8"):
    partitioning.tree_shardings(cpm.logical_axes(config), mesh, cpm.abstract_params(config))


def test_megatron_layout_rules():
  rules = partitioning.DEFAULT_RULES
  assert partitioning.logical_to_spec(("embed", "qkv", "heads", "kv"), rules) == jax.sharding.PartitionSpec(
      "fsdp", None, "tensor", None)
  assert partitioning.logical_to_spec(("mlp", "embed"), rules) == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert partitioning.logical_to_spec(("batch", "length"), rules) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  # A merged [batch * heads] dimension (the decode cache) takes batch's mesh axes, then the heads'.
  assert partitioning.logical_to_spec(("batch*act_heads", None, "cache_length"), rules) == jax.sharding.PartitionSpec(
      ("data", "fsdp", "tensor"), None, None)
  with pytest.raises(KeyError, match="'nonsense' has no rule"):
    partitioning.logical_to_spec(("batch*nonsense",), rules)


def _batch(seed, batch=8, length=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, TINY.vocab_size, (batch, length + 1)).astype(np.int32)
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "weights": np.ones((batch, length), np.float32),
      "segment_ids": np.ones((batch, length), np.int32),
      "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
  }


def _train_three_steps(mesh_sizes):
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes), devices=jax.devices()[:np.prod(list(mesh_sizes.values()))])
  model = cpm.CPMLanguageModel(TINY)
  optimizer = training.make_optimizer(training.learning_rate_schedule(1e-2, 1, 10))
  steps = training.make_sharded_steps(model, optimizer, mesh)
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  losses = []
  for _ in range(3):
    state, metrics = steps.train(state, training.global_batch(_batch(0), mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.params), state


def test_same_training_on_every_mesh():
  reference_losses, reference_params, _ = _train_three_steps(MESHES[0])
  assert reference_losses[2] < reference_losses[0]
  for sizes in MESHES[1:]:
    losses, params, _ = _train_three_steps(sizes)
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, err_msg=str(sizes))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"{sizes} {jax.tree_util.keystr(path)}")


def test_tensor_sharded_weight_is_really_split():
  _, _, state = _train_three_steps(dict(data=2, fsdp=1, tensor=4))
  qkv = state.params["blocks"]["attn"]["qkv_kernel"]  # [L, E, 3, H, D], heads on tensor
  shard_shapes = {shard.data.shape for shard in qkv.addressable_shards}
  assert shard_shapes == {(2, 32, 3, 2, 4)}
  wte = state.params["embed"]["wte"]  # vocab split 4 ways
  assert {shard.data.shape for shard in wte.addressable_shards} == {(32, 32)}
  moment = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
  mu_qkv = [m.mu["blocks"]["attn"]["qkv_kernel"] for m in moment if hasattr(m, "mu")][0]
  assert {shard.data.shape for shard in mu_qkv.addressable_shards} == {(2, 32, 3, 2, 4)}
