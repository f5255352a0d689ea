"""kNN retrieval for few-shot classification, as GTS-Engine does it (numpy, on a trained model's outputs).

Sentence embeddings (the mean hidden state of the text span) are whitened by SVD (BERT-whitening: centred, rotated
onto the covariance's principal axes, scaled to unit variance, reduced to `dim` axes) and L2-normalised. The
datastore holds the training examples plus per-label prototypes: each label's mean and its leave-one-out means (the
mean without one example). A query's k nearest entries vote with weights softmax(-distance); the final distribution
is p = (1 - lambda) p_model + lambda p_knn, with k and lambda chosen on dev.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np


def _normalised(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class Whitening:
  """x -> normalise((x - mean) @ transform)."""

  mean: np.ndarray  # [dim_in]
  transform: np.ndarray  # [dim_in, dim]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return _normalised((np.asarray(x, np.float64) - self.mean) @ self.transform)


def fit_whitening(embeddings: np.ndarray, dim: int) -> Whitening:
  """The whitening of `embeddings` [n, dim_in] onto at most `dim` axes (fewer if the covariance's rank is lower)."""
  x = np.asarray(embeddings, np.float64)
  mean = x.mean(0)
  covariance = (x - mean).T @ (x - mean) / len(x)
  u, s, _ = np.linalg.svd(covariance)
  keep = int(min(dim, (s > s[0] * 1e-9).sum())) if s[0] > 0 else 1
  return Whitening(mean, u[:, :keep] / np.sqrt(np.maximum(s[:keep], 1e-12)))


@dataclasses.dataclass(frozen=True)
class Datastore:
  """Normalised vectors [n, dim] and their labels [n]."""

  vectors: np.ndarray
  labels: np.ndarray


def build_datastore(vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> Datastore:
  """The examples plus, per label, the normalised mean and leave-one-out means of its examples' vectors."""
  vectors, labels = np.asarray(vectors, np.float64), np.asarray(labels, np.int64)
  entries, entry_labels = [vectors], [labels]
  for label in range(num_classes):
    members = vectors[labels == label]
    if not len(members):
      continue
    total = members.sum(0)
    prototypes = [total / len(members)]
    if len(members) > 1:
      prototypes += list((total - members) / (len(members) - 1))
    entries.append(_normalised(np.stack(prototypes)))
    entry_labels.append(np.full(len(prototypes), label))
  return Datastore(np.concatenate(entries), np.concatenate(entry_labels))


def nearest(store: Datastore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices [q, k], Euclidean distances [q, k]) of each query's k nearest datastore entries, nearest first."""
  queries = np.asarray(queries, np.float64)
  squared = (queries ** 2).sum(-1)[:, None] - 2 * queries @ store.vectors.T + (store.vectors ** 2).sum(-1)[None]
  distances = np.sqrt(np.maximum(squared, 0.0))
  k = min(k, len(store.vectors))
  indices = np.argpartition(distances, k - 1, axis=-1)[:, :k]
  order = np.argsort(np.take_along_axis(distances, indices, -1), axis=-1, kind="stable")
  indices = np.take_along_axis(indices, order, -1)
  return indices, np.take_along_axis(distances, indices, -1)


def knn_probabilities(store: Datastore, queries: np.ndarray, k: int, num_classes: int) -> np.ndarray:
  """[q, classes]: the k nearest entries' labels weighted by softmax(-distance) over the k."""
  indices, distances = nearest(store, queries, k)
  weights = np.exp(-(distances - distances.min(-1, keepdims=True)))
  weights /= weights.sum(-1, keepdims=True)
  probabilities = np.zeros((len(queries), num_classes))
  np.add.at(probabilities, (np.arange(len(queries))[:, None], store.labels[indices]), weights)
  return probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KnnSearch:
  """GTS's kNN settings: whitening to `dim` axes, k in 1..max_k and lambda in `lambdas` searched on dev (lambda 0 is
  the model alone); ties go to the smaller lambda, then the smaller k."""

  dim: int = 64
  max_k: int = 31
  lambdas: tuple[float, ...] = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))

  def fit(self, train: np.ndarray, train_labels: np.ndarray, whiten_on: np.ndarray, dev: np.ndarray,
          dev_logits: np.ndarray, dev_labels: np.ndarray, num_classes: int) -> "KnnClassifier":
    """Whitening fitted on `whiten_on` embeddings, the datastore of the training embeddings, k and lambda chosen on
    dev (embeddings `dev`, the model's logits `dev_logits`)."""
    whitening = fit_whitening(whiten_on, self.dim)
    store = build_datastore(whitening(train), train_labels, num_classes)
    p_model = softmax(dev_logits)
    best = (-1.0, 0.0, 1)
    for k in range(1, min(self.max_k, len(store.vectors)) + 1):
      p_knn = knn_probabilities(store, whitening(dev), k, num_classes)
      for lam in self.lambdas:
        accuracy = float((((1 - lam) * p_model + lam * p_knn).argmax(-1) == dev_labels).mean())
        if accuracy > best[0] or (accuracy == best[0] and (lam, k) < (best[1], best[2])):
          best = (accuracy, float(lam), k)
    return KnnClassifier(whitening, store, k=best[2], lam=best[1], dev_accuracy=best[0], num_classes=num_classes)


@dataclasses.dataclass(frozen=True)
class KnnClassifier:
  """A fitted kNN: predict(embeddings, logits) -> (1 - lam) p_model + lam p_knn."""

  whitening: Whitening
  store: Datastore
  k: int
  lam: float
  dev_accuracy: float
  num_classes: int

  def probabilities(self, embeddings: np.ndarray, logits: np.ndarray) -> np.ndarray:
    p_knn = knn_probabilities(self.store, self.whitening(embeddings), self.k, self.num_classes)
    return (1 - self.lam) * softmax(logits) + self.lam * p_knn
