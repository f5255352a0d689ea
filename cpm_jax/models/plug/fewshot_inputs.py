"""Few-shot inputs for the PLUG encoder: how an example becomes one row (the input formats) and the train loop's data.

Three formats, each a gin-configurable dataclass whose `head` says which FewShotModel head scores it:
  ClsFormat     [CLS] a [SEP] (b [SEP])                                   head "cls": the pooled [CLS] classifier
  PromptFormat  [CLS] template with one [MASK] [SEP], e.g. "感觉很[MASK]。{text}"; label words (好 / 差) are the
                class scores at the [MASK] (PET)                          head "mlm"
  UniMCFormat   [CLS][MASK]option1[MASK]option2...[SEP]question[SEP]text[SEP] (GTS-Engine's UniMC): option tokens
                have token type 1 and block id k (the encoder lets a block see only itself and block 0, the shared
                text), each option's positions restart at 1, the text's continue after the longest option; the
                class scores are the logits of "是" at each option's [MASK]; MLM targets "是" / "非" there
                                                                          head "mlm"
Templates are format strings over the example's fields; the tokens a field fills are the text span (`text_mask`:
sentence embeddings, MLM noise), the rest is fixed. Too long a row cuts the longest field first.

Every row has the same arrays, [seq_len] unless noted:
  inputs, token_types, positions, segment_ids (1 = token), block_ids (0 = shared), text_mask
  score_positions, score_ids [classes]       where and which MLM logit scores each class (head "mlm")
  mlm_positions, mlm_targets, mlm_weights [P] MLM targets (TextMasking on the text; UniMC's options)
  labels, label_weights []                    0 weight for unlabelled (pool) examples
  teacher_logits [classes], teacher_weights []  a teacher's logits, for distillation (examples that carry them)
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import string
from typing import Any, ClassVar, Mapping, Sequence

import gin
import grain
import numpy as np

from cpm_jax.data import processes
from cpm_jax.data.fewshot import FewShotSplits, FewShotTask
from cpm_jax.model_fit import Requirement
from cpm_jax.models.plug import objectives
from cpm_jax.tokenization import BertTokenizer

TEACHER_LOGITS = "teacher_logits"  # the example field holding a teacher's class logits (distillation)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TextMasking:
  """MLM noise on an example's text span: a mask rate drawn per example from `rates` with `probabilities` (UniMC: 0,
  .1, .2, .3 with .3, .3, .25, .15), then BERT's 80/10/10 (objectives.mask_tokens); at most max_predictions."""

  rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
  probabilities: tuple[float, ...] = (0.3, 0.3, 0.25, 0.15)
  max_predictions: int = 20  # BERT's max_predictions_per_seq at 128 tokens

  def __post_init__(self):
    if len(self.rates) != len(self.probabilities) or not np.isclose(sum(self.probabilities), 1.0):
      raise ValueError(f"TextMasking: rates {self.rates} and probabilities {self.probabilities} must pair up and the "
                       "probabilities sum to 1.")


@dataclasses.dataclass
class _Row:
  """A row being built: per token its id, token type, block, position and whether a field filled it."""

  ids: list[int] = dataclasses.field(default_factory=list)
  types: list[int] = dataclasses.field(default_factory=list)
  blocks: list[int] = dataclasses.field(default_factory=list)
  positions: list[int] = dataclasses.field(default_factory=list)
  text: list[bool] = dataclasses.field(default_factory=list)

  def add(self, ids: Sequence[int], *, token_type: int = 0, block: int = 0, text: bool = False,
          first_position: int | None = None) -> None:
    start = (self.positions[-1] + 1 if self.positions else 0) if first_position is None else first_position
    self.ids += ids
    self.types += [token_type] * len(ids)
    self.blocks += [block] * len(ids)
    self.positions += range(start, start + len(ids))
    self.text += [text] * len(ids)


