"""Few-shot recipes for PLUG encoders: train a FewShotModel on a seed's FewCLUE sample with the shared train loop,
evaluate it on the test split through the family's LanguageModel adapter (evaluation.tasks.ClassificationTask), and
orchestrate what happens around training: kNN retrieval (cpm_jax.fewshot.knn), self-training rounds
(cpm_jax.fewshot.pseudo_labels) and distillation from a trained teacher's logits on the unlabelled pool.

A run of seed s writes, under its workdir, round_0/ (a training workdir: checkpoints, model.json, TensorBoard) and
round_1/ ... for self-training. Each round starts from what gin's `train.init_from` (a RestoreCheckpointConfig,
e.g. restore/warm_start.gin on a stage-1 workdir) selects, like any other run of the train loop. Every round_r is an
ordinary checkpoint that experiments/evaluate.py accepts. A second run over the same workdir resumes: rounds whose
training finished are only evaluated again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import gin
import numpy as np
from absl import logging

from cpm_jax import partitioning, train_loop
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import tasks
from cpm_jax.fewshot import knn, pseudo_labels, table
from cpm_jax.models.plug import fewshot_inputs
from cpm_jax.models.plug.fewshot_inputs import FewShotData
from cpm_jax.models.plug.model import FewShotModel


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SelfTraining:
  """After each of `rounds` trainings, pseudo-label the unlabelled pool with the model, keep predictions with
  probability >= threshold, the same number per class (at most max_per_class), and retrain on train + those.
  align: first align the pool's probabilities to the labelled sample's class distribution (pseudo_labels.aligned),
  so that a model biased toward one class still labels every class."""

  rounds: int = 1
  threshold: float = 0.9
  max_per_class: int | None = None
  align: bool = False


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Distillation:
  """A trained teacher's class logits on the unlabelled pool join the student's training examples (the student's
  FewShotModel.distillation_weight / distillation_temperature weigh them). teacher: a checkpoint or training workdir,
  `{seed}` replaced by the seed (the teacher of each seed's sample)."""

  teacher: str = gin.REQUIRED


def _texts(examples: Sequence[dict], fields: Sequence[str]) -> list[tuple[str, ...]]:
  return [tuple(str(example[field]) for field in fields) for example in examples]


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
  return float((np.asarray(probabilities).argmax(-1) == labels).mean()) if len(labels) else math.nan


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FewShotRecipe:
  """One few-shot system: `model` trained on `data` (its task's sample of each seed) with optional kNN, self-training
  and distillation. Training settings (steps, learning rate, the warm start `train.init_from`) are the gin bindings
  of train / learning_rate_schedule / RestoreCheckpointConfig."""

  model: FewShotModel = dataclasses.field(default_factory=FewShotModel)
  data: FewShotData = dataclasses.field(default_factory=FewShotData)
  knn: knn.KnnSearch | None = None
  self_training: SelfTraining | None = None
  distillation: Distillation | None = None
  mesh_config: partitioning.MeshConfig | None = None
  eval_batch_size: int = 64

  def __post_init__(self):
    if self.model.head != self.data.input_format.head:
      raise ValueError(f"FewShotModel.head={self.model.head!r} does not score {type(self.data.input_format).__name__}"
                       f" rows (head {self.data.input_format.head!r}); bind FewShotModel.head to match "
                       "FewShotData.input_format.")

  @property
  def fields(self) -> tuple[str, ...]:
    return self.data.input_format.fields()

  def _language_model(self, checkpoint_dir: str, mesh) -> tuple[Any, dict]:
    checkpoint = model_lib.load_checkpoint(checkpoint_dir, mesh)
    lm = model_lib.language_model(checkpoint, model_lib.load_tokenizer(checkpoint), batch_size=self.eval_batch_size,
                                  mesh=mesh)
    return lm, checkpoint.metadata

  def _teacher_examples(self, data: FewShotData, seed: int, mesh) -> tuple[dict, ...]:
    teacher, metadata = self._language_model(self.distillation.teacher.format(seed=seed), mesh)
    if list(metadata.get("labels", [])) != list(data.task.labels):
      raise ValueError(f"Distillation.teacher {self.distillation.teacher!r} has labels {metadata.get('labels')}; the "
                       f"student's task has {list(data.task.labels)}.")
    fields = fewshot_inputs.format_from_record(metadata["input_format"]).fields()
    logits = teacher.classify(_texts(data.splits.unlabeled, fields))
    return tuple({**example, fewshot_inputs.TEACHER_LOGITS: row.tolist()}
                 for example, row in zip(data.splits.unlabeled, logits))

  def _evaluate(self, lm, data: FewShotData) -> dict:
    """Test and dev accuracy of the model alone and, with `knn`, of the model with kNN retrieval."""
    task = data.task
    classification = tasks.ClassificationTask(name="few-shot", text_fields=self.fields, label_field=task.label_field,
                                              labels=task.labels)
    test = classification.evaluate(lm, data.splits.test)
    results = {"accuracy": test.metrics["accuracy"], "majority_class_accuracy": test.metrics["majority_class_accuracy"],
               "dev_accuracy": classification.evaluate(lm, data.splits.dev).metrics["accuracy"]}
    if self.knn is not None:
      def labels_of(examples):
        return np.array([task.labels.index(task.label_of(e)) for e in examples])

      train, dev, test_examples = data.splits.train, data.splits.dev, data.splits.test
      pool = data.splits.unlabeled
      embeddings = {name: lm.embed(_texts(examples, self.fields))
                    for name, examples in (("train", train), ("pool", pool), ("dev", dev), ("test", test_examples))}
      fitted = self.knn.fit(embeddings["train"], labels_of(train),
                            np.concatenate([embeddings["train"], embeddings["pool"]]), embeddings["dev"],
                            lm.classify(_texts(dev, self.fields)), labels_of(dev), len(task.labels))
      test_logits = lm.classify(_texts(test_examples, self.fields))
      results.update(knn_accuracy=_accuracy(fitted.probabilities(embeddings["test"], test_logits),
                                            labels_of(test_examples)),
                     knn_k=fitted.k, knn_lambda=fitted.lam, knn_dev_accuracy=fitted.dev_accuracy,
                     knn_dim=int(fitted.whitening.transform.shape[1]))
    return results

  def _pseudo_labelled(self, lm, data: FewShotData) -> tuple[dict, ...]:
    pool = data.splits.unlabeled
    probabilities = knn.softmax(lm.classify(_texts(pool, self.fields)))
    prior = None
    if self.self_training.align:
      train_labels = [data.task.labels.index(data.task.label_of(e)) for e in data.splits.train]
      prior = np.bincount(train_labels, minlength=len(data.task.labels)) / len(train_labels)
    indices, labels = pseudo_labels.select(probabilities, self.self_training.threshold,
                                           self.self_training.max_per_class, prior)
    field = data.task.label_field
    return tuple({**pool[i], field: data.task.labels[label]} for i, label in zip(indices, labels))

  def run(self, seed: int, workdir: str) -> dict:
    """Trains and evaluates on seed's sample; returns {"seed", "rounds": [per-round metrics], "seconds", sizes}."""
    start = time.perf_counter()
    mesh = partitioning.make_mesh(self.mesh_config)
    data = dataclasses.replace(self.data, sample_seed=seed)
    if self.distillation is not None:
      data = dataclasses.replace(data, extra_examples=self._teacher_examples(data, seed, mesh))
    base_extra = data.extra_examples
    rounds = []
    for round_index in range(1 + (self.self_training.rounds if self.self_training else 0)):
      round_dir = os.path.join(workdir, f"round_{round_index}")
      table.finished(train_loop.train(round_dir, model=self.model, data=data, seed=seed,
                                      mesh_config=self.mesh_config), round_dir)
      lm, _ = self._language_model(round_dir, mesh)
      results = self._evaluate(lm, data)
      results.update(train_examples=len(data.splits.train), extra_examples=len(data.extra_examples))
      rounds.append(results)
      logging.info("seed %d round %d: %s", seed, round_index, json.dumps(results))
      if self.self_training and round_index < self.self_training.rounds:
        data = dataclasses.replace(data, extra_examples=base_extra + self._pseudo_labelled(lm, data))
    return {"seed": seed, "rounds": rounds, "seconds": time.perf_counter() - start}

