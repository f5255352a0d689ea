"""Training objectives shared by the families: the token-weighted LM loss and adding loss sums."""

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
  # One-hot selects instead of take_along_axis / argmax: their gradient is elementwise (no scatter into
  # [tokens, vocab]) and the reductions vectorize; the values are identical (argmax's first-index ties included).
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  target_logits = jnp.where(vocab_ids == targets[..., None], logits, 0.0).sum(-1)
  token_loss = log_z - target_logits
  z_term = z_loss * jnp.square(log_z)
  weight_sum = weights.sum()
  denominator = jnp.maximum(weight_sum, 1.0)
  loss_sum = (token_loss * weights).sum()
  z_loss_sum = (z_term * weights).sum()
  max_logits = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  argmax = jnp.where(logits == max_logits, vocab_ids, logits.shape[-1]).min(-1)
  correct = (argmax == targets).astype(jnp.float32)
  metrics = {
      "loss_sum": loss_sum,
      "z_loss_sum": z_loss_sum,
      "weight_sum": weight_sum,
      "correct_sum": (correct * weights).sum(),
  }
  return (loss_sum + z_loss_sum) / denominator, metrics


def add_sums(*sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Adds loss-sum dicts key by key (keys missing from one count as 0)."""
  out: dict[str, jax.Array] = {}
  for s in sums:
    for key, value in s.items():
      out[key] = out[key] + value if key in out else value
  return out
