"""PLUG's pre-training objectives: StructBERT (MLM with word-structural targets, 3-way sentence relation) and
PALM (encoder MLM on a prefix, decoder LM on its continuation).

Example-level noising runs on the host (numpy, deterministic given the Generator) inside the Grain pipeline;
the losses run on device. Convention for all targets: 0 with weight 0 where nothing is predicted.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax.objectives import add_sums, lm_loss


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, candidates: np.ndarray, mask_id: int,
                random_ids: tuple[int, int], rate: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERT's MLM noise: round(rate x candidates) positions (at least one) become targets; of those 80% are
  replaced by mask_id, 10% by a token drawn uniformly from [random_ids[0], random_ids[1]), 10% kept.

  Returns (inputs, targets, weights): targets hold the original token at chosen positions.
  """
  inputs = np.array(tokens, np.int32)
  targets = np.zeros_like(inputs)
  weights = np.zeros(inputs.shape, np.float32)
  positions = np.flatnonzero(candidates)
  if not len(positions):
    return inputs, targets, weights
  chosen = rng.choice(positions, max(1, round(rate * len(positions))), replace=False)
  targets[chosen], weights[chosen] = inputs[chosen], 1.0
  action = rng.random(len(chosen))
  inputs[chosen[action < 0.8]] = mask_id
  randomised = chosen[(action >= 0.8) & (action < 0.9)]
  inputs[randomised] = rng.integers(*random_ids, len(randomised))
  return inputs, targets, weights


_TRIGRAM_PERMUTATIONS = np.array([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def shuffle_trigrams(tokens: np.ndarray, rng: np.random.Generator, *, candidates: np.ndarray,
                     probability: float) -> tuple[np.ndarray, np.ndarray]:
  """StructBERT's word structural noise: left to right, each trigram of three candidate positions is, with
  `probability`, put in a random non-identity order (trigrams never overlap).

  Returns (inputs, changed): `changed` marks the positions whose token differs from the original, where the
  model must predict the original token.
  """
  inputs = np.array(tokens, np.int32)
  i = 0
  while i + 3 <= len(inputs):
    if candidates[i:i + 3].all() and rng.random() < probability:
      inputs[i:i + 3] = inputs[i:i + 3][_TRIGRAM_PERMUTATIONS[rng.integers(len(_TRIGRAM_PERMUTATIONS))]]
      i += 3
    else:
      i += 1
  return inputs, inputs != np.asarray(tokens)


RELATION_RANDOM, RELATION_NEXT, RELATION_PREVIOUS = 0, 1, 2


def sentence_relation(rng: np.random.Generator, first: Any, second: Any, other: Any) -> tuple[Any, Any, int]:
  """StructBERT's sentence structural objective, each case with probability 1/3: (first, second) with label
  RELATION_NEXT, (second, first) with RELATION_PREVIOUS, or (first, other) with RELATION_RANDOM, where `second`
  follows `first` in a document and `other` comes from another document."""
  label = int(rng.integers(3))
  return {RELATION_RANDOM: (first, other), RELATION_NEXT: (first, second),
          RELATION_PREVIOUS: (second, first)}[label] + (label,)


def palm_split(tokens: Sequence[int], source_ratio: float) -> tuple[Sequence[int], Sequence[int]]:
  """PALM: the encoder reads the first round(source_ratio x n) tokens, the decoder predicts the rest (each
  side gets at least one token)."""
  if len(tokens) < 2:
    raise ValueError(f"palm_split needs at least 2 tokens, got {len(tokens)}.")
  cut = min(max(round(source_ratio * len(tokens)), 1), len(tokens) - 1)
  return tokens[:cut], tokens[cut:]


def structbert_loss(mlm_logits: jax.Array, mlm_targets: jax.Array, mlm_weights: jax.Array,
                    relation_logits: jax.Array, relation_labels: jax.Array,
                    relation_weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MLM (incl. word structural targets) + sentence relation, as sums over MLM target tokens.

  Each example's relation cross-entropy is weighted by its number of MLM targets, so the loss is close to
  mean MLM loss + mean relation loss (BERT's sum of means) while staying a token-weighted sum that
  microbatches can add. relation_labels / relation_weights are [batch]. Extra sums report the relation
  accuracy: relation_correct_sum / relation_count.
  """
  _, mlm = lm_loss(mlm_logits, mlm_targets, mlm_weights)
  tokens_per_example = mlm_weights.astype(jnp.float32).sum(-1)
  _, relation = lm_loss(relation_logits, relation_labels, relation_weights * tokens_per_example)
  _, counted = lm_loss(relation_logits, relation_labels, relation_weights)
  sums = dict(mlm, loss_sum=mlm["loss_sum"] + relation["loss_sum"], mlm_loss_sum=mlm["loss_sum"],
              relation_loss_sum=counted["loss_sum"], relation_correct_sum=counted["correct_sum"],
              relation_count=counted["weight_sum"])
  return (sums["loss_sum"] + sums["z_loss_sum"]) / jnp.maximum(sums["weight_sum"], 1.0), sums


def palm_loss(mlm_logits: jax.Array | None, mlm_targets: jax.Array | None, mlm_weights: jax.Array | None,
              decoder_logits: jax.Array, decoder_targets: jax.Array,
              decoder_weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PALM: the decoder's LM loss on the continuation plus (if given) the encoder's MLM loss, token-weighted
  over both. Extra sums report the decoder alone: decoder_loss_sum / decoder_weight_sum."""
  _, decoder = lm_loss(decoder_logits, decoder_targets, decoder_weights)
  sums = dict(decoder, decoder_loss_sum=decoder["loss_sum"], decoder_weight_sum=decoder["weight_sum"])
  if mlm_logits is not None:
    sums = add_sums(sums, lm_loss(mlm_logits, mlm_targets, mlm_weights)[1])
  return (sums["loss_sum"] + sums["z_loss_sum"]) / jnp.maximum(sums["weight_sum"], 1.0), sums
