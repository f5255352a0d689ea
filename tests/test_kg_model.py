"""CPM-KM's model: scoring functions by hand and against PyKEEN, chunked negatives against a direct computation,
which rows each optimizer changes, the same training on 1, 4 and 8 devices, and the family's sparse row update
against the generic dense step."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from cpm_jax import partitioning, training
from cpm_jax.models import kg
from cpm_jax.models.kg import model as kg_model
from cpm_jax.models.kg import negatives, sparse_updates
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.scoring import SCORERS

H, R, T = np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.5, 4.0])


def test_scores_equal_the_hand_computed_formulas():
  score = {name: float(SCORERS[name].score(H, R, T)) for name in SCORERS}
  assert score["distmult"] == pytest.approx(1 * 3 * 0.5 + 2 * -1 * 4)  # -6.5
  assert score["transe"] == pytest.approx(-np.sqrt((1 + 3 - 0.5) ** 2 + (2 - 1 - 4) ** 2))  # -sqrt(21.25)
  # ComplEx reads [1, 2] as 1 + 2i: Re((1 + 2i)(3 - i) conj(0.5 + 4i)) = Re((5 + 5i)(0.5 - 4i)) = 22.5
  assert score["complex"] == pytest.approx(22.5)


def _random_vectors(dim, count=5, seed=0):
  return [np.random.default_rng(seed + i).normal(size=(count, dim)).astype(np.float32) for i in range(3)]


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_equal_pykeens_interactions(name):
  import torch
  from pykeen.nn import modules
  h, r, t = _random_vectors(8)
  if name == "complex":
    to_torch = lambda x: torch.complex(torch.from_numpy(x[:, :4]), torch.from_numpy(x[:, 4:]))
    reference = modules.ComplExInteraction()
  else:
    to_torch = torch.from_numpy
    reference = modules.DistMultInteraction() if name == "distmult" else modules.TransEInteraction(p=2)
  expected = reference(to_torch(h), to_torch(r), to_torch(t)).numpy()
  np.testing.assert_allclose(SCORERS[name].score(h, r, t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_query_products_score_every_candidate_like_the_formula(name):
  scorer = SCORERS[name]
  h, r, t = _random_vectors(6, count=4, seed=3)
  candidates = _random_vectors(6, count=7, seed=9)[0]
  tails = scorer.compare(scorer.tail_queries(h, r), candidates)  # [4, 7]
  heads = scorer.compare(scorer.head_queries(r, t), candidates)
  for i in range(4):
    np.testing.assert_allclose(tails[i], scorer.score(h[i], r[i], candidates), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(heads[i], scorer.score(candidates, r[i], t[i]), rtol=1e-4, atol=1e-5)


def _triples(count, config, seed):
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, config.num_entities, count), rng.integers(0, config.num_relations, count),
                   rng.integers(0, config.num_entities, count)], 1).astype(np.int32)


def _batch(triples, weights=None):
  return {"heads": triples[:, 0], "relations": triples[:, 1], "tails": triples[:, 2],
          "weights": np.ones(len(triples), np.float32) if weights is None else weights}


def _direct_loss(config, params, batch, uniform):
  """Per-triple loops over the chunked negatives, in float64."""
  scorer = SCORERS[config.scoring]
  E, Rel = (np.asarray(params[k], np.float64) for k in ("entities", "relations"))
  heads, relations, tails, weights = batch["heads"], batch["relations"], batch["tails"], batch["weights"]
  total = regularized = 0.0
  for i in range(len(heads)):
    chunk = i // config.chunk_size
    mates = [j for j in range(chunk * config.chunk_size, (chunk + 1) * config.chunk_size) if j != i and weights[j]]
    h, r, t = E[heads[i]], Rel[relations[i]], E[tails[i]]
    positive = float(scorer.score(h, r, t))
    loss = 0.0
    for side, (own, corrupt) in enumerate(((tails, lambda e: scorer.score(h, r, e)),
                                           (heads, lambda e: scorer.score(e, r, t)))):
      candidates = list(uniform[side, chunk]) + [own[j] for j in mates]
      scores = np.array([float(corrupt(E[e])) for e in candidates])
      if config.loss == "softmax":
        loss += np.log(np.exp(positive) + np.exp(scores).sum()) - positive
      else:
        loss += np.maximum(0.0, config.margin - positive + scores).sum()
    total += weights[i] * loss
    moduli = [np.abs(v) if config.scoring != "complex" else np.hypot(v[:len(v) // 2], v[len(v) // 2:])
              for v in (h, r, t)]
    power = {"none": 0, "l2": 2, "n3": 3}[config.regularization]
    if power:
      regularized += weights[i] * config.regularization_weight * sum((m ** power).sum() for m in moduli)
  return total, regularized


@pytest.mark.parametrize("scoring,loss,regularization", [("distmult", "softmax", "n3"), ("complex", "margin", "l2"),
                                                         ("transe", "softmax", "none")])
def test_chunked_negatives_loss_equals_a_direct_computation(scoring, loss, regularization):
  config = KGConfig(num_entities=20, num_relations=3, dim=6, scoring=scoring, loss=loss, margin=0.5,
                    regularization=regularization, regularization_weight=0.01, chunk_size=4, uniform_negatives=3,
                    entity_row_multiple=8, init_stddev=0.5)
  params = kg.init(config, jax.random.key(1))
  weights = np.ones(12, np.float32)
  weights[-2:] = 0.0  # padding: neither counted nor used as an in-batch negative
  batch = _batch(_triples(12, config, seed=2), weights)
  rng = jax.random.key(5)
  _, sums = kg_model.KGEmbeddingModel(config).loss(params, batch, rng)
  uniform = np.asarray(negatives.uniform_negatives(rng, negatives.num_chunks(12, config), config))
  expected_loss, expected_regularization = _direct_loss(config, params, batch, uniform)
  assert float(sums["weight_sum"]) == 10
  np.testing.assert_allclose(float(sums["loss_sum"]), expected_loss, rtol=2e-5)
  np.testing.assert_allclose(float(sums["z_loss_sum"]), expected_regularization, rtol=2e-5, atol=1e-9)


# ---- which rows change ---------------------------------------------------------------------------------------

# Only in-batch negatives, so a batch touches exactly the entities and relations it names.
ROWS_CONFIG = KGConfig(num_entities=16, num_relations=4, dim=4, chunk_size=4, uniform_negatives=0,
                       entity_row_multiple=8, init_stddev=0.5)
BATCH_A = np.array([[0, 0, 1], [2, 0, 3], [4, 1, 5], [6, 1, 7]], np.int32)  # entities 0-7, relations 0-1
BATCH_B = np.array([[8, 2, 9], [10, 2, 11], [12, 3, 13], [14, 3, 8]], np.int32)  # entities 8-14, relations 2-3


def _changed_rows_in_second_step(optimizer_name):
  model = kg_model.KGEmbeddingModel(ROWS_CONFIG)
  optimizer = training.make_optimizer(optax.constant_schedule(0.1), optimizer=optimizer_name, weight_decay=0.0)
  params = kg.init(ROWS_CONFIG, jax.random.key(0))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: model.loss(p, batch, jax.random.key(0))[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = step(params, opt_state, _batch(BATCH_A))
  after_a = jax.tree.map(np.asarray, params)
  params, _ = step(params, opt_state, _batch(BATCH_B))
  return {name: set(np.flatnonzero(np.any(np.asarray(params[name]) != after_a[name], axis=1)))
          for name in ("entities", "relations")}


@pytest.mark.parametrize("optimizer_name", ["adagrad", "row_adagrad"])
def test_adagrad_changes_only_the_rows_a_batch_touches(optimizer_name):
  changed = _changed_rows_in_second_step(optimizer_name)
  assert changed == {"entities": set(range(8, 15)), "relations": {2, 3}}


def test_adam_moves_rows_the_batch_does_not_touch():
  """Why the KG family trains with Adagrad: Adam's moments from batch A keep moving A's rows during batch B."""
  changed = _changed_rows_in_second_step("adamw")
  assert set(range(8)) <= changed["entities"] and {0, 1} <= changed["relations"]


def test_row_adagrad_state_is_one_accumulator_per_row_sharded_like_the_table():
  config = KGConfig(num_entities=30, num_relations=3, dim=8, entity_row_multiple=8)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
  optimizer = training.make_optimizer(optimizer="row_adagrad")
  abstract, shardings = training.state_shardings(kg_model.KGEmbeddingModel(config), optimizer, mesh)
  accumulators = [leaf for leaf in jax.tree.leaves(abstract.opt_state) if leaf.ndim == 2]
  assert sorted(leaf.shape for leaf in accumulators) == [(3, 1), (32, 1)]
  assert shardings.params["entities"].spec == jax.sharding.PartitionSpec(("data", "fsdp", "tensor"), None)
  entity_accumulator = [s for s in jax.tree.leaves(shardings.opt_state) if s.spec == shardings.params["entities"].spec]
  assert entity_accumulator  # the [32, 1] accumulator is split by rows like its table


# ---- meshes --------------------------------------------------------------------------------------------------

MESH_CONFIG = KGConfig(num_entities=60, num_relations=5, dim=8, scoring="complex", chunk_size=4, uniform_negatives=6,
                       regularization="n3", regularization_weight=1e-3, entity_row_multiple=8, init_stddev=0.3)


def _train_on(devices, mesh_sizes, batches):
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes), devices=jax.devices()[:devices])
  model = kg_model.KGEmbeddingModel(MESH_CONFIG)
  optimizer = training.make_optimizer(optax.constant_schedule(0.05), optimizer="row_adagrad", weight_decay=0.0)
  steps = training.make_sharded_steps(model, optimizer, mesh)
  state = training.create_train_state(model, optimizer, mesh, seed=3)
  losses = []
  for batch in batches:
    state, metrics = steps.train(state, training.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  assert state.params["entities"].sharding.shard_shape((64, 8)) == (64 // devices, 8)
  return losses, jax.tree.map(np.asarray, state.params)


def test_sharded_training_on_4_and_8_devices_equals_1_device():
  batches = [_batch(_triples(32, MESH_CONFIG, seed=0))] * 3  # fresh uniform negatives each step, from the state's rng
  reference_losses, reference_params = _train_on(1, dict(data=1), batches)
  assert reference_losses[-1] < reference_losses[0]
  for devices, mesh_sizes in ((4, dict(data=2, fsdp=2, tensor=1)), (8, dict(data=2, fsdp=2, tensor=2))):
    losses, params = _train_on(devices, mesh_sizes, batches)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for name in params:
      np.testing.assert_allclose(params[name], reference_params[name], atol=2e-6, err_msg=f"{devices} devices: {name}")


@pytest.mark.parametrize("make_step", ["dense", "sparse"])
def test_a_step_never_holds_the_whole_entity_table_on_one_device(make_step):
  """The step reads the rows it needs from each device's shard: neither arguments nor temporaries hold the table;
  the sparse step's temporaries hold the batch's rows only, no table-shard-sized gradient."""
  config = KGConfig(num_entities=65536, num_relations=2, dim=64, chunk_size=4, uniform_negatives=4)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
  model = kg_model.KGEmbeddingModel(config)
  optimizer = training.make_optimizer(optax.constant_schedule(0.1), optimizer="row_adagrad")
  steps = training.make_sharded_steps(model, optimizer, mesh,
                                      make_step={"dense": training.dense_step, "sparse": kg.sparse_step}[make_step])
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), steps.abstract_state,
                       steps.state_shardings)
  batch = {name: jax.ShapeDtypeStruct((64,), np.float32 if name == "weights" else np.int32,
                                      sharding=training.batch_sharding(mesh))
           for name in ("heads", "relations", "tails", "weights")}
  memory = steps.train.lower(state, batch).compile().memory_analysis()
  table = config.entity_rows * config.dim * 4
  assert memory.argument_size_in_bytes < table / 4  # the shard, its accumulators, the batch
  if make_step == "dense":
    assert memory.temp_size_in_bytes < table / 2  # the gradient's shard and its scaled copy, not the table
  else:  # 64 heads, 64 tails, 2 x 16 x 4 negatives: 256 rows of 256 bytes, a few copies; a shard is 2 MiB
    assert memory.temp_size_in_bytes < table / 8 / 8


# ---- the family's sparse row update ----------------------------------------------------------------------------

SPARSE_CONFIG = dataclasses.replace(MESH_CONFIG, num_entities=200)  # many rows that two steps do not read

def _run_steps(make_step, optimizer_name, devices, batches):
  """(initial entity table, params and optimizer state after `batches`, the entity ids the steps read) on a
  data=`devices` mesh."""
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=devices), devices=jax.devices()[:devices])
  model = kg_model.KGEmbeddingModel(SPARSE_CONFIG)
  optimizer = training.make_optimizer(optax.constant_schedule(0.05), optimizer=optimizer_name, weight_decay=0.0)
  steps = training.make_sharded_steps(model, optimizer, mesh, make_step=make_step)
  state = training.create_train_state(model, optimizer, mesh, seed=3)
  assert state.params["entities"].sharding.shard_shape((200, 8)) == (200 // devices, 8)
  initial, read = np.asarray(state.params["entities"]), set()
  for batch in batches:
    read |= set(np.asarray(model.entity_ids(batch, jax.random.split(state.rng)[1])).tolist())  # the step's rng
    state, _ = steps.train(state, training.global_batch(batch, mesh))
  return initial, jax.tree.map(np.asarray, (state.params, state.opt_state)), read


@pytest.mark.parametrize("optimizer_name", ["row_adagrad", "adagrad"])
@pytest.mark.parametrize("devices", [1, 8])
def test_sparse_step_equals_the_dense_step_and_leaves_unread_rows_bitwise(optimizer_name, devices):
  triples = _triples(32, dataclasses.replace(SPARSE_CONFIG, num_entities=24), seed=4)  # 24-199: negatives only
  triples[:8, 0] = 5  # one head eight times, also a tail: duplicate rows in a batch
  triples[8:12, 2] = 5
  batches = [_batch(triples), _batch(triples[::-1].copy())]
  _, dense, _ = _run_steps(training.dense_step, optimizer_name, devices, batches)
  initial, sparse, read = _run_steps(sparse_updates.sparse_only_step, optimizer_name, devices, batches)
  for expected, actual in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse)):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)
  unread = sorted(set(range(SPARSE_CONFIG.entity_rows)) - read)
  assert len(unread) > 40
  np.testing.assert_array_equal(sparse[0]["entities"][unread], initial[unread])
  assert not np.array_equal(sparse[0]["entities"][5], initial[5])


def test_sparse_step_skips_a_non_finite_step_like_the_dense_one():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
  model = kg_model.KGEmbeddingModel(MESH_CONFIG)
  optimizer = training.make_optimizer(optax.constant_schedule(0.05), optimizer="row_adagrad", weight_decay=0.0)
  steps = training.make_sharded_steps(model, optimizer, mesh, make_step=sparse_updates.sparse_only_step)
  state = training.create_train_state(model, optimizer, mesh, seed=3)
  state = state.replace(params=dict(state.params, entities=state.params["entities"].at[7].set(np.nan)))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  triples = _triples(32, MESH_CONFIG, seed=0)
  triples[0, 0] = 7
  state, metrics = steps.train(state, training.global_batch(_batch(triples), mesh))
  assert not bool(metrics["finite"]) and int(state.skipped_steps) == 1
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(new), old)


def test_the_family_step_is_dense_where_the_sparse_one_would_differ():
  model = kg_model.KGEmbeddingModel(MESH_CONFIG)
  adagrad = training.make_optimizer(optax.constant_schedule(0.05), optimizer="adagrad", weight_decay=0.0)
  adamw = training.make_optimizer(optax.constant_schedule(0.05), optimizer="adamw", weight_decay=0.0)
  assert kg.sparse_step(model, adamw).func is training.train_step  # its moments move unread rows
  assert kg.sparse_step(model, adagrad, num_microbatches=2).func is training.train_step
  with pytest.raises(ValueError, match="AdamW's moments move them"):
    sparse_updates.sparse_only_step(model, adamw)


@pytest.mark.parametrize("num_entities,sparse", [(200, False), (65536, True)])
def test_the_family_step_is_sparse_where_a_batch_reads_at_most_half_a_device_s_rows(num_entities, sparse):
  """32 triples in chunks of 4 read 2 x 32 + 2 x 8 x 6 = 160 rows: more than half of 200 / 8, less than 65536 / 8.
  Only the sparse step sorts (jnp.unique of the ids)."""
  config = dataclasses.replace(MESH_CONFIG, num_entities=num_entities)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
  model = kg_model.KGEmbeddingModel(config)
  optimizer = training.make_optimizer(optax.constant_schedule(0.05), optimizer="row_adagrad", weight_decay=0.0)
  steps = training.make_sharded_steps(model, optimizer, mesh, make_step=kg.sparse_step)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), steps.abstract_state,
                       steps.state_shardings)
  batch = {name: jax.ShapeDtypeStruct((32,), np.float32 if name == "weights" else np.int32,
                                      sharding=training.batch_sharding(mesh))
           for name in ("heads", "relations", "tails", "weights")}
  assert (" sort(" in steps.train.lower(state, batch).compile().as_text()) == sparse
