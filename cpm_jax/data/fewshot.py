"""The FewCLUE few-shot protocol over a CLUE-format classification task.

A seed picks the sample: K labelled examples per class for train and K more for dev, the rest of the labelled pool
as the unlabelled pool (labels removed), the test split for evaluation. FewCLUE's own release ships its samples as
files (EPRSTMT: `train_0.json` .. `train_4.json`, `dev_0.json` .. `dev_4.json`, `unlabeled.json`,
`test_public.json`, jsonl with `sentence` and `label` Positive / Negative); `FewShotTask.presampled_train` reads those
instead of sampling. Examples are dicts of the task's fields; each carries its origin under evaluation.tasks.WHERE.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import gin
import numpy as np

from cpm_jax.data import sources
from cpm_jax.evaluation.tasks import WHERE, read_jsonl, sample_examples


def read_split(dataset: str, split: str, data_dir: str) -> list[dict]:
  """A split's examples: `dataset` is a jsonl path template with `{split}` (e.g. /data/eprstmt/{split}.json), or a
  cpm_jax.data TFDS dataset name (e.g. review_sentiment)."""
  if "{split}" in dataset:
    return read_jsonl(os.path.expanduser(dataset.format(split=split)))
  examples = sources.load_examples(dataset, split, os.path.expanduser(data_dir))
  return [{**example, WHERE: f"{dataset}/{split}[{i}]"} for i, example in enumerate(examples)]


@dataclasses.dataclass(frozen=True)
class FewShotSplits:
  """One seed's sample: labelled train and dev, the unlabelled pool (no label field), the test split."""

  train: tuple[dict, ...]
  dev: tuple[dict, ...]
  unlabeled: tuple[dict, ...]
  test: tuple[dict, ...]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FewShotTask:
  """A CLUE-format classification task and how its few-shot sample is drawn.

  dataset / data_dir: see read_split. labels: the label values (compared as strings), in class order.
  shots_per_class: K for train and for dev; None puts every labelled pool example not drawn for dev into train (the
  fully supervised bound). presampled_train / presampled_dev: split names with `{seed}` (FewCLUE: "train_{seed}",
  "dev_{seed}") read as the seed's sample instead of drawing one. unlabeled_split: the unlabelled pool's split
  (FewCLUE: "unlabeled"); None: what the sample left of pool_split. The *_max_examples limits draw seeded subsets
  (the test subset is the same for every seed).
  """

  dataset: str = "review_sentiment"
  data_dir: str = "~/tensorflow_datasets"
  label_field: str = "label"
  labels: tuple[str, ...] = ("0", "1")
  shots_per_class: int | None = 16
  pool_split: str = "train"
  test_split: str = "test"
  presampled_train: str | None = None
  presampled_dev: str | None = None
  unlabeled_split: str | None = None
  unlabeled_max_examples: int | None = None
  test_max_examples: int | None = None

  def label_of(self, example: dict) -> str:
    """The example's label as a string; a clear error naming the example if it has none or an unknown one."""
    if self.label_field not in example:
      raise ValueError(f"{example.get(WHERE, 'an example')}: no label field {self.label_field!r}.")
    label = str(example[self.label_field])
    if label not in self.labels:
      raise ValueError(f"{example.get(WHERE, 'an example')}: label {label!r} (field {self.label_field!r}) is not "
                       f"one of FewShotTask.labels {list(self.labels)}.")
    return label

  def _checked(self, examples: Sequence[dict]) -> tuple[dict, ...]:
    for example in examples:
      self.label_of(example)
    return tuple(examples)

  def _unlabeled(self, examples: Sequence[dict], seed: int) -> tuple[dict, ...]:
    stripped = [{k: v for k, v in e.items() if k != self.label_field} for e in examples]
    return tuple(sample_examples(stripped, self.unlabeled_max_examples, seed))

  def _drawn(self, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, dev, rest) drawn from pool_split: per class, a seeded permutation's first K go to train, the next K
    to dev; the order of the split is kept within each part."""
    pool = read_split(self.dataset, self.pool_split, self.data_dir)
    rng = np.random.default_rng(seed)
    by_label = {label: [] for label in self.labels}
    for i, example in enumerate(pool):
      by_label[self.label_of(example)].append(i)
    train, dev = set(), set()
    for label, indices in by_label.items():
      k = self.shots_per_class
      needed = 1 if k is None else 2 * k
      if len(indices) < needed:
        raise ValueError(f"FewShotTask: {self.dataset} split {self.pool_split!r} has {len(indices)} examples of "
                         f"label {label!r}; shots_per_class={k} needs {needed}.")
      order = rng.permutation(indices)
      if k is None:  # supervised: one dev example per class keeps the train loop's validation meaningful
        dev.add(int(order[0]))
        train.update(int(i) for i in order[1:])
      else:
        train.update(int(i) for i in order[:k])
        dev.update(int(i) for i in order[k:2 * k])
    parts = ([], [], [])
    for i, example in enumerate(pool):
      parts[0 if i in train else 1 if i in dev else 2].append(example)
    return parts

  @functools.lru_cache(maxsize=4)
  def splits(self, seed: int) -> FewShotSplits:
    """The sample of `seed` (cached: the recipes build several data objects of one sample)."""
    if self.presampled_train:
      if not self.presampled_dev or not self.unlabeled_split:
        raise ValueError("FewShotTask.presampled_train needs presampled_dev and unlabeled_split too.")
      train = read_split(self.dataset, self.presampled_train.format(seed=seed), self.data_dir)
      dev = read_split(self.dataset, self.presampled_dev.format(seed=seed), self.data_dir)
      rest = []
    else:
      train, dev, rest = self._drawn(seed)
    unlabeled = read_split(self.dataset, self.unlabeled_split, self.data_dir) if self.unlabeled_split else rest
    test = sample_examples(read_split(self.dataset, self.test_split, self.data_dir), self.test_max_examples, 0)
    return FewShotSplits(self._checked(train), self._checked(dev), self._unlabeled(unlabeled, seed),
                         self._checked(test))
