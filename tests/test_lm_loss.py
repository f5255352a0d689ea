"""objectives.lm_loss against its textbook definition (take_along_axis / argmax / softmax - one-hot)."""

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import objectives


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
