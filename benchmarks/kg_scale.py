"""A 10M-entity KG table trained sharded 8 ways on CPU: per-device memory against XLA's, throughput, ranking.

A synthetic graph (numpy Generator(seed): heads and tails skewed, P(popularity rank k) ~ 1/k, relations uniform) trains
KGEmbeddingModel (DistMult, PyTorch-BigGraph negatives: chunks of 100 positives share 100 uniform entities plus
the chunk's own, per side) with row-wise Adagrad through `training.make_sharded_steps` on a data=8 mesh: the
entity table's rows, its Adagrad accumulators and the batch are split over the 8 devices. The step (--step) is the
sparse row update (kg/sparse_updates.py: only the rows a batch reads are gathered, updated and written back; what
the KG family trains with at these sizes), the generic dense step (a table-sized gradient), or both, each batch
through both in turn. dim
64 by default: the table is 2.56 GB, row Adagrad's state 40 MB (the dense step adds two table-sized temporaries),
the graph 0.6 GB and its epoch permutation 0.4 GB: it fits a 24 GB machine with room to spare.

Printed: per device, the bytes of the live arrays it holds (state, measured from the shards) against the compiled
step's memory_analysis() (arguments, outputs, temporaries, aliasing), the process's peak RSS against 8 x XLA's
per-device peak, loss by step, and training triples/s (with --step=both: their ratio and how far the two states
are apart); then filtered ranks of `eval_queries` held-out triples over all 10M entities in sharded blocks (the
[queries, entities] score matrix would be queries x 40 MB): the known-triple index's time, the ranking's
compilation, and its queries/s.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/kg_scale.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_integer("num_entities", 10_000_000, "Entities of the synthetic graph.")
flags.DEFINE_integer("num_triples", 50_000_000, "Training triples of the synthetic graph.")
flags.DEFINE_integer("num_relations", 1000, "Relations of the synthetic graph.")
flags.DEFINE_integer("dim", 64, "Floats per vector.")
flags.DEFINE_integer("batch_size", 100_000, "Global positives per step.")
flags.DEFINE_integer("chunk_size", 100, "Positives sharing their negatives.")
flags.DEFINE_integer("uniform", 100, "Uniform negatives per chunk and side.")
flags.DEFINE_integer("steps", 20, "Timed training steps (after 2 untimed).")
flags.DEFINE_integer("eval_queries", 256, "Held-out triples ranked (tail side) over all entities; 0 skips.")
flags.DEFINE_integer("eval_query_batch", 64, "Queries ranked at a time (ranking.filtered_ranks' query_batch).")
flags.DEFINE_integer("eval_block_size", 8192, "Entity rows each device scores at a time.")
flags.DEFINE_integer("seed", 0, "Graph and model seed.")
flags.DEFINE_string("optimizer", "row_adagrad", "make_optimizer.optimizer: row_adagrad, adagrad or adamw.")
flags.DEFINE_enum("step", "sparse", ["sparse", "dense", "both"],
                  "The train step: the KG sparse row update (what experiments/train.py runs where a batch reads at "
                  "most half a device's rows), the generic dense one (training.dense_step), or both in the same run "
                  "(each batch through both, alternating).")
flags.DEFINE_bool("compile_only", False, "Only compile the step from abstract arrays (nothing allocated) and print "
                  "XLA's per-device memory: the plan for sizes this machine cannot hold (CPM-KM's 84.75M x 256).")
FLAGS = flags.FLAGS

GiB = 1 << 30


def synthetic_graph(num_triples: int, num_entities: int, num_relations: int, seed: int):
  """[n, 3] int32 (head, relation, tail): heads and tails of popularity rank k with probability ~ 1/k (rank
  exp(u ln N) for uniform u, over a fixed random relabelling of the entities: a few hubs, a long tail), relations
  uniform; deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  relabel = rng.permutation(num_entities).astype(np.int32)
  triples = np.empty((num_triples, 3), np.int32)
  for column in (0, 2):
    ranks = np.exp(rng.random(num_triples, np.float32) * np.float32(np.log(num_entities))).astype(np.int64) - 1
    triples[:, column] = relabel[np.minimum(ranks, num_entities - 1)]
  triples[:, 1] = rng.integers(0, num_relations, num_triples, dtype=np.int32)
  return triples


def per_device_bytes(tree) -> dict:
  totals: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals


