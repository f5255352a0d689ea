"""Training objectives shared by the families: the token-weighted LM loss (of given logits, or fused with a tied
output head) and adding loss sums."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cpm_jax import partitioning


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


def tied_lm_loss(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array, *, dtype,
                 z_loss: float = 0.0, chunk_length: int | None = 64) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`lm_loss` of the logits of an output head tied to the word embedding, hidden [b, t, e] @ embedding^T [e, v]
  (computed in `dtype`, float32 logits), without materialising the [b, t, vocab] logits.

  The positions go through in chunks of (at most) chunk_length (None: all at once). Under differentiation each
  chunk's loss gradient is computed as soon as its logits are (softmax - one-hot, then the two products with the
  hidden states and the embedding), so neither the logits nor their gradient are kept for the backward pass: the
  head and loss of a cpm_small step (vocab 30000, 1024 tokens) need ~120 MB of temporaries instead of ~370 MB, and
  XLA no longer writes d(logits) transposed. Same values and gradients as `lm_loss(tied logits, ...)` to float
  rounding (tests/test_lm_loss.py).
  """
  weights = weights.astype(jnp.float32)
  length = hidden.shape[1]
  chunk = max(c for c in range(1, min(chunk_length or length, length) + 1) if length % c == 0)
  sums = _tied_head_sums(hidden, embedding, targets, weights, jnp.dtype(dtype), float(z_loss), chunk)
  weight_sum = weights.sum()
  sums = {**sums, "weight_sum": weight_sum}
  return (sums["loss_sum"] + sums["z_loss_sum"]) / jnp.maximum(weight_sum, 1.0), sums


def _chunk_logits(hidden, embedding, dtype):
  logits = jnp.einsum("bte,ve->btv", hidden.astype(dtype), embedding.astype(dtype),
                      preferred_element_type=jnp.float32)
  return partitioning.constrain(logits, ("batch", "length", "act_vocab"))


def _chunk_sums(logits, targets, weights, z_loss):
  """(loss, z-loss and correct sums, log Z, softmax, one-hot of the targets) of one chunk's float32 logits."""
  max_logits = logits.max(-1, keepdims=True)
  unnormalized = jnp.exp(logits - max_logits)
  normalizer = unnormalized.sum(-1, keepdims=True)
  log_z = (max_logits + jnp.log(normalizer))[..., 0]
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  one_hot = vocab_ids == targets[..., None]
  # A gather, not lm_loss's select-and-sum: nothing differentiates this function (the head's VJP is written out),
  # and on XLA:CPU the select is written out in full before its sum.
  target_logits = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  argmax = jnp.where(logits == max_logits, vocab_ids, logits.shape[-1]).min(-1)
  sums = {"loss_sum": ((log_z - target_logits) * weights).sum(),
          "z_loss_sum": (z_loss * jnp.square(log_z) * weights).sum(),
          "correct_sum": ((argmax == targets) * weights).sum()}
  return sums, log_z, unnormalized / normalizer, one_hot


def _split(x, n: int):
  """[b, t, ...] -> [n, b, t / n, ...]: the chunks to scan over (the batch axis stays where its sharding is)."""
  return jnp.swapaxes(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 0, 1)


def _join(x):
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tied_head_sums(hidden, embedding, targets, weights, dtype, z_loss, chunk):
  n = hidden.shape[1] // chunk

  def body(total, xs):
    h, t, w = xs
    sums = _chunk_sums(_chunk_logits(h, embedding, dtype), t, w, z_loss)[0]
    return add_sums(total, sums), None

  zero = {key: jnp.zeros((), jnp.float32) for key in ("loss_sum", "z_loss_sum", "correct_sum")}
  return jax.lax.scan(body, zero, tuple(_split(x, n) for x in (hidden, targets, weights)))[0]


def _tied_head_sums_fwd(hidden, embedding, targets, weights, dtype, z_loss, chunk):
  """The sums, and the gradients of loss_sum and z_loss_sum with respect to hidden and embedding (the residuals:
  the backward pass only scales them by the incoming cotangents).

  The embedding's gradient is summed over the chunks as [terms, embed, vocab] and transposed once at the end: as
  [vocab, embed], XLA:CPU wrote each chunk's d(logits) out a second time, transposed, for that product."""
  n = hidden.shape[1] // chunk
  table = embedding.astype(dtype)

  def body(carry, xs):
    total, d_embedding_t = carry
    h, t, w = xs
    sums, log_z, probs, one_hot = _chunk_sums(_chunk_logits(h, embedding, dtype), t, w, z_loss)
    d_logits = [(probs - one_hot) * w[..., None]]  # d loss_sum / d logits
    if z_loss:
      d_logits.append(probs * (2 * z_loss * log_z * w)[..., None])  # d z_loss_sum / d logits
    d_logits = jnp.stack(d_logits).astype(dtype)
    d_hidden = jnp.einsum("kbtv,ve->kbte", d_logits, table, preferred_element_type=jnp.float32)
    d_embedding_t += jnp.einsum("kbtv,bte->kev", d_logits, h.astype(dtype), preferred_element_type=jnp.float32)
    return (add_sums(total, sums), d_embedding_t), d_hidden.astype(hidden.dtype)

  terms = 2 if z_loss else 1
  zero = ({key: jnp.zeros((), jnp.float32) for key in ("loss_sum", "z_loss_sum", "correct_sum")},
          jnp.zeros((terms, *embedding.shape[::-1]), jnp.float32))
  (sums, d_embedding_t), d_hidden = jax.lax.scan(body, zero, tuple(_split(x, n) for x in (hidden, targets, weights)))
  d_hidden = jnp.moveaxis(d_hidden, 1, 0)  # [terms, n, b, chunk, e]
  return sums, (jax.vmap(_join)(d_hidden), jnp.swapaxes(d_embedding_t, 1, 2).astype(embedding.dtype))


def _tied_head_sums_bwd(dtype, z_loss, chunk, residuals, cotangents):
  d_hidden, d_embedding = residuals
  scale = jnp.stack([cotangents["loss_sum"], cotangents["z_loss_sum"]][:d_hidden.shape[0]])

  def combine(d):
    return jnp.tensordot(scale.astype(d.dtype), d, axes=1)
  return combine(d_hidden), combine(d_embedding), None, None


_tied_head_sums.defvjp(_tied_head_sums_fwd, _tied_head_sums_bwd)


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