def _pieces(template: str, example: Mapping[str, Any], tokenizer: BertTokenizer) -> list[tuple[list[int], bool]]:
  """(token ids, filled by a field) for the literal and field parts of `template`."""
  pieces = []
  for literal, field, _, _ in string.Formatter().parse(template):
    if literal:
      pieces.append((tokenizer.convert_tokens_to_ids(tokenizer.tokenize(literal)), False))
    if field is not None:
      if field not in example:
        raise ValueError(f"{example.get('_where', 'an example')}: template {template!r} reads field {field!r}, which "
                         f"the example lacks (it has {sorted(k for k in example if not k.startswith('_'))}).")
      pieces.append((tokenizer.convert_tokens_to_ids(tokenizer.tokenize(str(example[field]))), True))
  return pieces


def _fit(pieces: list[tuple[list[int], bool]], room: int, what: str) -> list[tuple[list[int], bool]]:
  """The pieces with field parts cut (the longest first) so that all fit in `room` tokens."""
  fixed = sum(len(ids) for ids, filled in pieces if not filled)
  if fixed > room:
    raise ValueError(f"{what}: its fixed tokens ({fixed}) leave no room in a row of this seq_len.")
  lengths = [len(ids) for ids, _ in pieces]
  fields = [i for i, (_, filled) in enumerate(pieces) if filled]
  excess = fixed + sum(lengths[i] for i in fields) - room
  while excess > 0:
    longest = max(fields, key=lambda i: lengths[i])
    others = max([lengths[i] for i in fields if i != longest], default=0)
    cut = min(excess, max(lengths[longest] - others, 1))
    lengths[longest] -= cut
    excess -= cut
  return [(ids[:n], filled) for (ids, filled), n in zip(pieces, lengths)]


def _template_fields(*templates: str) -> tuple[str, ...]:
  names = [field for template in templates for _, field, _, _ in string.Formatter().parse(template) if field]
  return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class InputFormat(abc.ABC):
  """How an example becomes a row. `head` names the FewShotModel head that scores the row."""

  masking: TextMasking | None = None

  kind: ClassVar[str]
  head: ClassVar[str]

  @abc.abstractmethod
  def layout(self, example: Mapping[str, Any], tokenizer: BertTokenizer, seq_len: int,
             num_classes: int) -> tuple[_Row, list[int], list[int]]:
    """(the row, score_positions, score_ids) of an example (the score lists are empty for head "cls")."""

  @abc.abstractmethod
  def fields(self) -> tuple[str, ...]:
    """The example fields the row reads, in order (what LanguageModel.classify's text tuples hold)."""

  def num_option_targets(self, num_classes: int) -> int:
    """How many MLM targets a labelled row has at its score positions (option_targets); none by default."""
    return 0

  def option_targets(self, tokenizer: BertTokenizer, num_classes: int, label: int | None) -> list[int]:
    """MLM targets at the score positions (UniMC: 是 for the true option, 非 for the others); none by default."""
    return []

  def record(self) -> dict:
    """What a checkpoint records of the format (format_from_record reads it back)."""
    return {"kind": self.kind, **dataclasses.asdict(self)}


