"""The few-shot loss terms, kNN retrieval and pseudo-label selection against from-scratch numpy recomputations on
hand-made batches."""

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import objectives
from cpm_jax.fewshot import knn, pseudo_labels


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


LOGITS_A = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]], np.float32)
LOGITS_B = np.array([[1.0, 0.0, 0.5], [0.3, 0.2, 0.1], [-3.0, 4.0, 1.0]], np.float32)


def test_cross_entropy_and_kl_terms():
  labels = np.array([0, 2, 1])
  np.testing.assert_allclose(objectives.cross_entropy(LOGITS_A, labels), -_log_softmax(LOGITS_A)[range(3), labels],
                             rtol=1e-6)
  p, q = np.exp(_log_softmax(LOGITS_A)), np.exp(_log_softmax(LOGITS_B))
  kl_pq = (p * (np.log(p) - np.log(q))).sum(-1)
  kl_qp = (q * (np.log(q) - np.log(p))).sum(-1)
  np.testing.assert_allclose(objectives.kl_divergence(LOGITS_A, LOGITS_B), kl_pq, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(objectives.symmetric_kl(LOGITS_A, LOGITS_B), (kl_pq + kl_qp) / 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(objectives.symmetric_kl(LOGITS_A, LOGITS_A), 0.0)  # R-Drop: identical passes
  assert float(objectives.symmetric_kl(LOGITS_A, LOGITS_B)[2]) == 0.0
  t = 2.0
  pt, qt = np.exp(_log_softmax(LOGITS_B / t)), np.exp(_log_softmax(LOGITS_A / t))  # teacher B, student A
  np.testing.assert_allclose(objectives.distillation_kl(LOGITS_A, LOGITS_B, t),
                             t * t * (pt * (np.log(pt) - np.log(qt))).sum(-1), rtol=1e-5, atol=1e-7)


def test_supervised_contrastive_against_a_loop():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 1, 0, 1, 2, 0])  # example 4 has no positive; example 5 is padding
  weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
  temperature = 0.5
  z = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  expected = np.zeros(6)
  for i in range(5):
    others = [a for a in range(5) if a != i]
    positives = [p for p in others if labels[p] == labels[i]]
    if positives:
      log_denominator = np.log(sum(np.exp(z[i] @ z[a] / temperature) for a in others))
      expected[i] = -np.mean([z[i] @ z[p] / temperature - log_denominator for p in positives])
  got = jax.jit(objectives.supervised_contrastive, static_argnums=3)(embeddings, labels, weights, temperature)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert expected[0] > 0 and expected[4] == 0 and expected[5] == 0


def test_mixup_pairs():
  weights = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  pairs = jax.jit(objectives.mixup_pairs)  # one program for both alphas
  partner, lam = pairs(jax.random.key(3), weights, 1.0)
  assert sorted(np.asarray(partner).tolist()) == list(range(8))
  lam, partner = np.asarray(lam), np.asarray(partner)
  assert (lam >= 0.5).all() and (lam <= 1).all() and (lam[:6][partner[:6] < 6] < 1).any()
  assert (lam[6:] == 1).all() and (lam[partner >= 6] == 1).all()  # padding rows are never mixed
  _, lam = pairs(jax.random.key(3), weights, 1e-4)
  np.testing.assert_allclose(lam, 1.0, atol=1e-6)  # alpha -> 0: no mixing


def test_knn_neighbours_whitening_prototypes_and_votes():
  rng = np.random.default_rng(1)
  store = knn.Datastore(knn._normalised(rng.normal(size=(40, 5))), rng.integers(0, 3, 40))
  queries = knn._normalised(rng.normal(size=(7, 5)))
  indices, distances = knn.nearest(store, queries, 6)
  for q in range(7):  # brute force
    brute = sorted(range(40), key=lambda i: np.linalg.norm(queries[q] - store.vectors[i]))[:6]
    assert indices[q].tolist() == brute
    np.testing.assert_allclose(distances[q], [np.linalg.norm(queries[q] - store.vectors[i]) for i in brute], rtol=1e-9)
  probabilities = knn.knn_probabilities(store, queries, 6, 3)
  for q in range(7):
    weights = np.exp(-distances[q]) / np.exp(-distances[q]).sum()
    np.testing.assert_allclose(probabilities[q], [weights[store.labels[indices[q]] == c].sum() for c in range(3)])

  x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0
  whitening = knn.fit_whitening(x, dim=6)
  y = (x - whitening.mean) @ whitening.transform
  np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(6), atol=1e-8)  # whitened: identity covariance
  assert knn.fit_whitening(x[:4], dim=6).transform.shape == (6, 3)  # the rank of 4 centred points
  np.testing.assert_allclose(np.linalg.norm(whitening(x), axis=-1), 1.0)

  vectors = knn._normalised(rng.normal(size=(5, 3)))
  labels = np.array([0, 0, 0, 1, 1])
  built = knn.build_datastore(vectors, labels, 2)
  assert len(built.vectors) == 5 + (1 + 3) + (1 + 2)  # examples, then per label its mean and leave-one-out means
  np.testing.assert_allclose(built.vectors[5], knn._normalised(vectors[:3].mean(0)))
  np.testing.assert_allclose(built.vectors[6], knn._normalised(vectors[1:3].mean(0)))  # without example 0
  np.testing.assert_allclose(built.vectors[10], knn._normalised(vectors[4:5].mean(0)))  # label 1 without example 3
  assert built.labels.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]


