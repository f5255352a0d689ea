"""Adapters (LoRA, P-tuning v2 prefixes) on a frozen base: zero-initialised LoRA is the base, merged equals
unmerged, a train step changes the adapters only (and keeps optimizer state for them only), adapters save apart."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpm_jax import adapters, checkpointing, layers, partitioning, training
from cpm_jax.models import cpm

TINY = cpm.CPMConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, max_positions=64, dropout_rate=0.0)
LORA = adapters.LoraConfig(rank=4, alpha=8.0)


def _batch(batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, TINY.vocab_size, (batch, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, length), np.float32)}


@pytest.fixture(scope="module")
def base_params():
  return cpm.init(TINY, jax.random.key(0))


def _adapted(model, base, seed=1, randomise_b=False):
  """The adapted params: `base` plus freshly initialised adapters (B random too with randomise_b)."""
  fresh = layers.init_from_specs(model.param_specs(), jax.random.key(seed))
  _, new = adapters.split(fresh)
  if randomise_b:
    new = jax.tree_util.tree_map_with_path(
        lambda path, leaf: 0.05 * jax.random.normal(jax.random.key(len(str(path))), leaf.shape)
        if str(path[-1].key).endswith("_lora_b") else leaf, new)
  return adapters.combine(base, new)


def test_lora_targets_and_shapes_follow_the_kernels():
  specs = adapters.AdaptedModel(cpm.CPMLanguageModel(TINY), lora=LORA).param_specs()
  attn, mlp = specs["blocks"]["attn"], specs["blocks"]["mlp"]
  assert attn["qkv_lora_a"].shape == (2, 32, 4) and attn["qkv_lora_a"].axes == ("layers", "embed", None)
  assert attn["qkv_lora_b"].shape == (2, 4, 3, 4, 8) and attn["qkv_lora_b"].axes == ("layers", None, "qkv",
                                                                                       "heads", "kv")
  assert attn["out_lora_a"].shape == (2, 4, 8, 4)  # the output projection's inputs are [heads, head_dim]
  assert mlp["out_lora_b"].shape == (2, 4, 32)
  assert not attn["qkv_kernel"].trainable and attn["qkv_lora_a"].trainable and not attn["qkv_lora_scale"].trainable
  assert not specs["embed"]["wte"].trainable
  only_qkv = adapters.AdaptedModel(cpm.CPMLanguageModel(TINY), lora=dataclasses.replace(LORA, targets=("attn/qkv$",)))
  assert [key for key in only_qkv.param_specs()["blocks"]["attn"] if "lora" in key] == [
      "qkv_lora_a", "qkv_lora_b", "qkv_lora_scale"]
  assert "in_lora_a" not in only_qkv.param_specs()["blocks"]["mlp"]
  with pytest.raises(ValueError, match="match no stacked kernel"):
    adapters.AdaptedModel(cpm.CPMLanguageModel(TINY), lora=dataclasses.replace(LORA, targets=("nothing",))
                          ).param_specs()


def test_zero_initialised_lora_is_the_base_and_merged_equals_unmerged(base_params):
  model = adapters.AdaptedModel(cpm.CPMLanguageModel(TINY), lora=LORA)
  tokens = _batch()["inputs"]
  forward = jax.jit(cpm.forward, static_argnums=2)
  base_logits = forward(base_params, tokens, TINY)
  np.testing.assert_array_equal(forward(_adapted(model, base_params), tokens, TINY), base_logits)
  adapted = _adapted(model, base_params, randomise_b=True)
  adapted_logits = forward(adapted, tokens, TINY)
  assert np.abs(adapted_logits - base_logits).max() > 1e-3  # the adapters do change the model
  merged = adapters.merge(adapted)
  assert jax.tree.structure(merged) == jax.tree.structure(base_params)
  np.testing.assert_allclose(forward(merged, tokens, TINY), adapted_logits, atol=2e-5, rtol=1e-5)


def test_prefix_attention_equals_attention_over_the_concatenated_keys():
  rng = np.random.default_rng(0)
  b, t, h, d, p = 2, 5, 3, 4, 2
  q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
  prefix_k, prefix_v = (rng.standard_normal((p, h, d)).astype(np.float32) for _ in range(2))
  segments = np.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]], np.int32)
  positions = np.array([[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]], np.int32)
  mask = layers.attention_mask(segments, segments, positions, positions)
  got = layers.dot_product_attention(q, *layers.with_prefix(k, v, mask, prefix_k, prefix_v))
  # From scratch: each query attends to the prefix and to its visible keys; a padding query sees nothing.
  want = np.zeros_like(q)
  for i in range(b):
    for j in range(t):
      visible = np.asarray(mask[i, 0, j])
      if not visible.any():
        continue
      keys = np.concatenate([prefix_k, k[i][visible]])
      values = np.concatenate([prefix_v, v[i][visible]])
      logits = np.einsum("hd,khd->hk", q[i, j], keys) / math.sqrt(d)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      want[i, j] = np.einsum("hk,khd->hd", weights, values)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_step_trains_only_the_adapters_and_they_save_apart(base_params, tmp_path):
  model = adapters.AdaptedModel(cpm.CPMLanguageModel(TINY), lora=LORA,
                                prefix=adapters.PrefixConfig(length=3), base_dtype="bfloat16")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  optimizer = training.make_optimizer(optax.constant_schedule(1e-2))
  steps = training.make_sharded_steps(model, optimizer, mesh)
  # B random (not zero) so that A gets gradients in the first step too.
  start = jax.tree.map(lambda leaf, abstract: leaf.astype(abstract.dtype),
                       _adapted(model, base_params, randomise_b=True), steps.abstract_state.params)
  state = training.create_train_state(model, optimizer, mesh, seed=0,
                                      params=jax.device_put(start, steps.state_shardings.params))
  before = jax.tree.map(np.asarray, state.params)
  # Optimizer moments exist for the adapters only: LoRA A and B of 4 kernels and the 2 prefixes.
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  assert len(moments) == 2 * (4 * 2 + 2)
  state, metrics = steps.train(state, training.global_batch(_batch(), mesh))
  assert np.isfinite(float(metrics["loss"]))
  after = jax.tree.map(np.asarray, state.params)
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
    name = jax.tree_util.keystr(path)
    if name.endswith(("_lora_a']", "_lora_b']", "prefix_k']", "prefix_v']")):
      assert not np.array_equal(old, new), f"{name} did not train"
    else:
      np.testing.assert_array_equal(old, new, err_msg=f"{name} is frozen but changed")
  assert state.params["blocks"]["attn"]["qkv_kernel"].dtype == jnp.bfloat16

  path = adapters.save_adapters(tmp_path / "adapters", state.params, model)
  base, _ = adapters.split(jax.tree.map(np.asarray, state.params))
  restored = adapters.restore_adapters(path, model, base)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(got), want)
  stored, _ = checkpointing.restore_params(path)  # as written: the adapters' leaves, no base weight
  stored_names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(stored)[0]}
  assert stored_names == {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      adapters.split(after)[1])[0]}
  assert len(stored_names) == 3 * 4 + 2
  assert checkpointing.read_metadata(path)["adapters"]["lora"]["rank"] == 4
