"""Zero- and few-shot tasks with CPM-1's released protocols, each configured by a gin file (no code).

- LabelPromptTask (TNEWS, IFLYTEK, OCNLI, review sentiment): one prompt per label; the score is the mean
  log-likelihood of the continuation given the context (CPM-1's protocol; `score="sum"` takes the total, the
  label's probability, which a fine-tuned model is trained on); the best label wins. Reports accuracy over all labels
  and in the paper's setting of `sampled_wrong` random wrong labels + the gold one.
- MultipleChoiceTask (ChID): each candidate is filled into the blank, <eod> appended, and the whole passage is
  scored by mean log-likelihood (its first token has no predictor); the best candidate wins.
- GenerationTask: generate from a prompt; BLEU-1..4 / ROUGE-L / Dist-1/2, or EM / F1 for QA.
- LMScoreTask: each line's total log-likelihood, token count and perplexity.
- ClassificationTask: a fine-tuned classifier head (PLUG with num_classes) predicts each example's label.
Few-shot: `shots` demonstrations (solved examples from a train set, drawn per example with a seed) are
prepended to every prompt, each followed by the task's `separator`.
Templates are Python format strings over the example's fields, plus {label} for the label's words.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import re
from typing import ClassVar, Sequence

import gin
import numpy as np

from cpm_jax import gin_setup
from cpm_jax.data import jsonl
from cpm_jax.evaluation import metrics
from cpm_jax.evaluation.interface import LanguageModel

WHERE = "_where"  # key holding an example's origin (file:line), for error messages


@dataclasses.dataclass
class Result:
  """Metrics (name -> float) and one JSON-able record per example."""

  metrics: dict[str, float]
  predictions: list[dict]


# One JSON object per non-empty line, each tagged with its file:line for error messages.
read_jsonl = functools.partial(jsonl.read_examples, where_key=WHERE)


def where(example: dict, index: int) -> str:
  return example.get(WHERE, f"example {index}")


def _require(example: dict, index: int, fields: Sequence[str], task: str) -> None:
  missing = [field for field in fields if field not in example]
  if missing:
    raise ValueError(f"{where(example, index)}: no field(s) {missing} (task {task!r}).")


def fill(template: str, example: dict, index: int, **extra) -> str:
  """template.format over the example's fields and `extra`; a missing field is a clear error."""
  try:
    return template.format(**{**example, **extra})
  except KeyError as e:
    fields = sorted(k for k in example if k != WHERE)
    raise ValueError(f"{where(example, index)}: template {template!r} uses field {e.args[0]!r}, which the "
                     f"example lacks (it has {fields}).") from None


@dataclasses.dataclass(kw_only=True)
class Task(abc.ABC):
  """Shared settings: a name, an optional default TFDS dataset/split, and few-shot options."""

  serves: ClassVar[str] = "text"  # the models it evaluates: those of families that serve it (Family.serves)
  name: str
  dataset: str = ""  # a cpm_jax.data dataset (e.g. review_sentiment) used when no input file is given
  split: str = "test"
  shots: int = 0
  seed: int = 0
  separator: str = "\n"

  def render(self, example: dict, index: int) -> str:
    """The example solved, as a demonstration for few-shot prompts."""
    raise NotImplementedError(f"Task {self.name!r} has no few-shot demonstrations.")

  def check(self, examples: Sequence[dict], demonstrations: Sequence[dict] = ()) -> None:
    """Raises the ValueError `evaluate` would raise for a malformed example or demonstration (a missing field, a
    label the task does not know), before any model is loaded."""
    for index, example in enumerate(examples):
      self.check_example(example, index)
    if self.shots:
      self.prefix(0, demonstrations)  # enough demonstrations
      for index, example in enumerate(demonstrations):
        self.render(example, index)

  def check_example(self, example: dict, index: int) -> None:
    """What `check` asks of one example (default: nothing)."""

  def prefix(self, index: int, demonstrations: Sequence[dict]) -> str:
    """The few-shot prefix for example `index`: `shots` demonstrations drawn with (seed, index)."""
    if not self.shots:
      return ""
    if len(demonstrations) < self.shots:
      raise ValueError(f"Task {self.name!r}: shots={self.shots} but only {len(demonstrations)} demonstration "
                       "examples were given (pass a train file).")
    picks = np.random.default_rng([self.seed, index]).choice(len(demonstrations), self.shots, replace=False)
    return "".join(self.render(demonstrations[i], int(i)) + self.separator for i in picks)

  @abc.abstractmethod
  def evaluate(self, model: LanguageModel, examples: Sequence[dict], demonstrations: Sequence[dict] = ()) -> Result:
    """Scores `examples` (few-shot demonstrations drawn from `demonstrations`)."""


