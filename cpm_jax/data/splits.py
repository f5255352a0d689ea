"""What every family's train-loop data has in common: a dataset with a train and an eval split, rows of `seq_len`
tokens in global batches, and each process's share of them (cpm_jax.data.processes)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import grain

from cpm_jax.data import jsonl, processes, sources


def spread(examples: grain.MapDataset, limit: int | None) -> grain.MapDataset:
  """At most `limit` of `examples` (a grain.MapDataset) spaced evenly over them, in order: splits are often sorted
  by label (review_sentiment's negatives come first), so the first `limit` would see one class only."""
  size = len(examples)
  if not limit or limit >= size:
    return examples
  return grain.MapDataset.range(limit).map(lambda i: examples[i * size // limit])


@dataclasses.dataclass(frozen=True)
class SplitData(processes.ProcessShare):
  """The dataset, splits and batch shape of a family's data class (CPM's LMData, PLUG's StructBertData, ...).

  dataset: a dataset name of cpm_jax.data (peoples_daily_1998, review_sentiment, text_corpus/<name>) in `data_dir`,
  or a jsonl file whose `{split}` is replaced by the split name (e.g. /data/afqmc/{split}.jsonl).
  """

  dataset: str = "peoples_daily_1998"
  data_dir: str = "~/tensorflow_datasets"
  train_split: str = "train"
  eval_split: str = "validation"
  seq_len: int = 128
  global_batch_size: int = 8

  def source(self, split: str, required: Iterable[str] = ("text",)) -> Sequence[Any]:
    """The examples of `split`, randomly accessible; jsonl examples must hold the `required` fields."""
    if self.dataset.endswith(".jsonl"):
      return jsonl.read_examples(self.dataset.format(split=split), required)
    return sources.load_split(self.dataset, split, os.path.expanduser(self.data_dir))
