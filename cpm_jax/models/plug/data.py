"""Grain pipelines for PLUG: StructBERT and PALM pre-training, classification and source -> target fine-tuning.

One example per row (the [CLS] state is at position 0), padded to fixed lengths; batches are dicts of numpy
arrays [per_process_batch, length], per-example labels and their weights [per_process_batch]:
  encoder  inputs, token_types, segment_ids (1 = token, 0 = padding), positions; MLM targets, weights
  StructBERT  relation_labels, relation_weights (objectives.RELATION_*)
  PALM / seq2seq  decoder_inputs ([CLS] + target), decoder_targets (target + [SEP]), decoder_weights,
                  decoder_segment_ids, decoder_positions
  classification  labels, label_weights
Noise is drawn per example from a Generator seeded by (seed, example index), so batches are deterministic;
the iterators are Grain DatasetIterators whose get_state()/set_state() resume exactly (the train loop
checkpoints them). Each process reads its share as in the LM pipeline (cpm_jax.data.processes): its examples for
training, its rows of the same global batches for evaluation.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import gin
import grain
import numpy as np

from cpm_jax.data import processes, sources, splits
from cpm_jax.data.splits import SplitData
from cpm_jax.model_fit import Requirement
from cpm_jax.models.plug import objectives
from cpm_jax.tokenization import BertTokenizer

_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")


def split_sentences(text: str) -> list[str]:
  """Sentences of a paragraph, cut after 。！？!?；; (at least one: the whole text)."""
  return [s for s in _SENTENCE_END.split(text) if s.strip()] or [text]


def halves(text: str, rng: np.random.Generator) -> tuple[str, str]:
  """A paragraph cut in two at a random sentence boundary (at the middle character if one sentence)."""
  sentences = split_sentences(text)
  if len(sentences) == 1:
    middle = max(len(text) // 2, 1)
    return text[:middle], text[middle:]
  cut = int(rng.integers(1, len(sentences)))
  return "".join(sentences[:cut]), "".join(sentences[cut:])


def _pad(values: Sequence[int], length: int, dtype=np.int32) -> np.ndarray:
  out = np.zeros(length, dtype)
  out[:len(values)] = values[:length]
  return out


def _encoder_features(ids: Sequence[int], types: Sequence[int], length: int) -> dict[str, np.ndarray]:
  n = min(len(ids), length)
  return {"inputs": _pad(ids, length), "token_types": _pad(types, length),
          "segment_ids": _pad([1] * n, length), "positions": _pad(list(range(n)), length)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Noise:
  """MLM and word-structural noise settings (StructBERT: 15% MLM; trigram shuffling 0.05-0.1)."""

  mask_rate: float = 0.15
  trigram_probability: float = 0.05


def _noised(ids: np.ndarray, tokenizer: BertTokenizer, noise: Noise, rng: np.random.Generator,
            length: int) -> dict[str, np.ndarray]:
  """MLM targets at shuffled-trigram positions and at masked positions (chosen among the other tokens)."""
  candidates = (ids != tokenizer.cls_id) & (ids != tokenizer.sep_id) & (ids != tokenizer.pad_id)
  inputs, changed = objectives.shuffle_trigrams(ids, rng, candidates=candidates,
                                                probability=noise.trigram_probability)
  inputs, targets, weights = objectives.mask_tokens(
      inputs, rng, candidates=candidates & ~changed, mask_id=tokenizer.mask_id,
      random_ids=(tokenizer.mask_id + 3, tokenizer.vocab_size), rate=noise.mask_rate)
  targets = np.where(changed, ids, targets)
  weights = np.where(changed, 1.0, weights).astype(np.float32)
  return {"inputs": _pad(inputs, length), "targets": _pad(targets, length),
          "weights": _pad(weights, length, np.float32)}


def structbert_example(index_and_text: tuple[int, str], rng: np.random.Generator, *, tokenizer: BertTokenizer,
                       documents: Sequence[Any], seq_len: int, noise: Noise) -> dict[str, np.ndarray]:
  """[CLS] A [SEP] B [SEP] with the sentence relation label, trigram shuffling and MLM noise."""
  index, text = index_and_text
  first, second = halves(text, rng)
  other_index = int(rng.integers(len(documents) - 1))
  other_index += other_index >= index  # any document but this one
  other = halves(sources.as_text(documents[other_index]["text"]), rng)[int(rng.integers(2))]
  a, b, label = objectives.sentence_relation(rng, first, second, other)
  encoded = tokenizer.encode(a, b, max_length=seq_len)
  ids = np.asarray(encoded["input_ids"], np.int32)
  features = _encoder_features(encoded["input_ids"], encoded["token_type_ids"], seq_len)
  features.update(_noised(ids, tokenizer, noise, rng, seq_len))
  features["relation_labels"] = np.asarray(label, np.int32)
  features["relation_weights"] = np.asarray(1.0, np.float32)
  return features


def _decoder_features(target_ids: Sequence[int], tokenizer: BertTokenizer, length: int) -> dict[str, np.ndarray]:
  target_ids = list(target_ids)[:length - 1]
  n = len(target_ids) + 1
  return {"decoder_inputs": _pad([tokenizer.cls_id, *target_ids], length),
          "decoder_targets": _pad([*target_ids, tokenizer.sep_id], length),
          "decoder_weights": _pad([1.0] * n, length, np.float32),
          "decoder_segment_ids": _pad([1] * n, length), "decoder_positions": _pad(list(range(n)), length)}


def palm_example(index_and_text: tuple[int, str], rng: np.random.Generator, *, tokenizer: BertTokenizer,
                 seq_len: int, target_len: int, source_ratio: float, noise: Noise) -> dict[str, np.ndarray]:
  """PALM: [CLS] prefix [SEP] with MLM noise for the encoder; the decoder predicts the continuation.

  The document's first span that fits both sides is split by objectives.palm_split; the source keeps its
  end (next to the continuation) when it must be cut.
  """
  _, text = index_and_text
  tokens = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
  source, target = tokens, []  # a one-token document: the decoder predicts only [SEP]
  if len(tokens) >= 2:
    source, target = objectives.palm_split(tokens[:seq_len - 2 + target_len - 1], source_ratio)
  source = list(source)[-(seq_len - 2):]
  ids = np.asarray([tokenizer.cls_id, *source, tokenizer.sep_id], np.int32)
  features = _encoder_features(ids, [0] * len(ids), seq_len)
  features.update(_noised(ids, tokenizer, dataclasses.replace(noise, trigram_probability=0.0), rng, seq_len))
  features.update(_decoder_features(target, tokenizer, target_len))
  return features


def seq2seq_example(example: Mapping[str, Any], *, tokenizer: BertTokenizer, seq_len: int, target_len: int,
                    source_fields: Sequence[str], target_field: str) -> dict[str, np.ndarray]:
  """Fine-tuning for generation: the source fields joined by [SEP] (e.g. answer [SEP] context) -> target."""
  parts = [sources.as_text(example[field]) for field in source_fields]
  encoded = tokenizer.encode(parts[0], "[SEP]".join(parts[1:]) if len(parts) > 1 else None, max_length=seq_len)
  features = _encoder_features(encoded["input_ids"], encoded["token_type_ids"], seq_len)
  features.update(targets=np.zeros(seq_len, np.int32), weights=np.zeros(seq_len, np.float32))
  target = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(sources.as_text(example[target_field])))
  features.update(_decoder_features(target, tokenizer, target_len))
  return features


def classification_example(example: Mapping[str, Any], *, tokenizer: BertTokenizer, seq_len: int,
                           text_fields: Sequence[str], label_field: str,
                           label_ids: Mapping[str, int]) -> dict[str, np.ndarray]:
  """[CLS] text [SEP] (text_b [SEP]) -> label id (label_ids maps the label's string form)."""
  texts = [sources.as_text(example[field]) for field in text_fields]
  encoded = tokenizer.encode(texts[0], texts[1] if len(texts) > 1 else None, max_length=seq_len)
  label = sources.as_text(example[label_field])
  if label not in label_ids:
    raise ValueError(f"Label {label!r} (field {label_field!r}) is not one of the configured labels "
                     f"{sorted(label_ids)}.")
  features = _encoder_features(encoded["input_ids"], encoded["token_type_ids"], seq_len)
  features.update(labels=np.asarray(label_ids[label], np.int32), label_weights=np.asarray(1.0, np.float32))
  return features


# ---- the data classes --------------------------------------------------------------------------

def _indexed(source: Sequence[Any], field: str | None) -> grain.MapDataset:
  """(index, text) pairs for text tasks; the examples themselves otherwise."""
  dataset = grain.MapDataset.source(source)
  if field is None:
    return dataset
  return grain.MapDataset.range(len(source)).map(lambda i: (i, sources.as_text(source[i][field])))


@dataclasses.dataclass(frozen=True)
class _PlugData(SplitData, abc.ABC):
  """What the train loop needs of a PLUG task (`SplitData` for the dataset, splits and batch fields):
  train_iterator(seed), eval_batches(). max_examples / eval_max_examples: read only that many examples, spaced
  evenly over the split (splits.spread)."""

  vocab_path: str = gin.REQUIRED
  max_examples: int | None = None
  eval_max_examples: int | None = None

  text_field = "text"
  random = True
  token_types = 1  # token types the encoder input uses (2 for sentence pairs)
  vocab_batch_keys = ("inputs", "targets")  # the batch arrays holding token ids

  @functools.cached_property
  def tokenizer(self) -> BertTokenizer:
    return BertTokenizer(os.path.expanduser(self.vocab_path))

  def model_requirements(self) -> tuple[Requirement, ...]:
    """What the batches need of PlugConfig (cpm_jax.model_fit): the vocab's ids, seq_len positions, token types."""
    name = type(self).__name__
    return (Requirement("vocab_size", self.tokenizer.vocab_size, f"the vocab {name}.vocab_path = {self.vocab_path!r}",
                        self.vocab_batch_keys, adopt=True),
            Requirement("max_positions", self.seq_len, f"{name}.seq_len = {self.seq_len}", ("positions",)),
            Requirement("type_vocab_size", self.token_types, f"{name}'s encoder input", ("token_types",)))

  def required_fields(self) -> list[str]:
    return [self.text_field]

  def checkpoint_metadata(self) -> dict:
    """Recorded with the model in the workdir, for evaluate.py / generate.py."""
    return {"tokenizer": self.vocab_path}

  @abc.abstractmethod
  def example_fn(self, source: Sequence[Any]) -> Callable:
    """The per-example transform of `source`'s examples: (index, text), rng -> features if `random`, else
    example -> features."""

  def _examples(self, split: str, limit: int | None) -> tuple[grain.MapDataset, Callable]:
    source = self.source(split, self.required_fields())
    dataset = _indexed(source, self.text_field if self.random else None)
    return splits.spread(dataset, limit), self.example_fn(source)

  def _features(self, dataset: grain.MapDataset, example_fn: Callable, seed: int) -> grain.IterDataset:
    return (dataset.random_map(example_fn, seed=seed) if self.random else dataset.map(example_fn)).to_iter_dataset()

  def train_iterator(self, seed: int) -> grain.DatasetIterator:
    """This process's share of the train split, shuffled with `seed`, repeated for ever, in full batches."""
    index, count, rows = self.process_share()
    dataset, example_fn = self._examples(self.train_split, self.max_examples)
    shuffled = processes.process_examples(dataset, index, count).shuffle(seed).repeat()
    return iter(self._features(shuffled, example_fn, seed).batch(rows, drop_remainder=True))

  def eval_batches(self) -> grain.DatasetIterator:
    """One pass over the eval split in order: this process's rows of each global batch (processes.process_rows)."""
    index, count, _ = self.process_share()
    dataset, example_fn = self._examples(self.eval_split, self.eval_max_examples)
    global_batches = self._features(dataset, example_fn, seed=0).batch(self.global_batch_size)
    return iter(processes.process_rows(global_batches, self.global_batch_size, index, count))


def _decoder_requirements(name: str, target_len: int) -> tuple[Requirement, ...]:
  """The decoder's side of PALM / seq2seq batches: vocab ids, target_len positions."""
  return (Requirement("vocab_size", 0, f"{name}'s decoder", ("decoder_inputs", "decoder_targets")),
          Requirement("max_positions", target_len, f"{name}.target_len = {target_len}", ("decoder_positions",)))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StructBertData(_PlugData):
  """StructBERT batches (stage 1) from a document corpus with one paragraph per example (People's Daily)."""

  noise: Noise = Noise()

  token_types = 2

  def model_requirements(self) -> tuple[Requirement, ...]:
    return (*super().model_requirements(),
            Requirement("num_relations", 3, "StructBertData's sentence relations", ("relation_labels",)))

  def example_fn(self, source: Sequence[Any]) -> Callable:
    """The sentence-relation negatives ("other" documents) come from the same split as the examples."""
    return functools.partial(structbert_example, tokenizer=self.tokenizer, documents=source, seq_len=self.seq_len,
                             noise=self.noise)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PalmData(_PlugData):
  """PALM batches (stage 2): a noised prefix for the encoder, its continuation for the decoder."""

  target_len: int = 32
  source_ratio: float = 0.8
  noise: Noise = Noise()

  def model_requirements(self) -> tuple[Requirement, ...]:
    return (*super().model_requirements(), *_decoder_requirements("PalmData", self.target_len))

  def example_fn(self, source: Sequence[Any]) -> Callable:
    del source  # examples do not look at each other
    return functools.partial(palm_example, tokenizer=self.tokenizer, seq_len=self.seq_len,
                             target_len=self.target_len, source_ratio=self.source_ratio, noise=self.noise)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Seq2SeqData(_PlugData):
  """Source -> target fine-tuning examples (e.g. DuReader question generation: answer [SEP] context -> question)."""

  source_fields: tuple[str, ...] = ("answer", "context")
  target_field: str = "question"
  target_len: int = 32

  random = False

  @property
  def token_types(self) -> int:
    return 2 if len(self.source_fields) > 1 else 1

  def required_fields(self) -> list[str]:
    return [*self.source_fields, self.target_field]

  def model_requirements(self) -> tuple[Requirement, ...]:
    return (*super().model_requirements(), *_decoder_requirements("Seq2SeqData", self.target_len))

  def example_fn(self, source: Sequence[Any]) -> Callable:
    del source  # examples do not look at each other
    return functools.partial(seq2seq_example, tokenizer=self.tokenizer, seq_len=self.seq_len,
                             target_len=self.target_len, source_fields=self.source_fields,
                             target_field=self.target_field)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClassificationData(_PlugData):
  """Sentence(-pair) classification from CLUE-style jsonl or a labelled TFDS dataset (review_sentiment)."""

  dataset: str = "review_sentiment"
  text_fields: tuple[str, ...] = ("text",)
  label_field: str = "label"
  labels: tuple[str, ...] = ("0", "1")

  random = False
  vocab_batch_keys = ("inputs",)  # a classifier's targets are its labels

  @property
  def token_types(self) -> int:
    return 2 if len(self.text_fields) > 1 else 1

  def required_fields(self) -> list[str]:
    return [*self.text_fields, self.label_field]

  def model_requirements(self) -> tuple[Requirement, ...]:
    return (*super().model_requirements(),
            Requirement("num_classes", len(self.labels), f"ClassificationData.labels = {self.labels!r}", ("labels",)))

  def checkpoint_metadata(self) -> dict:
    return {**super().checkpoint_metadata(), "labels": list(self.labels)}

  def example_fn(self, source: Sequence[Any]) -> Callable:
    del source  # examples do not look at each other
    return functools.partial(classification_example, tokenizer=self.tokenizer, seq_len=self.seq_len,
                             text_fields=self.text_fields, label_field=self.label_field,
                             label_ids={label: i for i, label in enumerate(self.labels)})