def test_knn_search_on_dev():
  """Two clusters the model gets wrong half the time: kNN with lambda > 0 wins on dev and the search finds it; a
  model that is already right keeps lambda 0."""
  rng = np.random.default_rng(2)
  centres = np.array([[4.0, 0, 0, 0], [-4.0, 0, 0, 0]])

  def points(labels):
    return centres[labels] + rng.normal(size=(len(labels), 4))

  train_labels, dev_labels = np.repeat([0, 1], 8), np.repeat([0, 1], 10)
  train, dev = points(train_labels), points(dev_labels)
  pool = points(rng.integers(0, 2, 50))
  noisy_logits = rng.normal(size=(20, 2))
  fitted = knn.KnnSearch(dim=4, max_k=8).fit(train, train_labels, np.concatenate([train, pool]), dev, noisy_logits,
                                             dev_labels, 2)
  model_alone = (noisy_logits.argmax(-1) == dev_labels).mean()
  assert fitted.lam > 0 and fitted.dev_accuracy >= 0.9 > model_alone + 0.2
  test_labels = np.repeat([0, 1], 5)
  assert (fitted.probabilities(points(test_labels), rng.normal(size=(10, 2))).argmax(-1) == test_labels).mean() >= 0.8
  right_logits = np.eye(2)[dev_labels] * 5
  assert knn.KnnSearch(dim=4, max_k=8).fit(train, train_labels, train, dev, right_logits, dev_labels, 2).lam == 0.0


def test_pseudo_labels_keep_confident_balanced_predictions():
  probabilities = np.array([[0.95, 0.05], [0.99, 0.01], [0.6, 0.4], [0.2, 0.8], [0.03, 0.97], [0.97, 0.03],
                            [0.1, 0.9], [0.5, 0.5]])
  indices, labels = pseudo_labels.select(probabilities, threshold=0.9)
  # Confident: class 0 -> 1 (.99), 5 (.97), 0 (.95); class 1 -> 4 (.97), 6 (.9). Balanced: the two best of each.
  assert indices.tolist() == [1, 5, 4, 6] and labels.tolist() == [0, 0, 1, 1]
  indices, labels = pseudo_labels.select(probabilities, threshold=0.9, max_per_class=1)
  assert indices.tolist() == [1, 4] and labels.tolist() == [0, 1]
  indices, _ = pseudo_labels.select(probabilities, threshold=0.98)
  assert indices.tolist() == []  # no confident class-1 prediction: nothing is kept


def test_aligned_pseudo_labels_survive_a_model_biased_toward_one_class():
  """The failure of the "all techniques" PET model on review_sentiment (seed 0): its pool probabilities of class 1
  span 0.07-0.56 (916 of 1,000 predicted class 0, none of class 1 at 0.6), so a balanced selection at 0.6 keeps
  nothing, though the ranking is right. Aligned to the balanced labelled sample, the most class-1-like rows are kept
  as class 1 and the least as class 0."""
  p1 = np.array([0.07, 0.25, 0.35, 0.41, 0.46, 0.51, 0.56, 0.30, 0.20, 0.40])  # rows 4-6: the true class 1
  probabilities = np.stack([1 - p1, p1], -1)
  assert pseudo_labels.select(probabilities, threshold=0.6)[0].tolist() == []
  balanced = pseudo_labels.aligned(probabilities, [0.5, 0.5])
  np.testing.assert_allclose(balanced.sum(-1), 1.0)
  ratio = (p1 / p1.mean()) / ((1 - p1) / (1 - p1).mean())  # the aligned odds of class 1
  np.testing.assert_allclose(balanced[:, 1], ratio / (1 + ratio))
  indices, labels = pseudo_labels.select(probabilities, threshold=0.6, prior=[0.5, 0.5])
  # Aligned (the pool's mean class-1 probability is .35): class 0 rows 0 .88, 8 .68, 1 .62; class 1 rows 6 .70, 5 .66,
  # 4 .61 (row 3's .56 and row 9's .55 fall short).
  assert indices.tolist() == [0, 8, 1, 6, 5, 4] and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_table_summary_is_mean_and_sample_std_over_seeds():
  from cpm_jax.fewshot import table
  got = table.summary([0.5, 0.7, 0.9], [0, 1, 2])
  assert got == {"mean": np.mean([0.5, 0.7, 0.9]), "std": np.std([0.5, 0.7, 0.9], ddof=1), "per_seed": [0.5, 0.7, 0.9],
                 "seeds": [0, 1, 2]}
  assert table.summary([0.6], [4])["std"] == 0.0
