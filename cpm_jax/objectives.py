"""Training objectives: the LM loss (CPM, PALM decoder) and PLUG's pre-training objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
            z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-weighted mean cross-entropy (float32) over positions with weight > 0.

  logits [..., vocab], targets int [...], weights [...] (0 for padding / cross-document targets).
  z_loss adds z_loss * log(Z)^2 per token (PaLM-style logit drift control). Returns the loss and
  sums a caller can aggregate across microbatches: loss_sum, weight_sum, correct_sum, z_loss_sum.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_loss = log_z - target_logits
  z_term = z_loss * jnp.square(log_z)
  weight_sum = weights.sum()
  denominator = jnp.maximum(weight_sum, 1.0)
  loss_sum = (token_loss * weights).sum()
  z_loss_sum = (z_term * weights).sum()
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  metrics = {
      "loss_sum": loss_sum,
      "z_loss_sum": z_loss_sum,
      "weight_sum": weight_sum,
      "correct_sum": (correct * weights).sum(),
  }
  return (loss_sum + z_loss_sum) / denominator, metrics