def _scores(model: LanguageModel, requests: list, names: list[str], score: str) -> np.ndarray:
  """Each request's continuation log-likelihood: its "mean" over the continuation's tokens or its "sum"."""
  totals, counts = model.score(requests, names)
  return np.where(counts > 0, totals if score == "sum" else totals / np.maximum(counts, 1), -np.inf)


def _encode_all(model: LanguageModel, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, encoding every distinct text once."""
  cache: dict[str, list[int]] = {}
  for text in texts:
    if text not in cache:
      cache[text] = model.tokenizer.encode(text)
  return [cache[text] for text in texts]


SCORES = ("mean", "sum")  # LabelPromptTask.score


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class LabelPromptTask(Task):
  """Classification by label prompts; templates are [context, continuation] pairs, {label} = label words.

  label_map: raw label (the example's `label_field`, compared as a string) -> the words put in the prompt.
  None uses the raw labels themselves, the label set being every value seen in the data.
  score: "mean" (CPM-1's protocol: labels of different token counts compete per token) or "sum" (the label's
  log-probability: a label of two pieces is not favoured when its second piece follows its first for certain).
  """

  templates: Sequence[Sequence[str]] = ()
  label_field: str = "label"
  label_map: dict | None = None
  sampled_wrong: int = 3
  skip_labels: Sequence[str] = ()
  score: str = "mean"

  def _labels(self, examples: Sequence[dict]) -> dict[str, str]:
    if self.label_map is not None:
      return {str(k): v for k, v in self.label_map.items()}
    return {label: label for label in sorted({str(e.get(self.label_field)) for e in examples})}

  def _gold(self, example: dict, index: int, labels: dict[str, str]) -> str:
    if self.label_field not in example:
      raise ValueError(f"{where(example, index)}: no label field {self.label_field!r} (task {self.name!r}).")
    label = str(example[self.label_field])
    if label not in labels:
      raise ValueError(f"{where(example, index)}: label {label!r} (field {self.label_field!r}) is not in the label "
                       f"map of task {self.name!r}; known labels: {sorted(labels)}. Add it to the map or to "
                       "skip_labels.")
    return label

  def render(self, example: dict, index: int) -> str:
    labels = self._labels([example])
    words = labels[self._gold(example, index, labels)]
    context, continuation = self.templates[0]
    return fill(context, example, index, label=words) + fill(continuation, example, index, label=words)

  def _kept(self, examples: Sequence[dict]) -> list[dict]:
    """The examples whose label is not skipped; a task without templates or with an unknown score is an error."""
    if not self.templates:
      raise ValueError(f"Task {self.name!r}: no templates; bind LabelPromptTask.templates in its gin file.")
    if self.score not in SCORES:
      raise ValueError(f"Task {self.name!r}: LabelPromptTask.score = {self.score!r}; expected one of {SCORES}.")
    return [e for e in examples if str(e.get(self.label_field)) not in set(map(str, self.skip_labels))]

  def check(self, examples, demonstrations=()):
    kept = self._kept(examples)
    labels = self._labels(kept)
    for i, example in enumerate(kept):
      words = labels[self._gold(example, i, labels)]
      for template in self.templates:
        for part in template:  # context and continuation
          fill(part, example, i, label=words)
    super().check([], demonstrations)

  def evaluate(self, model, examples, demonstrations=()):
    examples = self._kept(examples)
    labels = self._labels(examples)
    keys = list(labels)
    gold = np.array([keys.index(self._gold(e, i, labels)) for i, e in enumerate(examples)])
    contexts, continuations, names = [], [], []
    for i, example in enumerate(examples):
      prefix = self.prefix(i, demonstrations)
      for context, continuation in self.templates:
        for key in keys:
          contexts.append(prefix + fill(context, example, i, label=labels[key]))
          continuations.append(fill(continuation, example, i, label=labels[key]))
          names.append(f"{where(example, i)} label {key!r}")
    requests = list(zip(_encode_all(model, contexts), _encode_all(model, continuations)))
    for (_, continuation), name in zip(requests, names):
      if not continuation:
        raise ValueError(f"{name}: the continuation is empty, so there is nothing to score.")
    scores = _scores(model, requests, names, self.score).reshape(len(examples), len(self.templates), len(keys))
    predicted = scores.argmax(-1)  # [examples, templates]
    results = {}
    sampled = self.sampled_wrong + 1 < len(keys)
    sampled_predicted = np.zeros_like(predicted)
    sampled_wrong = []
    for i in range(len(examples)):
      wrong = np.random.default_rng([self.seed, i]).choice(
          [k for k in range(len(keys)) if k != gold[i]], min(self.sampled_wrong, len(keys) - 1), replace=False)
      sampled_wrong.append(wrong)
      subset = np.concatenate([wrong, [gold[i]]])
      sampled_predicted[i] = subset[scores[i][:, subset].argmax(-1)]
    for t in range(len(self.templates)):
      results[f"accuracy/template_{t}"] = float((predicted[:, t] == gold).mean())
      if sampled:
        results[f"accuracy_{self.sampled_wrong + 1}way/template_{t}"] = float((sampled_predicted[:, t] == gold).mean())
    results["accuracy"] = float((predicted == gold[:, None]).mean())
    if sampled:
      results[f"accuracy_{self.sampled_wrong + 1}way"] = float((sampled_predicted == gold[:, None]).mean())
    results["examples"] = len(examples)
    predictions = [{"where": where(e, i), "label": keys[gold[i]], "predicted": [keys[p] for p in predicted[i]],
                    f"{self.score}_log_likelihood": np.round(scores[i], 5).tolist()} for i, e in enumerate(examples)]
    if sampled:  # which wrong labels the paper's setting drew for each example, and its prediction among them
      for record, wrong, picks in zip(predictions, sampled_wrong, sampled_predicted):
        record.update(sampled_wrong=[keys[k] for k in wrong], predicted_sampled=[keys[p] for p in picks])
    return Result(results, predictions)


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class MultipleChoiceTask(Task):
  """Cloze multiple choice (ChID): fill the first `blank_pattern` match with each candidate."""

  text_field: str = "content"
  candidates_field: str = "candidates"
  answer_field: str = "answer"  # an index into the candidates, or the answer string itself
  blank_pattern: str = r"#idiom\d*#"

  def _filled(self, example: dict, index: int) -> tuple[list[str], int]:
    for field in (self.text_field, self.candidates_field, self.answer_field):
      if field not in example:
        raise ValueError(f"{where(example, index)}: no field {field!r} (task {self.name!r}).")
    text, candidates, answer = example[self.text_field], list(example[self.candidates_field]), \
        example[self.answer_field]
    if not re.search(self.blank_pattern, text):
      raise ValueError(f"{where(example, index)}: field {self.text_field!r} has no blank matching "
                       f"{self.blank_pattern!r}.")
    if isinstance(answer, str):
      if answer not in candidates:
        raise ValueError(f"{where(example, index)}: answer {answer!r} is not among the candidates {candidates}.")
      answer = candidates.index(answer)
    if not 0 <= int(answer) < len(candidates):
      raise ValueError(f"{where(example, index)}: answer index {answer} is out of range for {len(candidates)} "
                       "candidates.")
    filled = [re.sub(self.blank_pattern, lambda _, c=c: c, text, count=1) for c in candidates]
    return filled, int(answer)

  def render(self, example, index):
    filled, answer = self._filled(example, index)
    return filled[answer]

  def check_example(self, example, index):
    self._filled(example, index)

  def evaluate(self, model, examples, demonstrations=()):
    requests, names, gold, sizes = [], [], [], []
    eod = [model.tokenizer.eod_id]
    for i, example in enumerate(examples):
      filled, answer = self._filled(example, i)
      prefix = model.tokenizer.encode(self.prefix(i, demonstrations)) if self.shots else []
      requests += [(prefix, ids + eod) for ids in _encode_all(model, filled)]
      names += [f"{where(example, i)} candidate {c}" for c in range(len(filled))]
      gold.append(answer)
      sizes.append(len(filled))
    scores = _scores(model, requests, names, "mean")
    bounds = np.cumsum([0] + sizes)
    predicted = [int(scores[a:b].argmax()) for a, b in zip(bounds[:-1], bounds[1:])]
    correct = [p == g for p, g in zip(predicted, gold)]
    predictions = [{"where": where(e, i), "answer": gold[i], "predicted": predicted[i],
                    "mean_log_likelihood": np.round(scores[bounds[i]:bounds[i + 1]], 5).tolist()}
                   for i, e in enumerate(examples)]
    return Result({"accuracy": float(np.mean(correct)) if correct else math.nan, "examples": len(examples)},
                  predictions)


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class GenerationTask(Task):
  """Generate from `prompt_template`; compare with `reference_field` (a string or a list of references)."""

  prompt_template: str = ""
  reference_field: str = "reference"
  metrics: Sequence[str] = ("bleu", "rouge_l", "distinct")
  stop_at: str = "\n"  # the generation is cut at its first occurrence ("" keeps everything)

  def _references(self, example: dict, index: int) -> list[str]:
    if self.reference_field not in example:
      raise ValueError(f"{where(example, index)}: no reference field {self.reference_field!r} (task {self.name!r}).")
    value = example[self.reference_field]
    return [value] if isinstance(value, str) else [str(v) for v in value]

  def render(self, example, index):
    return fill(self.prompt_template, example, index) + self._references(example, index)[0]

  def generate(self, model: LanguageModel, examples: Sequence[dict], prompts: list[list[int]]) -> list[list[int]]:
    """The model's generations (token ids) for the examples' encoded prompts (image tasks add the images)."""
    del examples
    return model.generate(prompts)

  def check_example(self, example, index):
    self.render(example, index)

  def evaluate(self, model, examples, demonstrations=()):
    prompts = [self.prefix(i, demonstrations) + fill(self.prompt_template, e, i) for i, e in enumerate(examples)]
    references = [self._references(e, i) for i, e in enumerate(examples)]
    outputs = [model.tokenizer.decode(ids) for ids in self.generate(model, examples, _encode_all(model, prompts))]
    if self.stop_at:
      outputs = [output.split(self.stop_at, 1)[0] for output in outputs]
    results = metrics.generation_metrics(outputs, references, self.metrics)
    results["examples"] = len(examples)
    predictions = [{"where": where(e, i), "prompt": p, "generated": o, "references": r}
                   for i, (e, p, o, r) in enumerate(zip(examples, prompts, outputs, references))]
    return Result(results, predictions)


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class LMScoreTask(Task):
  """Per line: log p(tokens[1:] | tokens[0]) summed, the number of scored tokens and the perplexity."""

  name: str = "lm_score"
  text_field: str = "text"

  def check_example(self, example, index):
    _require(example, index, (self.text_field,), self.name)

  def evaluate(self, model, examples, demonstrations=()):
    requests, names = [], []
    for i, example in enumerate(examples):
      self.check_example(example, i)
      ids = model.tokenizer.encode(str(example[self.text_field]))
      requests.append((ids[:1], ids[1:]))
      names.append(where(example, i))
    totals, counts = model.score(requests, names)
    predictions = [{"where": name, "log_likelihood": float(total), "tokens": int(count),
                    "perplexity": math.exp(-total / count) if count else None}
                   for name, total, count in zip(names, totals, counts)]
    scored = int(counts.sum())
    total = float(totals.sum())
    return Result({"log_likelihood": total, "tokens": scored, "examples": len(examples),
                   "perplexity": math.exp(-total / scored) if scored else math.nan}, predictions)


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class ClassificationTask(Task):
  """Accuracy of a model's classification head (`model.classify`) against `label_field`.

  text_fields: one or two fields (sentence A, B). labels: what class i means, compared with the examples'
  labels as strings (default: the labels the checkpoint records from its fine-tuning data).
  """

  text_fields: Sequence[str] = ("text",)
  label_field: str = "label"
  labels: Sequence[str] = ()

  def check_example(self, example, index, labels: Sequence[str] | None = None):
    """The example's fields, and its label when the labels are known (bound here, or from the model)."""
    _require(example, index, (*self.text_fields, self.label_field), self.name)
    labels = labels or [str(label) for label in self.labels]
    if labels and str(example[self.label_field]) not in labels:
      raise ValueError(f"{where(example, index)}: label {example[self.label_field]!r} is not one of the classes "
                       f"{labels} (task {self.name!r}).")

  def evaluate(self, model, examples, demonstrations=()):
    if model.classify is None:
      raise ValueError(f"Task {self.name!r} needs a model with a classification head (a PLUG checkpoint "
                       "fine-tuned with PlugConfig.num_classes > 0).")
    labels = [str(label) for label in (self.labels or model.labels)]
    if not labels:
      raise ValueError(f"Task {self.name!r}: the checkpoint records no labels; bind ClassificationTask.labels.")
    texts, gold = [], []
    for i, example in enumerate(examples):
      self.check_example(example, i, labels)
      texts.append(tuple(str(example[f]) for f in self.text_fields))
      gold.append(labels.index(str(example[self.label_field])))
    logits = model.classify(texts)
    if logits.shape[-1] != len(labels):
      raise ValueError(f"Task {self.name!r}: {len(labels)} labels {labels} for a head of {logits.shape[-1]} classes.")
    predicted, gold = logits.argmax(-1), np.array(gold, np.int64)
    majority = np.bincount(gold, minlength=len(labels)).max() / max(len(gold), 1)
    results = {"accuracy": float((predicted == gold).mean()) if len(gold) else math.nan,
               "majority_class_accuracy": float(majority), "examples": len(examples)}
    predictions = [{"where": where(e, i), "label": labels[g], "predicted": labels[p],
                    "logits": np.round(row, 5).tolist()}
                   for i, (e, g, p, row) in enumerate(zip(examples, gold, predicted, logits))]
    return Result(results, predictions)


@gin.configurable
def configured_task(task: Task = gin.REQUIRED) -> Task:
  """The task a gin file under gin_configs/tasks/ binds (`configured_task.task = @LabelPromptTask()`)."""
  return task


def task_from_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> Task:
  """The task that gin `files` (paths, or relative to gin_configs/) and `bindings` configure, parsed on their own:
  gin is cleared before and after."""
  gin.clear_config()
  try:
    gin_setup.parse(files, bindings)
    return configured_task()
  finally:
    gin.clear_config()


def sample_examples(examples: Sequence[dict], limit: int | None, seed: int = 0) -> list[dict]:
  """At most `limit` examples drawn with `seed`, in their original order (splits are often sorted by label,
  so a prefix would see one class only)."""
  if limit is None or limit >= len(examples):
    return list(examples)
  keep = np.sort(np.random.default_rng(seed).choice(len(examples), limit, replace=False))
  return [examples[i] for i in keep]


def load_examples(task: Task, input_file: str | None, data_dir: str | None, split: str | None = None) -> list[dict]:
  """The examples of `input_file` (jsonl), else of the task's dataset split (cpm_jax.data) in `data_dir`."""
  if input_file:
    return read_jsonl(input_file)
  if not task.dataset:
    raise ValueError(f"Task {task.name!r} names no dataset; give an input file (--input_file).")
  if not data_dir:
    raise ValueError(f"Task {task.name!r} reads dataset {task.dataset!r}; give its data_dir (--data_dir).")
  from cpm_jax import data  # TFDS is only needed for dataset-backed tasks
  split = split or task.split
  return [{**e, WHERE: f"{task.dataset}/{split}[{i}]"} for i, e in enumerate(data.load_examples(task.dataset, split,
                                                                                                 data_dir))]
