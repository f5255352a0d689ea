"""CPM-LM's training data: packed LM batches (cpm_jax.data.pipeline) from a text dataset, and label-prompt rows
(a classification dataset as the prompts its LabelPromptTask scores, the loss on the label words only)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator

import gin
import grain
import numpy as np

from cpm_jax.data import pipeline, processes, sources, splits
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
    name = type(self).__name__  # LabelPromptData shares this
    return (Requirement("vocab_size", self.tokenizer.vocab_size,
                        f"the tokenizer {name}.tokenizer_path = {self.tokenizer_path!r}", ("inputs", "targets"),
                        adopt=True),
            Requirement("max_positions", self.seq_len, f"{name}.seq_len = {self.seq_len}", ("positions",)))

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


def label_prompt_row(example: dict, *, tokenizer: CPMTokenizer, seq_len: int, template: tuple[str, str],
                     label_field: str, label_map: dict[str, str]) -> dict[str, np.ndarray]:
  """One example as a row of `seq_len`: the template's context, then its continuation with the example's label
  words; only the continuation's tokens are targets (weight 1). A long context loses its first tokens, as the
  scorer's prompts do."""
  text = {k: sources.as_text(v) for k, v in example.items()}
  label = text[label_field]
  if label not in label_map:
    raise ValueError(f"LabelPromptData: label {label!r} (field {label_field!r}) is not in label_map "
                     f"{sorted(label_map)}.")
  fields = {**text, "label": label_map[label]}
  context, continuation = (tokenizer.encode(part.format(**fields)) for part in template)
  tokens = np.asarray((context + continuation)[-(seq_len + 1):], np.int32)
  length = len(tokens) - 1
  row = {"inputs": tokens[:-1], "targets": tokens[1:],
         "weights": (np.arange(length) >= length - len(continuation)).astype(np.float32),
         "segment_ids": np.ones(length, np.int32), "positions": np.arange(length, dtype=np.int32)}
  return {k: np.pad(v, (0, seq_len - length)) for k, v in row.items()}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LabelPromptData(SplitData):
  """Prompt-style fine-tuning for label-prompt classification (evaluation.tasks.LabelPromptTask): every example of a
  labelled dataset (default review_sentiment) becomes `template` = (context, continuation), filled with its fields
  and {label} = its label words, one example a row; the loss counts only the continuation (the label words), so the
  LM learns to put them after the context. Bind the template the evaluation task scores with.
  eval_max_examples: read only that many examples of the eval split, spaced evenly over it (splits.spread)."""

  tokenizer_path: str = gin.REQUIRED
  dataset: str = "review_sentiment"
  template: tuple[str, str] = ("{text}\n总体评价：", "{label}")
  label_field: str = "label"
  label_map: dict = dataclasses.field(default_factory=lambda: {0: "差评", 1: "好评"})
  eval_max_examples: int | None = None

  tokenizer = LMData.tokenizer
  checkpoint_metadata = LMData.checkpoint_metadata
  model_requirements = LMData.model_requirements

  def _rows(self, split: str) -> tuple[grain.MapDataset, Any]:
    examples = grain.MapDataset.source(self.source(split, ("text", self.label_field)))
    return examples, functools.partial(label_prompt_row, tokenizer=self.tokenizer, seq_len=self.seq_len,
                                       template=tuple(self.template), label_field=self.label_field,
                                       label_map={str(k): v for k, v in self.label_map.items()})

  def train_iterator(self, seed: int) -> Iterator[dict]:
    """This process's share of the train split, shuffled with `seed`, repeated for ever, in full batches."""
    index, count, rows = self.process_share()
    examples, row = self._rows(self.train_split)
    shuffled = processes.process_examples(examples, index, count).shuffle(seed).repeat()
    return iter(shuffled.map(row).to_iter_dataset().batch(rows, drop_remainder=True))

  def eval_batches(self) -> Iterable[dict]:
    """One pass over (eval_max_examples of) the eval split: this process's rows of each global batch."""
    index, count, _ = self.process_share()
    examples, row = self._rows(self.eval_split)
    batches = splits.spread(examples, self.eval_max_examples).map(row).to_iter_dataset().batch(self.global_batch_size)
    return iter(processes.process_rows(batches, self.global_batch_size, index, count))
