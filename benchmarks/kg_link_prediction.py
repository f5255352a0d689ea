"""Link prediction on real KGs: cpm_jax's KG family against PyKEEN (PyTorch), same run, same settings.

On UMLS and Kinships (shipped inside the pykeen wheel; read as kg_triples TFDS datasets), DistMult and ComplEx are
trained by both sides with the same dimension (ComplEx: `dim` floats = dim / 2 complex numbers on both), epochs,
batch size, loss (softmax cross-entropy of each positive among its negatives), negatives per positive,
optimizer (Adagrad, same learning rate) and regularisation, then scored by filtered realistic MRR and Hits@10 on
the test split (filtered by train + valid + test):
- cpm_jax: KGEmbeddingModel through `training.make_sharded_steps` with the family's train step (what
  experiments/train.py runs) on a 1-device mesh, batches from the KG Grain pipeline; negatives as PyTorch-BigGraph
  shares them: chunks of `chunk_size` positives share `uniform` uniformly drawn entities on each side (with
  --in_batch, plus the chunk's other heads/tails); ranks by `ranking.link_prediction`;
- PyKEEN: the same model class with CrossEntropyLoss under its sLCWA training loop with the basic negative sampler
  at twice our negatives per side per positive (each corrupting the head or the tail, so the same number per side),
  torch.optim.Adagrad; ranks by its RankBasedEvaluator.
The defaults are the best of a small grid on UMLS DistMult run on our side (in-batch negatives on/off, 50 to 198
uniform, learning rate 0.1 / 0.3, N3 0 / 3e-3; BUILD.md): in-batch negatives cost 0.04 MRR on these small KGs, whose
popular tails make them false negatives.
PyKEEN's own DistMult defaults (unit-norm entities after every step, L2 on relations) are switched off on its
side so both train the same objective; --pykeen_defaults keeps them instead. Training triples/s count the
positive triples each side processed per second of training (cpm_jax's compilation is timed apart and excluded),
measured in `rounds` short trainings of `speed_epochs` epochs that alternate which side goes first (median); MRR
and Hits@10 come from full trainings of `epochs` epochs, one per seed (median over `seeds`).

Run without the 8-fake-device flag (plain XLA_FLAGS):
  .venv/bin/python benchmarks/kg_link_prediction.py
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

flags.DEFINE_list("datasets", ["umls", "kinships"], "kg_triples configs (pykeen KGs).")
flags.DEFINE_list("models", ["distmult", "complex"], "Scoring functions.")
flags.DEFINE_integer("dim", 128, "Floats per vector on both sides.")
flags.DEFINE_integer("epochs", 50, "Training epochs on both sides.")
flags.DEFINE_integer("batch_size", 500, "Positive triples per step.")
flags.DEFINE_integer("chunk_size", 50, "cpm_jax: positives sharing their negatives.")
flags.DEFINE_integer("uniform", 99, "cpm_jax: uniform negatives per chunk and side.")
flags.DEFINE_bool("in_batch", False, "cpm_jax: also use the chunk's other heads/tails as negatives.")
flags.DEFINE_float("learning_rate", 0.1, "Adagrad learning rate, both sides.")
flags.DEFINE_float("n3", 0.0, "N3 regularisation weight (ours) / PyKEEN LpRegularizer(p=3) weight, per positive.")
flags.DEFINE_bool("pykeen_defaults", False, "Keep PyKEEN's DistMult/ComplEx default constraints and regularizers.")
flags.DEFINE_integer("rounds", 3, "Short timed trainings per side (alternating order); the median is reported.")
flags.DEFINE_integer("speed_epochs", 2, "Epochs of each timed training.")
flags.DEFINE_integer("seeds", 1, "Full trainings per side for MRR / Hits@10 (median).")
flags.DEFINE_string("data_dir", "/tmp/cpm_jax_kg_tfds", "Where the kg_triples datasets are built.")
FLAGS = flags.FLAGS


def _load(dataset: str):
  from cpm_jax.models.kg import data
  from cpm_jax.models.kg.vocabulary import KGVocabulary
  name = f"kg_triples/{dataset}"
  splits = {split: data.load_triples(name, split, FLAGS.data_dir) for split in ("train", "validation", "test")}
  vocabulary = KGVocabulary(data.dataset_directory(name, FLAGS.data_dir))
  return splits, len(vocabulary.entities), len(vocabulary.relations)


def train_ours(splits, num_entities, num_relations, scoring, seed, epochs):
  import jax
  import optax
  from cpm_jax import partitioning, training
  from cpm_jax.models import kg as kg_family
  from cpm_jax.models.kg import data, model, ranking
  from cpm_jax.models.kg.config import KGConfig

  config = KGConfig(num_entities=num_entities, num_relations=num_relations, dim=FLAGS.dim, scoring=scoring,
                    chunk_size=FLAGS.chunk_size, uniform_negatives=FLAGS.uniform, in_batch_negatives=FLAGS.in_batch,
                    regularization="n3" if FLAGS.n3 else "none", regularization_weight=FLAGS.n3, init_stddev=0.1)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
  kg = model.KGEmbeddingModel(config)
  optimizer = training.make_optimizer(optax.constant_schedule(FLAGS.learning_rate), optimizer="adagrad",
                                      weight_decay=0.0, clip_norm=None)
  steps = training.make_sharded_steps(kg, optimizer, mesh, make_step=kg_family.FAMILY.train_step)
  state = training.create_train_state(kg, optimizer, mesh, seed=seed)
  batches_per_epoch = len(splits["train"]) // FLAGS.batch_size
  iterator = data.make_triple_iterator(splits["train"], FLAGS.batch_size, seed=seed)
  start = time.perf_counter()
  compiled = steps.train.lower(state, training.global_batch(next(iterator), mesh)).compile()
  compile_seconds = time.perf_counter() - start
  iterator = data.make_triple_iterator(splits["train"], FLAGS.batch_size, seed=seed)
  start = time.perf_counter()
  for _ in range(epochs * batches_per_epoch):
    state, metrics = compiled(state, training.global_batch(next(iterator), mesh))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  known = ranking.KnownTriples.from_triples(list(splits.values()), num_relations)
  metrics = ranking.link_prediction(state.params, config, splits["test"], known, mesh)
  return {"mrr": metrics["mrr"], "hits_at_10": metrics["hits_at_10"],
          "triples_per_second": epochs * batches_per_epoch * FLAGS.batch_size / seconds,
          "compile_seconds": compile_seconds}


def train_pykeen(splits, num_entities, num_relations, scoring, seed, epochs):
  import torch
  from pykeen.evaluation import RankBasedEvaluator
  from pykeen.losses import CrossEntropyLoss
  from pykeen.models import ComplEx, DistMult
  from pykeen.training import SLCWATrainingLoop
  from pykeen.triples import CoreTriplesFactory

  def mapped(split):
    return torch.from_numpy(splits[split].astype("int64"))

  factory = CoreTriplesFactory.create(mapped("train"), num_entities=num_entities, num_relations=num_relations)
  kwargs = dict(triples_factory=factory, loss=CrossEntropyLoss(), random_seed=seed)
  if not FLAGS.pykeen_defaults:
    kwargs.update(regularizer="lp" if FLAGS.n3 else None,
                  regularizer_kwargs=dict(weight=FLAGS.n3, p=3.0, normalize=False) if FLAGS.n3 else None)
    if scoring == "distmult":
      kwargs.update(entity_constrainer=None)
  model_class, dim = (DistMult, FLAGS.dim) if scoring == "distmult" else (ComplEx, FLAGS.dim // 2)
  model = model_class(embedding_dim=dim, **kwargs)
  optimizer = torch.optim.Adagrad(model.parameters(), lr=FLAGS.learning_rate)
  negatives = 2 * _negatives_per_side()
  loop = SLCWATrainingLoop(model=model, triples_factory=factory, optimizer=optimizer, negative_sampler="basic",
                           negative_sampler_kwargs=dict(num_negs_per_pos=negatives))
  start = time.perf_counter()
  loop.train(triples_factory=factory, num_epochs=epochs, batch_size=FLAGS.batch_size, use_tqdm=False,
             use_tqdm_batch=False)
  seconds = time.perf_counter() - start
  results = RankBasedEvaluator().evaluate(model, mapped("test"), batch_size=256, use_tqdm=False,
                                          additional_filter_triples=[mapped("train"), mapped("validation")])
  return {"mrr": results.get_metric("both.realistic.inverse_harmonic_mean_rank"),
          "hits_at_10": results.get_metric("both.realistic.hits_at_10"),
          "triples_per_second": epochs * len(splits["train"]) / seconds}


def _negatives_per_side() -> int:
  return FLAGS.uniform + (FLAGS.chunk_size - 1 if FLAGS.in_batch else 0)


def main(_):
  import jax
  print(f"devices: {jax.devices()}  load average: {os.getloadavg()}")
  print(f"dim {FLAGS.dim}, {FLAGS.epochs} epochs, batch {FLAGS.batch_size}, negatives per positive and side "
        f"{_negatives_per_side()} (ours: {FLAGS.uniform} uniform per chunk of {FLAGS.chunk_size}"
        f"{' + the chunk' if FLAGS.in_batch else ''}; PyKEEN: {2 * _negatives_per_side()} basic, head or tail), "
        f"Adagrad lr {FLAGS.learning_rate}, N3 {FLAGS.n3}; {FLAGS.rounds} timed rounds of {FLAGS.speed_epochs} epochs")
  rows = []
  for dataset in FLAGS.datasets:
    splits, num_entities, num_relations = _load(dataset)
    for scoring in FLAGS.models:
      trainers = {"cpm_jax": train_ours, "pykeen": train_pykeen}
      runs = {"cpm_jax": [], "pykeen": []}
      for round_index in range(FLAGS.rounds):
        for side in sorted(trainers, reverse=bool(round_index % 2)):
          result = trainers[side](splits, num_entities, num_relations, scoring, round_index, FLAGS.speed_epochs)
          runs[side].append(result["triples_per_second"])
          print(f"  {dataset} {scoring} timed round {round_index} {side}: {result['triples_per_second']:.0f} "
                f"triples/s", flush=True)
      median = {side: {"triples_per_second": statistics.median(speeds)} for side, speeds in runs.items()}
      for side, train in trainers.items():
        results = [train(splits, num_entities, num_relations, scoring, seed, FLAGS.epochs) for seed in range(FLAGS.seeds)]
        for name in ("mrr", "hits_at_10"):
          median[side][name] = statistics.median(r[name] for r in results)
        print(f"  {dataset} {scoring} {side} after {FLAGS.epochs} epochs: " + "  ".join(
            f"{k} {v:.4g}" for k, v in results[-1].items()), flush=True)
      rows.append((dataset, scoring, median))
  print(f"\nload average: {os.getloadavg()}")
  print(f"{'dataset':9} {'model':9} {'MRR ours':>9} {'MRR PyKEEN':>11} {'dMRR':>7} {'H@10 ours':>10} "
        f"{'H@10 PyKEEN':>12} {'triples/s ours':>15} {'PyKEEN':>10} {'speed-up':>9}")
  for dataset, scoring, median in rows:
    ours, theirs = median["cpm_jax"], median["pykeen"]
    print(f"{dataset:9} {scoring:9} {ours['mrr']:9.4f} {theirs['mrr']:11.4f} {ours['mrr'] - theirs['mrr']:+7.4f} "
          f"{ours['hits_at_10']:10.4f} {theirs['hits_at_10']:12.4f} {ours['triples_per_second']:15.0f} "
          f"{theirs['triples_per_second']:10.0f} {ours['triples_per_second'] / theirs['triples_per_second']:8.2f}x")


if __name__ == "__main__":
  app.run(main)