def _single_token(word: str, tokenizer: BertTokenizer, what: str) -> int:
  ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
  if len(ids) != 1 or ids[0] == tokenizer.unk_id:
    raise ValueError(f"{what} {word!r} must be one token of the vocab; it is {tokenizer.tokenize(word)}.")
  return ids[0]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClsFormat(InputFormat):
  """[CLS] a [SEP] (b [SEP]) from one or two templates (e.g. ("{sentence1}", "{sentence2}") for BUSTM), token
  types 0 / 1: what the pooled [CLS] classifier reads (as ClassificationData builds it)."""

  templates: tuple[str, ...] = ("{text}",)

  kind = "cls"
  head = "cls"

  def fields(self):
    return _template_fields(*self.templates)

  def layout(self, example, tokenizer, seq_len, num_classes):
    if len(self.templates) not in (1, 2):
      raise ValueError(f"ClsFormat.templates: one or two templates, got {self.templates}.")
    parts = [_pieces(t, example, tokenizer) for t in self.templates]
    fitted = _fit([piece for part in parts for piece in part], seq_len - 1 - len(parts), "ClsFormat")
    row = _Row()
    row.add([tokenizer.cls_id])
    for segment, part in enumerate(parts):
      for ids, filled in fitted[:len(part)]:
        row.add(ids, token_type=segment, text=filled)
      fitted = fitted[len(part):]
      row.add([tokenizer.sep_id], token_type=segment)
    return row, [], []


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptFormat(InputFormat):
  """PET: [CLS] template [SEP] with exactly one [MASK] in the template's fixed text (a literal [SEP] in it starts
  token type 1); class c scores the MLM logit of label_words[c] (one token each) at the [MASK]."""

  template: str = "感觉很[MASK]。{text}"
  label_words: tuple[str, ...] = ("差", "好")

  kind = "prompt"
  head = "mlm"

  def fields(self):
    return _template_fields(self.template)

  def layout(self, example, tokenizer, seq_len, num_classes):
    if len(self.label_words) != num_classes:
      raise ValueError(f"PromptFormat.label_words {self.label_words} must name one word per class ({num_classes}).")
    pieces = _fit(_pieces(self.template, example, tokenizer), seq_len - 2, "PromptFormat")
    row = _Row()
    row.add([tokenizer.cls_id])
    token_type = 0
    for ids, filled in pieces:
      for token in ids:
        row.add([token], token_type=token_type, text=filled)
        token_type |= int(token == tokenizer.sep_id and not filled)
    row.add([tokenizer.sep_id], token_type=token_type)
    masks = [i for i, (token, filled) in enumerate(zip(row.ids, row.text)) if token == tokenizer.mask_id and not filled]
    if len(masks) != 1:
      raise ValueError(f"PromptFormat.template {self.template!r} must hold exactly one [MASK]; it has {len(masks)}.")
    words = [_single_token(w, tokenizer, "PromptFormat.label_words:") for w in self.label_words]
    return row, masks * num_classes, words


@gin.configurable
@dataclasses.dataclass(frozen=True)
class UniMCFormat(InputFormat):
  """UniMC (GTS-Engine): [CLS][MASK]option1[MASK]option2...[SEP]question[SEP]text[SEP], one option per class.

  Options (token type 1, block k) see only themselves and the shared tokens; each option's positions restart at 1 and
  the shared tokens after the options continue from 1 + the longest option. Class c scores the logit of yes_word at
  option c's [MASK]; the MLM targets there are yes_word for the true option and no_word for the others, plus
  `masking` on the text (the stated UniMC distribution by default).
  """

  options: tuple[str, ...] = ("差评", "好评")
  question: str = ""
  text_template: str = "{text}"
  yes_word: str = "是"
  no_word: str = "非"
  masking: TextMasking | None = dataclasses.field(default_factory=TextMasking)

  kind = "unimc"
  head = "mlm"

  def fields(self):
    return _template_fields(self.question, self.text_template)

  def layout(self, example, tokenizer, seq_len, num_classes):
    if len(self.options) != num_classes:
      raise ValueError(f"UniMCFormat.options {self.options} must name one option per class ({num_classes}).")
    row = _Row()
    row.add([tokenizer.cls_id])
    score_positions = []
    for k, option in enumerate(self.options, start=1):
      score_positions.append(len(row.ids))
      row.add([tokenizer.mask_id, *tokenizer.convert_tokens_to_ids(tokenizer.tokenize(option))], token_type=1,
              block=k, first_position=1)
    shared_start = 1 + max(row.positions[1:])  # after the longest option
    question = _pieces(self.question, example, tokenizer)
    text = _pieces(self.text_template, example, tokenizer)
    fitted = _fit(question + text, seq_len - len(row.ids) - 3, "UniMCFormat")
    row.add([tokenizer.sep_id], first_position=shared_start)
    for ids, _ in fitted[:len(question)]:
      row.add(ids)  # the question is not the text span, even where a field fills it
    row.add([tokenizer.sep_id])
    for ids, filled in fitted[len(question):]:
      row.add(ids, text=filled)
    row.add([tokenizer.sep_id])
    yes = _single_token(self.yes_word, tokenizer, "UniMCFormat.yes_word")
    return row, score_positions, [yes] * num_classes

  def num_option_targets(self, num_classes):
    return num_classes

  def option_targets(self, tokenizer, num_classes, label):
    if label is None:
      return []
    yes = _single_token(self.yes_word, tokenizer, "UniMCFormat.yes_word")
    no = _single_token(self.no_word, tokenizer, "UniMCFormat.no_word")
    return [yes if c == label else no for c in range(num_classes)]