def print_xla_memory(analysis) -> dict:
  xla = {name: getattr(analysis, f"{name}_size_in_bytes") for name in ("argument", "output", "alias", "temp")}
  xla["peak"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
  print("XLA per device (GiB): " + "  ".join(f"{name} {value / GiB:.3f}" for name, value in xla.items()))
  return xla


def main(_):
  import optax
  from cpm_jax import partitioning, training
  from cpm_jax.models.kg import data, model, ranking, sparse_updates
  from cpm_jax.models.kg.config import KGConfig

  print(f"{jax.device_count()} devices; load average {os.getloadavg()}")
  config = KGConfig(num_entities=FLAGS.num_entities, num_relations=FLAGS.num_relations, dim=FLAGS.dim,
                    chunk_size=FLAGS.chunk_size, uniform_negatives=FLAGS.uniform)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=jax.device_count()))
  kg = model.KGEmbeddingModel(config)
  optimizer = training.make_optimizer(optax.constant_schedule(0.1), optimizer=FLAGS.optimizer, weight_decay=0.0)
  names = ("sparse", "dense") if FLAGS.step == "both" else (FLAGS.step,)
  make_step = {"sparse": sparse_updates.sparse_only_step, "dense": training.dense_step}
  steps = {name: training.make_sharded_steps(kg, optimizer, mesh, make_step=make_step[name]) for name in names}
  some_steps = steps[names[0]]
  batch_sharding = training.batch_sharding(mesh)
  abstract_batch = {name: jax.ShapeDtypeStruct((FLAGS.batch_size,), np.float32 if name == "weights" else np.int32,
                                               sharding=batch_sharding)
                    for name in ("heads", "relations", "tails", "weights")}
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                some_steps.abstract_state, some_steps.state_shardings)
  table_bytes = config.entity_rows * config.dim * 4
  optimizer_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(some_steps.abstract_state.opt_state))
  print(f"entity table {config.entity_rows:,} x {config.dim} float32 = {table_bytes / GiB:.2f} GiB "
        f"({table_bytes / GiB / jax.device_count():.2f} per device), optimizer state {optimizer_bytes / GiB:.3f} GiB, "
        f"rows split {jax.device_count()} ways: {some_steps.state_shardings.params['entities'].spec}")
  compiled, xla = {}, {}
  for name in names:
    start = time.perf_counter()
    compiled[name] = steps[name].train.lower(abstract_state, abstract_batch).compile()
    print(f"{name} step ({FLAGS.optimizer}, batch {FLAGS.batch_size:,}): compiled in {time.perf_counter() - start:.1f} s")
    xla[name] = print_xla_memory(compiled[name].memory_analysis())
  if FLAGS.compile_only:
    return

  start = time.perf_counter()
  graph = synthetic_graph(FLAGS.num_triples + FLAGS.eval_queries, FLAGS.num_entities, FLAGS.num_relations, FLAGS.seed)
  train, held_out = graph[:FLAGS.num_triples], graph[FLAGS.num_triples:]
  print(f"synthetic graph: {FLAGS.num_entities:,} entities, {FLAGS.num_relations} relations, {len(train):,} triples "
        f"({time.perf_counter() - start:.1f} s)")
  states = {name: training.create_train_state(kg, optimizer, mesh, seed=FLAGS.seed) for name in names}
  iterator = data.make_triple_iterator(train, FLAGS.batch_size, seed=FLAGS.seed)
  batch = training.global_batch(next(iterator), mesh)
  held = per_device_bytes((states[names[0]], batch))
  argument = xla[names[0]]["argument"]
  print("bytes each device holds (state + batch, from its shards) against XLA's argument bytes:")
  for device in sorted(held, key=lambda d: d.id):
    print(f"  {str(device):8} {held[device] / GiB:.4f} GiB  ({held[device] / argument:.4f} of XLA's)")
  mismatch = max(abs(held[device] - argument) for device in held) / argument
  print(f"largest difference {100 * mismatch:.3f}% ({'OK' if mismatch < 0.01 else 'MISMATCH'})")

  # Each batch goes through every step in turn, alternating which goes first: the same work, the same load.
  losses = {name: [] for name in names}
  times = {name: [] for name in names}
  for step in range(FLAGS.steps + 2):
    for name in names[::-1] if step % 2 else names:
      begin = time.perf_counter()
      states[name], metrics = compiled[name](states[name], batch)
      losses[name].append(float(metrics["loss"]))  # waits for the step
      times[name].append(time.perf_counter() - begin)
    batch = training.global_batch(next(iterator), mesh)
    print(f"  step {step}: " + "  ".join(f"{name} loss {losses[name][-1]:.4f} {times[name][-1]:.2f} s"
                                         for name in names), flush=True)
  rates = {name: FLAGS.batch_size / statistics.median(times[name][2:]) for name in names}
  for name in names:
    print(f"training, {name} step: {rates[name]:,.0f} triples/s (median step {FLAGS.batch_size / rates[name]:.2f} s "
          f"of {FLAGS.batch_size:,} triples); loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f}")
  print(f"load average {os.getloadavg()}")
  if len(names) == 2:
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                     zip(jax.tree.leaves(states["sparse"]), jax.tree.leaves(states["dense"])))
    print(f"sparse / dense triples/s: {rates['sparse'] / rates['dense']:.2f}x; largest difference of the two states "
          f"after {FLAGS.steps + 2} steps: {difference:.2e}")
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  peaks = " + ".join(f"8 x {xla[name]['peak'] / GiB:.2f}" for name in names)
  print(f"process peak RSS {peak_rss / GiB:.2f} GiB; XLA's per-device peaks {peaks} GiB "
        f"+ graph and permutation {(train.nbytes + 8 * len(train)) / GiB:.2f} GiB")

  if FLAGS.eval_queries:
    params = states[names[0]].params
    begin = time.perf_counter()
    known = ranking.KnownTriples.from_triples([graph], FLAGS.num_relations)
    print(f"known-triple index of {len(graph):,} triples: {time.perf_counter() - begin:.1f} s")
    rank = functools.partial(ranking.filtered_ranks, params, config, side="tail", mesh=mesh,
                             query_batch=FLAGS.eval_query_batch, block_size=FLAGS.eval_block_size)
    begin = time.perf_counter()
    rank(held_out[:FLAGS.eval_query_batch], known)  # compiles
    print(f"ranking compiled and ran its first batch in {time.perf_counter() - begin:.1f} s")
    begin = time.perf_counter()
    ranks = rank(held_out, known)["realistic"]
    seconds = time.perf_counter() - begin
    print(f"filtered tail ranks of {len(held_out)} held-out triples over {FLAGS.num_entities:,} entities "
          f"(entity blocks of {FLAGS.eval_block_size} rows per device, {FLAGS.eval_query_batch} queries a batch): "
          f"{seconds:.1f} s, {len(held_out) / seconds:.1f} queries/s, "
          f"{len(held_out) * FLAGS.num_entities / seconds / 1e9:.2f} G candidate scores/s; "
          f"{ranking.rank_metrics(ranks)}; load average {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
