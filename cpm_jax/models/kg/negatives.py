"""PyTorch-BigGraph's chunked negatives: positives in a chunk share their corrupted heads and tails.

A batch of B positives is cut into B / chunk_size chunks. For each chunk and side (tail corruption, head
corruption) the negatives are `uniform_negatives` entities drawn uniformly for that chunk plus, with
`in_batch_negatives`, the chunk's own tails (heads), each positive's own entity excluded. Scoring a chunk's
[chunk, dim] queries against its [negatives, dim] candidates is one matrix product, instead of one gather and dot
per (positive, negative) pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpm_jax.models.kg.config import KGConfig


def _side_losses(positive: jax.Array, negative: jax.Array, valid: jax.Array,
                 config: KGConfig) -> tuple[jax.Array, jax.Array]:
  """Per positive: the loss against its valid negatives, and whether it beats all of them.

  positive [chunks, chunk], negative and valid [chunks, chunk, negatives].
  """
  masked = jnp.where(valid, negative, -jnp.inf)
  if config.loss == "softmax":
    logits = jnp.concatenate([positive[..., None], masked], axis=-1)
    loss = jax.nn.logsumexp(logits, axis=-1) - positive
  else:
    loss = jnp.where(valid, jax.nn.relu(config.margin - positive[..., None] + negative), 0.0).sum(-1)
  return loss, (positive > masked.max(-1)).astype(jnp.float32)


def num_chunks(batch: int, config: KGConfig) -> int:
  if batch % config.chunk_size:
    raise ValueError(f"KG batch of {batch} triples is not divisible by KGConfig.chunk_size={config.chunk_size}.")
  return batch // config.chunk_size


def uniform_negatives(rng: jax.Array, chunks: int, config: KGConfig) -> jax.Array:
  """[2, chunks, uniform_negatives] entity ids: each chunk's corrupted tails ([0]) and heads ([1])."""
  return jax.random.randint(rng, (2, chunks, config.uniform_negatives), 0, config.num_entities)


def chunk_losses(scorer, config: KGConfig, h: jax.Array, r: jax.Array, t: jax.Array, uniform: jax.Array,
                 weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per positive [B]: the loss summed over both corrupted sides, and the fraction of sides (0, 0.5, 1) on which
  the positive scores above every negative.

  h, r, t: the positives' vectors [B, dim]; uniform: the vectors of `uniform_negatives` [2, chunks, uniform, dim];
  weights [B] (0 marks padding, whose entities are not used as in-batch negatives).
  """
  batch, size = h.shape[0], config.chunk_size
  chunks = num_chunks(batch, config)

  def chunked(x):
    return x.reshape(chunks, size, *x.shape[1:])

  positive = chunked(scorer.score(h, r, t).astype(jnp.float32))
  in_batch_valid = ~jnp.eye(size, dtype=bool)[None] & chunked(weights > 0)[:, None, :]
  losses, correct = [], []
  for queries, own, uniform_vectors in ((scorer.tail_queries(h, r), t, uniform[0]),
                                        (scorer.head_queries(r, t), h, uniform[1])):
    candidates = [uniform_vectors]
    valid = [jnp.ones((chunks, size, config.uniform_negatives), bool)]
    if config.in_batch_negatives:
      candidates.append(chunked(own))
      valid.append(in_batch_valid)
    negative = scorer.compare(chunked(queries), jnp.concatenate(candidates, axis=1))
    loss, beats = _side_losses(positive, negative, jnp.concatenate(valid, axis=-1), config)
    losses.append(loss)
    correct.append(beats)
  return (losses[0] + losses[1]).reshape(batch), (0.5 * (correct[0] + correct[1])).reshape(batch)