FORMATS = {cls.kind: cls for cls in (ClsFormat, PromptFormat, UniMCFormat)}


def _from_json(cls: type, values: Mapping[str, Any]) -> Any:
  """cls(**values) with the JSON arrays of the fields cls declares as tuples turned back into tuples."""
  return cls(**{field.name: tuple(values[field.name]) if str(field.type).startswith("tuple") else values[field.name]
                for field in dataclasses.fields(cls) if field.name in values})


def format_from_record(record: Mapping[str, Any]) -> InputFormat:
  """The InputFormat a checkpoint recorded (InputFormat.record)."""
  kind = record.get("kind")
  if kind not in FORMATS:
    raise ValueError(f"input_format kind {kind!r} is none of {sorted(FORMATS)}.")
  masking = record.get("masking")
  return dataclasses.replace(_from_json(FORMATS[kind], record),
                             masking=None if masking is None else _from_json(TextMasking, masking))


def _pad(values: Sequence, length: int, dtype=np.int32) -> np.ndarray:
  out = np.zeros(length, dtype)
  out[:len(values)] = values[:length]
  return out


def num_predictions(input_format: InputFormat, num_classes: int) -> int:
  """P, the length of a row's MLM target arrays: the options' targets plus the text's (at least 1)."""
  text = input_format.masking.max_predictions if input_format.masking else 0
  return max(input_format.num_option_targets(num_classes) + text, 1)


