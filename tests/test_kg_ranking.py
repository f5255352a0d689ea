"""Filtered link-prediction ranks: sharded entity blocks against a brute-force numpy ranking, and against PyKEEN's
RankBasedEvaluator on the same model."""

import jax
import numpy as np
import pytest

from cpm_jax import partitioning
from cpm_jax.models import kg
from cpm_jax.models.kg import ranking
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.scoring import SCORERS

# 64 rows on 8 devices (8 each), 3 rows per block: blocks overlap at each device's end, and rows 50-63 are padding.
CONFIG = KGConfig(num_entities=50, num_relations=3, dim=4, entity_row_multiple=16)


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))


def _small_integer_params(config, seed):
  """Small integer entries, so every score is exact in float32 whatever the summation order, and copies of rows
  (entities 1-5 equal entity 0) give exact ties."""
  rng = np.random.default_rng(seed)
  entities = rng.integers(-2, 3, (config.entity_rows, config.dim)).astype(np.float32)
  entities[1:6] = entities[0]
  return {"entities": entities, "relations": rng.integers(-2, 3, (config.num_relations, config.dim)).astype(np.float32)}


def _graph(seed):
  rng = np.random.default_rng(seed)
  triples = np.unique(np.stack([rng.integers(0, 50, 400), rng.integers(0, 3, 400), rng.integers(0, 50, 400)], 1), axis=0)
  triples = triples[rng.permutation(len(triples))].astype(np.int32)
  return triples[:-40], triples[-40:]  # train, test


def _brute_force_ranks(config, params, test, known, side, filtered=True):
  scorer = SCORERS[config.scoring]
  E, Rel = params["entities"][:config.num_entities].astype(np.float64), params["relations"].astype(np.float64)
  true_triples = {tuple(t) for t in known}
  ranks = []
  for h, r, t in test:
    scores = np.array([float(scorer.score(E[h], Rel[r], E[e])) if side == "tail" else
                       float(scorer.score(E[e], Rel[r], E[t])) for e in range(config.num_entities)])
    target = t if side == "tail" else h
    competitors = [e for e in range(config.num_entities) if e != target and not (
        filtered and ((h, r, e) if side == "tail" else (e, r, t)) in true_triples)]
    greater = np.sum(scores[competitors] > scores[target])
    equal = np.sum(scores[competitors] == scores[target])
    ranks.append(1 + greater + equal / 2)
  return np.array(ranks)


@pytest.mark.parametrize("scoring", ["distmult", "transe"])
def test_filtered_ranks_equal_brute_force_and_exclude_exactly_the_known_triples(mesh, scoring):
  config = KGConfig(**{**CONFIG.__dict__, "scoring": scoring})
  host_params = _small_integer_params(config, seed=1)
  shardings = partitioning.tree_shardings(kg.logical_axes(config), mesh)
  params = jax.device_put(host_params, shardings)
  train, test = _graph(seed=2)
  known = ranking.KnownTriples.from_triples([train, test], config.num_relations)
  for side in ranking.SIDES:
    ranks = ranking.filtered_ranks(params, config, test, known, side, mesh, query_batch=16, block_size=3)
    expected = _brute_force_ranks(config, host_params, test, np.concatenate([train, test]), side)
    np.testing.assert_array_equal(ranks["realistic"], expected)
    assert np.any(ranks["pessimistic"] > ranks["optimistic"])  # the copied rows tie
    unfiltered = _brute_force_ranks(config, host_params, test, np.concatenate([train, test]), side, filtered=False)
    assert np.any(unfiltered > expected)  # filtering removed some competitors


def test_known_answers_are_every_true_entity_of_the_query():
  known = ranking.KnownTriples.from_triples([np.array([[0, 1, 5], [0, 1, 2], [3, 1, 5], [0, 0, 7]])], 2)
  answers = known.padded_answers(np.array([[0, 1, 9], [4, 1, 5]]), "tail")
  assert answers.tolist() == [[5, 2], [-1, -1]]
  assert known.padded_answers(np.array([[9, 1, 5]]), "head").tolist() == [[0, 3]]


def test_mrr_and_hits_equal_pykeens_evaluator_on_the_same_model(mesh):
  import torch
  from pykeen.evaluation import RankBasedEvaluator
  from pykeen.models import DistMult
  from pykeen.triples import CoreTriplesFactory

  config = KGConfig(num_entities=50, num_relations=3, dim=8, entity_row_multiple=16)
  host_params = jax.tree.map(np.asarray, kg.init(config, jax.random.key(4)))
  params = jax.device_put(host_params, partitioning.tree_shardings(kg.logical_axes(config), mesh))
  train, test = _graph(seed=5)
  ours = ranking.link_prediction(params, config, test, ranking.KnownTriples.from_triples([train, test], 3), mesh,
                                 query_batch=16, block_size=5)

  factory = CoreTriplesFactory.create(torch.from_numpy(train.astype(np.int64)), num_entities=50, num_relations=3)
  reference = DistMult(triples_factory=factory, embedding_dim=config.dim, random_seed=0)
  with torch.no_grad():
    reference.entity_representations[0]._embeddings.weight.copy_(torch.from_numpy(host_params["entities"][:50].copy()))
    reference.relation_representations[0]._embeddings.weight.copy_(torch.from_numpy(host_params["relations"].copy()))
  results = RankBasedEvaluator().evaluate(reference, torch.from_numpy(test.astype(np.int64)), batch_size=64,
                                          additional_filter_triples=[factory.mapped_triples], use_tqdm=False)
  for ours_name, pykeen_name in (("mrr", "inverse_harmonic_mean_rank"), ("hits_at_1", "hits_at_1"),
                                 ("hits_at_10", "hits_at_10")):
    for side, prefix in (("both", ""), ("head", "head_"), ("tail", "tail_")):
      assert ours[prefix + ours_name] == pytest.approx(results.get_metric(f"{side}.realistic.{pykeen_name}"),
                                                       abs=1e-6), (side, ours_name)


def test_top_k_tails_and_heads_equal_a_full_sort(mesh):
  from cpm_jax.models.kg import query
  config = KGConfig(num_entities=50, num_relations=3, dim=8, scoring="complex", entity_row_multiple=16)
  host_params = jax.tree.map(np.asarray, kg.init(config, jax.random.key(7)))
  params = jax.device_put(host_params, partitioning.tree_shardings(kg.logical_axes(config), mesh))
  scorer = SCORERS["complex"]
  E, Rel = host_params["entities"][:50], host_params["relations"]
  for side in ranking.SIDES:
    scores, ids = query.top_k(params, config, [3, 17], [0, 2], 5, mesh, side=side, block_size=3)
    for row, (entity, relation) in enumerate(((3, 0), (17, 2))):
      full = (scorer.score(E[entity], Rel[relation], E) if side == "tail" else
              scorer.score(E, Rel[relation], E[entity]))
      np.testing.assert_array_equal(ids[row], np.argsort(-np.asarray(full))[:5])
      np.testing.assert_allclose(scores[row], np.sort(np.asarray(full))[::-1][:5], rtol=1e-5)
