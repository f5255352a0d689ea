"""Self-training's pseudo-label selection: keep confident, class-balanced predictions on the unlabelled pool."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def aligned(probabilities: np.ndarray, prior: Sequence[float]) -> np.ndarray:
  """ReMixMatch's distribution alignment: each row times prior / (the rows' mean distribution), renormalised, so that
  a model that favours one class over the whole pool is compared with the class distribution the pool should have."""
  probabilities = np.asarray(probabilities, np.float64)
  scaled = probabilities * np.asarray(prior, np.float64) / np.maximum(probabilities.mean(0), 1e-12)
  return scaled / scaled.sum(-1, keepdims=True)


def select(probabilities: np.ndarray, threshold: float, max_per_class: int | None = None,
           prior: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(indices, labels) of the pool examples to add: those whose top probability is >= threshold, the same number
  for every class (the smallest class's count, capped by max_per_class), the most confident of each class first.
  prior: align the probabilities to this class distribution first (`aligned`)."""
  probabilities = np.asarray(probabilities) if prior is None else aligned(probabilities, prior)
  predicted, confidence = probabilities.argmax(-1), probabilities.max(-1)
  by_class = []
  for label in range(probabilities.shape[-1]):
    members = np.flatnonzero((predicted == label) & (confidence >= threshold))
    by_class.append(members[np.argsort(-confidence[members], kind="stable")])
  count = min(len(members) for members in by_class)
  if max_per_class is not None:
    count = min(count, max_per_class)
  indices = np.concatenate([members[:count] for members in by_class]).astype(np.int64)
  return indices, predicted[indices]