def features(example: Mapping[str, Any], *, input_format: InputFormat, tokenizer: BertTokenizer, seq_len: int,
             num_classes: int, label: int | None, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """The row of `example` (label: its class, None if unlabelled; rng None: no MLM noise, as for prediction)."""
  row, score_positions, score_ids = input_format.layout(example, tokenizer, seq_len, num_classes)
  n = len(row.ids)
  inputs = np.asarray(row.ids, np.int32)
  option_targets = input_format.option_targets(tokenizer, num_classes, label)
  mlm_positions, mlm_targets = list(score_positions[:len(option_targets)]), list(option_targets)
  masking = input_format.masking
  if masking is not None and rng is not None:
    rate = float(rng.choice(masking.rates, p=masking.probabilities))
    candidates = np.asarray(row.text, bool)
    if rate > 0 and candidates.any():
      rate = min(rate, masking.max_predictions / candidates.sum())
      inputs, targets, weights = objectives.mask_tokens(
          inputs, rng, candidates=candidates, mask_id=tokenizer.mask_id,
          random_ids=(tokenizer.mask_id + 3, tokenizer.vocab_size), rate=rate)
      chosen = np.flatnonzero(weights)
      mlm_positions += chosen.tolist()
      mlm_targets += targets[chosen].tolist()
  predictions = num_predictions(input_format, num_classes)
  teacher = example.get(TEACHER_LOGITS)
  return {
      "inputs": _pad(inputs, seq_len), "token_types": _pad(row.types, seq_len),
      "positions": _pad(row.positions, seq_len), "segment_ids": _pad([1] * n, seq_len),
      "block_ids": _pad(row.blocks, seq_len),
      "text_mask": _pad(row.text, seq_len, np.float32),
      "score_positions": _pad(score_positions, num_classes), "score_ids": _pad(score_ids, num_classes),
      "mlm_positions": _pad(mlm_positions, predictions), "mlm_targets": _pad(mlm_targets, predictions),
      "mlm_weights": _pad([1.0] * len(mlm_targets), predictions, np.float32),
      "labels": np.asarray(label or 0, np.int32), "label_weights": np.asarray(label is not None, np.float32),
      "teacher_logits": _pad(teacher if teacher is not None else [], num_classes, np.float32),
      "teacher_weights": np.asarray(teacher is not None, np.float32),
  }


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FewShotData(processes.ProcessShare):
  """The train loop's data for few-shot fine-tuning: the `sample_seed` sample of `task` (cpm_jax.data.fewshot) in
  `input_format`; training reads its train examples plus `extra_examples` (pseudo-labelled or teacher-labelled pool
  examples, added by the few-shot recipes), evaluation its dev examples."""

  vocab_path: str = gin.REQUIRED
  task: FewShotTask = dataclasses.field(default_factory=FewShotTask)
  input_format: InputFormat = dataclasses.field(default_factory=ClsFormat)
  sample_seed: int = 0
  seq_len: int = 128
  global_batch_size: int = 16
  extra_examples: tuple[dict, ...] = ()

  @functools.cached_property
  def tokenizer(self) -> BertTokenizer:
    return BertTokenizer(os.path.expanduser(self.vocab_path))

  @functools.cached_property
  def splits(self) -> FewShotSplits:
    return self.task.splits(self.sample_seed)

  def checkpoint_metadata(self) -> dict:
    """What evaluation needs to rebuild the rows: tokenizer, labels, the input format and seq_len."""
    return {"tokenizer": self.vocab_path, "labels": list(self.task.labels), "input_format": self.input_format.record(),
            "seq_len": self.seq_len}

  def example_features(self, example: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    label = self.task.labels.index(self.task.label_of(example)) if self.task.label_field in example else None
    return features(example, input_format=self.input_format, tokenizer=self.tokenizer, seq_len=self.seq_len,
                    num_classes=len(self.task.labels), label=label, rng=rng)

  def model_requirements(self) -> tuple[Requirement, ...]:
    """What the rows need of PlugConfig (cpm_jax.model_fit): the vocab's ids, seq_len positions, token types 0 / 1
    and, for the [CLS] head, a class per label."""
    vocab = Requirement("vocab_size", self.tokenizer.vocab_size, f"the vocab FewShotData.vocab_path = "
                        f"{self.vocab_path!r}", ("inputs", "score_ids", "mlm_targets"), adopt=True)
    requirements = (vocab, Requirement("max_positions", self.seq_len, f"FewShotData.seq_len = {self.seq_len}",
                                       ("positions",)),
                    Requirement("type_vocab_size", 2, f"{type(self.input_format).__name__} rows", ("token_types",)))
    if self.input_format.head == "cls":
      requirements += (Requirement("num_classes", len(self.task.labels), f"FewShotTask.labels = {self.task.labels!r}",
                                   ("labels",)),)
    return requirements

  def train_iterator(self, seed: int) -> grain.DatasetIterator:
    """This process's share of train + extra examples, shuffled with `seed`, repeated for ever, in full batches."""
    index, count, rows = self.process_share()
    examples = processes.process_examples(grain.MapDataset.source([*self.splits.train, *self.extra_examples]), index,
                                          count)
    features = examples.shuffle(seed).repeat().random_map(self.example_features, seed=seed)
    return iter(features.to_iter_dataset().batch(rows, drop_remainder=True))

  def eval_batches(self) -> grain.DatasetIterator:
    """One pass over the dev examples in order: this process's rows of each global batch (processes.process_rows)."""
    index, count, _ = self.process_share()
    features = grain.MapDataset.source(list(self.splits.dev)).map(functools.partial(self.example_features, rng=None))
    global_batches = features.to_iter_dataset().batch(self.global_batch_size)
    return iter(processes.process_rows(global_batches, self.global_batch_size, index, count))
