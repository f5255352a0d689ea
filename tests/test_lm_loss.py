"""objectives.lm_loss against its textbook definition (take_along_axis / argmax / softmax - one-hot), and the fused
tied-head loss against lm_loss of the tied logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import objectives, transformer


def _reference(logits, targets, weights):
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return ((log_z - target_logits) * weights).sum(), (correct * weights).sum()


def test_lm_loss_matches_definition_with_ties_and_gradient():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 7, 50)).astype(np.float32)
  logits[0] = 0.0  # every logit tied: argmax is index 0
  logits[1, 0, 3:9] = 5.0  # tie between ids 3..8: argmax is 3, so target 4 is wrong
  targets = rng.integers(0, 50, (3, 7)).astype(np.int32)
  targets[0, :2] = (0, 1)
  targets[1, :2] = (3, 4)
  weights = (rng.random((3, 7)) > 0.3).astype(np.float32)
  weights[:2, :2] = 1.0
  logits, targets, weights = map(jnp.asarray, (logits, targets, weights))

  loss, sums = objectives.lm_loss(logits, targets, weights)
  loss_sum, correct_sum = _reference(logits, targets, weights)
  assert float(sums["loss_sum"]) == float(loss_sum)
  assert float(sums["correct_sum"]) == float(correct_sum)
  np.testing.assert_allclose(float(loss), float(loss_sum) / float(weights.sum()), rtol=1e-6)

  grad = jax.grad(lambda l: objectives.lm_loss(l, targets, weights)[1]["loss_sum"])(logits)
  expected = (jax.nn.softmax(logits) - jax.nn.one_hot(targets, 50)) * weights[..., None]
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-6)


@pytest.mark.parametrize("z_loss, chunk_length", [(0.0, 5), (1e-2, None)])
def test_tied_lm_loss_equals_lm_loss_of_tied_logits(z_loss, chunk_length):
  """Values and gradients (hidden and embedding), with weights, ties, z-loss and unequal cotangents for loss_sum and
  z_loss_sum; chunk_length 5 of length 12 runs 3 chunks of 4."""
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)
  embedding = jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)
  embedding = embedding.at[7].set(embedding[3])  # tied logits for ids 3 and 7
  targets = jnp.asarray(rng.integers(0, 40, (2, 12)), jnp.int32).at[0, :3].set(7)
  weights = jnp.asarray(rng.random((2, 12)) > 0.3, jnp.float32) * 1.5

  def objective(sums):
    return 0.7 * sums["loss_sum"] + 1.3 * sums["z_loss_sum"]

  def reference(h, e):
    return objectives.lm_loss(transformer.tied_logits(e, h, jnp.float32), targets, weights, z_loss)

  def fused(h, e):
    return objectives.tied_lm_loss(h, e, targets, weights, dtype=jnp.float32, z_loss=z_loss,
                                   chunk_length=chunk_length)

  (loss, sums), (expected_loss, expected) = fused(hidden, embedding), reference(hidden, embedding)
  np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
  for key in expected:
    np.testing.assert_allclose(float(sums[key]), float(expected[key]), rtol=1e-6, err_msg=key)
  got = jax.grad(lambda h, e: objective(fused(h, e)[1]), argnums=(0, 1))(hidden, embedding)
  want = jax.grad(lambda h, e: objective(reference(h, e)[1]), argnums=(0, 1))(hidden, embedding)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's buffer decisions")
def test_tied_lm_loss_gradient_writes_no_transposed_logits_gradient():
  """The fused head's compiled gradient holds no [vocab, chunk tokens] buffer: summing the embedding's gradient as
  [vocab, embed] made XLA:CPU write each chunk's d(logits) a second time, transposed (before the change: f32[97,8])."""
  vocab, batch, length, chunk = 97, 2, 12, 4
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.standard_normal((batch, length, 16)), jnp.float32)
  embedding = jnp.asarray(rng.standard_normal((vocab, 16)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  weights = jnp.ones((batch, length), jnp.float32)
  grad = jax.jit(jax.grad(lambda h, e: objectives.tied_lm_loss(h, e, targets, weights, dtype=jnp.float32,
                                                               chunk_length=chunk)[0], argnums=(0, 1)))
  text = grad.lower(hidden, embedding).compile().as_text()
  unfused = [block for block in re.split(r"\n(?=\S)", text) if "fused_computation" not in block.split("\n", 1)[0]]
  shapes = set(re.findall(r"^\s*(?:ROOT )?%\S+ = (f32\[[\d,]+\])", "\n".join(unfused), re.M))
  assert f"f32[{batch * chunk},{vocab}]" in shapes  # the chunk's d(logits): the check sees the loop's buffers
  assert f"f32[{vocab},{batch * chunk}]" not in shapes, sorted(shapes)
