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


# ---- per-example terms of the few-shot objectives (each [batch] float32; callers weight and sum them) -------------

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] per example: logits [batch, classes], labels int [batch]."""
  logits = logits.astype(jnp.float32)
  return jax.nn.logsumexp(logits, -1) - (jax.nn.one_hot(labels, logits.shape[-1]) * logits).sum(-1)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """KL(p || q) per example between the softmaxes of two [batch, classes] logits."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), -1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), -1)
  return (jnp.exp(log_p) * (log_p - log_q)).sum(-1)


def symmetric_kl(a_logits: jax.Array, b_logits: jax.Array) -> jax.Array:
  """R-Drop's consistency term, (KL(a || b) + KL(b || a)) / 2 per example."""
  return 0.5 * (kl_divergence(a_logits, b_logits) + kl_divergence(b_logits, a_logits))


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """Hinton's soft-label term T^2 KL(teacher_T || student_T) per example (softmaxes at temperature T)."""
  return temperature ** 2 * kl_divergence(teacher_logits / temperature, student_logits / temperature)


def supervised_contrastive(embeddings: jax.Array, labels: jax.Array, weights: jax.Array,
                           temperature: float) -> jax.Array:
  """In-batch supervised contrastive loss (Khosla et al. 2020) per anchor: embeddings [batch, dim] are L2-normalised;
  anchor i's loss is -mean over its positives p (same label, p != i) of log softmax_a(z_i . z_a / T)[p] over every
  other example a; 0 for anchors without a positive and for rows of weight 0 (which are no one's candidates)."""
  z = embeddings.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  similarity = z @ z.T / temperature
  valid = weights > 0
  others = valid[None, :] & ~jnp.eye(z.shape[0], dtype=bool)
  log_prob = similarity - jax.nn.logsumexp(jnp.where(others, similarity, -jnp.inf), -1, keepdims=True)
  positives = others & (labels[:, None] == labels[None, :]) & valid[:, None]
  count = positives.sum(-1)
  loss = -jnp.where(positives, log_prob, 0.0).sum(-1) / jnp.maximum(count, 1)
  return jnp.where(count > 0, loss, 0.0)


def mixup_pairs(rng: jax.Array, weights: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
  """(partner [batch], lambda [batch]) for mixup: partners from a random permutation of the batch, lambda ~
  Beta(alpha, alpha) folded to max(lambda, 1 - lambda) (alpha -> 0 gives 1: no mixing), and 1 where either row has
  weight 0 (padding and unlabelled rows are never mixed)."""
  permutation_rng, beta_rng = jax.random.split(rng)
  partner = jax.random.permutation(permutation_rng, weights.shape[0])
  lam = jax.random.beta(beta_rng, alpha, alpha, weights.shape)
  lam = jnp.maximum(lam, 1.0 - lam)
  return partner, jnp.where((weights > 0) & (weights[partner] > 0), lam, 1.0)
