"""CPM-LM's training data: packed LM batches (cpm_jax.data.pipeline) from a text dataset."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator

import gin

from cpm_jax.data import pipeline
from cpm_jax.data.splits import SplitData
from cpm_jax.model_fit import Requirement
from cpm_jax.tokenization import CPMTokenizer


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LMData(SplitData):
  """Packed LM batches from a text dataset (default: the embedded People's Daily demo corpus; `SplitData` for the
  dataset, splits and batch fields); max_documents / eval_max_documents: read only the first documents."""

  tokenizer_path: str = gin.REQUIRED
  seq_len: int = 256
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

  def train_iterator(self, seed: int) -> Iterator[dict]:
    return pipeline.make_lm_iterator(self.source(self.train_split), self.tokenizer, seq_len=self.seq_len,
                                     global_batch_size=self.global_batch_size, seed=seed,
                                     max_documents=self.max_documents, process_index=self.process_index,
                                     process_count=self.process_count)

  def eval_batches(self) -> Iterable[dict]:
    return pipeline.make_eval_iterator(self.source(self.eval_split), self.tokenizer, seq_len=self.seq_len,
                                       global_batch_size=self.global_batch_size,
                                       max_documents=self.eval_max_documents, process_index=self.process_index,
                                       process_count=self.process_count)
