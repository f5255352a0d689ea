"""layers.layer_norm: its values and gradients, and the backward graph of a deep unrolled stack staying linear."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import layers

EPS = 1e-5


def test_values_and_gradients_match_flax_layer_norm():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 3 + 1
  params = {"scale": jax.random.normal(jax.random.key(1), (16,)), "bias": jax.random.normal(jax.random.key(2), (16,))}
  reference = nn.LayerNorm(epsilon=EPS, use_fast_variance=False)

  def ours(x, params):
    return layers.layer_norm(x, params, EPS)

  def flax_ln(x, params):
    return reference.apply({"params": params}, x)

  def weighted_sum_grads(norm):  # a loss whose gradient differs per feature
    return jax.grad(lambda x, params: (norm(x, params) * jnp.arange(16.0)).sum(), (0, 1))(x, params)

  np.testing.assert_allclose(ours(x, params), flax_ln(x, params), rtol=1e-5, atol=1e-5)
  for got, want in zip(weighted_sum_grads(ours), weighted_sum_grads(flax_ln)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


def _largest_fusion(depth: int) -> int:
  """Operands of the largest fusion in the compiled gradient of `depth` unrolled pre-LN residual blocks."""
  width = 32
  keys = jax.random.split(jax.random.key(0), depth)
  blocks = [{"ln": {"scale": jnp.ones(width), "bias": jnp.zeros(width)},
             "w": jax.random.normal(k, (width, width)) * 0.1} for k in keys]

  def loss(blocks, x):
    for block in blocks:
      x = x + jnp.tanh(layers.layer_norm(x, block["ln"], EPS) @ block["w"])
    return jnp.square(x).sum()

  x = jnp.ones((2, 8, width))
  text = jax.jit(jax.grad(loss)).lower(blocks, x).compile().as_text()
  entry = text[text.index("ENTRY"):]
  return max(line.split(" fusion(", 1)[1].split("), kind=", 1)[0].count("%")
             for line in entry.splitlines() if " fusion(" in line)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion decisions")
def test_unrolled_stack_gradient_fusions_do_not_grow_with_depth():
  # The residual stream's gradient is summed once per layer: without layer_norm's own jit, XLA:CPU fused the whole
  # running sum into each layer's consumers (28 operands at the first of 12 cpm_small layers, 208 at the twelfth),
  # work growing with the square of the depth.
  assert _largest_fusion(12) <= _largest_fusion(4) + 1
