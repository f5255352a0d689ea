"""CPM-LM's training data: packed LM batches (cpm_jax.data.pipeline) from a TFDS text dataset."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator

import gin

from cpm_jax.data import pipeline, sources
from cpm_jax.model_fit import Requirement
from cpm_jax.tokenization import CPMTokenizer


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LMData:
  """Packed LM batches from a TFDS text dataset (default: the embedded People's Daily demo corpus)."""

  tokenizer_path: str = gin.REQUIRED
  dataset: str = "peoples_daily_1998"
  data_dir: str = "~/tensorflow_datasets"
  train_split: str = "train"
  eval_split: str = "validation"
  seq_len: int = 256
  global_batch_size: int = 8
  max_documents: int | None = None
  eval_max_documents: int | None = None

  @property
  def tokenizer(self) -> CPMTokenizer:
    return CPMTokenizer(os.path.expanduser(self.tokenizer_path))

  def checkpoint_metadata(self) -> dict:
    """Recorded with the model in the workdir, for evaluate.py / generate.py."""
    return {"tokenizer": self.tokenizer_path}

  def model_requirements(self) -> tuple[Requirement, ...]:
    """What the batches need of CPMConfig (cpm_jax.model_fit): the tokenizer's ids, seq_len positions."""
    return (Requirement("vocab_size", self.tokenizer.vocab_size,
                        f"the tokenizer LMData.tokenizer_path = {self.tokenizer_path!r}", ("inputs", "targets"),
                        adopt=True),
            Requirement("max_positions", self.seq_len, f"LMData.seq_len = {self.seq_len}", ("positions",)))

  def _source(self, split: str):
    return sources.load_split(self.dataset, split, os.path.expanduser(self.data_dir))

  def train_iterator(self, seed: int) -> Iterator[dict]:
    return pipeline.make_lm_iterator(self._source(self.train_split), self.tokenizer, seq_len=self.seq_len,
                                     global_batch_size=self.global_batch_size, seed=seed,
                                     max_documents=self.max_documents)

  def eval_batches(self) -> Iterable[dict]:
    return pipeline.make_eval_iterator(self._source(self.eval_split), self.tokenizer, seq_len=self.seq_len,
                                       global_batch_size=self.global_batch_size,
                                       max_documents=self.eval_max_documents)
