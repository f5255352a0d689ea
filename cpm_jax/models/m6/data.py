"""M6's multitask training data: one Grain pipeline mixing image-to-text, image+text-to-text, text prefix-LM and
plain LM examples in every batch (the mode is set per example; masks.py).

Tasks (TASKS), each over an embedded TFDS dataset (cpm_jax.data.sources, built on first use) or, for the text
tasks, M6Data.dataset (default the embedded People's Daily):
  shapes_caption   shapes_captions: image -> caption             image-to-text
  shapes_vqa       shapes_captions: image + question -> answer   image+text-to-text
  digits_caption   digits_captions: image -> "数字7"             image-to-text
  photo_caption    sample_photos: image -> caption               image-to-text
  text_prefix_lm   M6Data.dataset: a window cut in two           text-to-text prefix LM
  text_lm          M6Data.dataset: a window                      plain causal LM
A batch is a dict of numpy arrays, [per_process_batch, ...]:
  images          float32 [b, size, size, 3] (cpm_jax.data.images.model_input; zeros without an image)
  has_image       int32 [b]
  prefix_lengths  int32 [b]   text tokens in the bidirectional prefix (0: causal LM)
  inputs, targets int32 [b, seq_len]; weights float32 (1 on the targets after the prefix); segment_ids int32
Training: each task's split is shared out over processes (cpm_jax.data.processes: process p reads examples p,
p + P, ...), shuffled and repeated, the tasks mixed by `mixture` weights (grain.MapDataset.mix); the iterator is
checkpointable. Random windows of the text are drawn per example from Grain's seeded rng, so batches are
deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import gin
import grain
import numpy as np

from cpm_jax import tokenization
from cpm_jax.data import images, processes, sources
from cpm_jax.data.splits import SplitData
from cpm_jax.gin_setup import ConfigError
from cpm_jax.model_fit import Requirement
from cpm_jax.models.m6 import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of example: its dataset, whether it has an image, and which fields give prompt and target.

  prompt_field None and target_field set: image -> target (an empty prompt). text_window: the target is a random
  window of the `text` field, cut in two at a random point for a prefix LM (prefix_lm) or kept whole for the
  causal LM.
  """

  dataset: str | None  # None: M6Data.dataset (the text tasks)
  image: bool
  prompt_field: str | None = None
  target_field: str | None = None
  prefix_lm: bool = True


TASKS = {
    "shapes_caption": Task("shapes_captions", image=True, target_field="caption"),
    "shapes_vqa": Task("shapes_captions", image=True, prompt_field="question", target_field="answer"),
    "digits_caption": Task("digits_captions", image=True, target_field="caption"),
    "photo_caption": Task("sample_photos", image=True, target_field="caption"),
    "text_prefix_lm": Task(None, image=False),
    "text_lm": Task(None, image=False, prefix_lm=False),
}
IMAGE_DATASETS = {"shapes_captions": ("caption", "question", "answer"), "digits_captions": ("caption",),
                  "sample_photos": ("caption",)}


def text_features(prompt: Sequence[int] | None, target: Sequence[int], vocab: vocab_lib.CharVocab,
                  text_len: int) -> dict[str, np.ndarray]:
  """The text side of one example: "<bos> prompt <sep> target <eod>" with the prefix through <sep> (a prefix LM),
  or "<bos> target <eod>" with no prefix (prompt None: a causal LM); cut to text_len + 1 tokens."""
  if prompt is None:
    ids, prefix = [vocab.bos_id, *target, vocab.eod_id], 0
  else:
    ids, prefix = [vocab.bos_id, *prompt, vocab.sep_id, *target, vocab.eod_id], len(prompt) + 2
  ids = np.asarray(ids[:text_len + 1], np.int32)
  n = len(ids) - 1
  features = {name: np.zeros(text_len, np.int32) for name in ("inputs", "targets", "segment_ids")}
  features["inputs"][:n], features["targets"][:n], features["segment_ids"][:n] = ids[:-1], ids[1:], 1
  features["weights"] = np.zeros(text_len, np.float32)
  features["weights"][max(prefix - 1, 0):n] = 1.0  # the last prefix token predicts the first target
  features["prefix_lengths"] = np.asarray(prefix, np.int32)
  return features


def _window(text: str, length: int, rng: np.random.Generator) -> str:
  start = int(rng.integers(0, max(len(text) - length, 0) + 1))
  return text[start:start + length]


def example(record: Mapping[str, Any], rng: np.random.Generator, *, task: Task, vocab: vocab_lib.CharVocab,
            text_len: int, image_size: int) -> dict[str, np.ndarray]:
  """One training example of `task` from a dataset record (see the module docstring for the features)."""
  if task.target_field is not None:
    prompt = vocab.encode(sources.as_text(record[task.prompt_field])) if task.prompt_field else []
    features = text_features(prompt, vocab.encode(sources.as_text(record[task.target_field])), vocab, text_len)
  elif task.prefix_lm:
    window = _window(sources.as_text(record["text"]), text_len - 2, rng)
    cut = int(rng.integers(1, len(window))) if len(window) > 1 else len(window)
    features = text_features(vocab.encode(window[:cut]), vocab.encode(window[cut:]), vocab, text_len)
  else:
    window = _window(sources.as_text(record["text"]), text_len - 1, rng)
    features = text_features(None, vocab.encode(window), vocab, text_len)
  features["has_image"] = np.asarray(int(task.image), np.int32)
  features["images"] = (images.model_input(record["image"], image_size) if task.image
                        else np.zeros((image_size, image_size, 3), np.float32))
  return features


def build_vocab(path: str, size: int, data_dir: str, texts: Iterable[Mapping[str, Any]]) -> None:
  """Writes the character vocabulary to `path` (vocab.build): every character of the image datasets' train texts,
  then the most frequent characters of the `text` fields of `texts`, at most `size` tokens."""
  required = [sources.as_text(record[field]) for name, fields in IMAGE_DATASETS.items()
              for record in sources.load_split(name, "train", data_dir) for field in fields]
  vocab_lib.build(required, [sources.as_text(record["text"]) for record in texts], path, size)


@functools.lru_cache(maxsize=None)
def load_vocab(path: str, size: int) -> vocab_lib.CharVocab:
  """The character vocabulary at `path`, checked to hold at most `size` tokens (M6Data.vocab_size)."""
  vocab = vocab_lib.CharVocab(path)
  tokenization.check_fits(vocab.vocab_size, vocab.path, size, "M6Data.vocab_path")
  return vocab


@gin.configurable
@dataclasses.dataclass(frozen=True)
class M6Data(SplitData):
  """Multitask M6 batches over the embedded image datasets and a text dataset (module docstring).

  `SplitData` for the splits, the batch shape and each process's share; its `dataset` is the text tasks' (default
  the embedded People's Daily; any text dataset or `{split}` jsonl of cpm_jax.data), `seq_len` the text tokens per
  row. mixture: (task name in TASKS, weight) pairs. vocab_path: the character vocabulary (default
  `<data_dir>/m6_chars_<vocab_size>.txt`, built on first use); vocab_size: its most entries. image_size: pixels a
  side (the model's M6Config.image_size). eval_examples: validation examples per task in eval_batches().
  """

  seq_len: int = 48
  global_batch_size: int = 32
  vocab_path: str | None = None
  vocab_size: int = 4096
  mixture: Sequence[tuple[str, float]] = (("shapes_caption", 0.3), ("shapes_vqa", 0.3), ("digits_caption", 0.1),
                                          ("photo_caption", 0.05), ("text_prefix_lm", 0.1), ("text_lm", 0.15))
  image_size: int = 32
  eval_examples: int = 64
  read_threads: int = 2

  def __post_init__(self):
    unknown = [name for name, _ in self.mixture if name not in TASKS]
    if unknown:
      raise ConfigError(f"M6Data.mixture names tasks {unknown}; known tasks: {sorted(TASKS)}.")
    if not self.mixture or any(weight <= 0 for _, weight in self.mixture):
      raise ConfigError(f"M6Data.mixture={list(self.mixture)}: expected (task, weight > 0) pairs, at least one.")
    if self.seq_len < 4:
      raise ConfigError(f"M6Data.seq_len={self.seq_len}; expected at least 4.")

  @property
  def resolved_vocab_path(self) -> str:
    path = self.vocab_path or os.path.join(self.data_dir, f"m6_chars_{self.vocab_size}.txt")
    return os.path.abspath(os.path.expanduser(path))

  @property
  def vocab(self) -> vocab_lib.CharVocab:
    """The vocabulary at resolved_vocab_path, built there first from the train splits if absent (build_vocab)."""
    path = self.resolved_vocab_path
    if not os.path.isfile(path):
      build_vocab(path, self.vocab_size, os.path.expanduser(self.data_dir), self.source(self.train_split))
    return load_vocab(path, self.vocab_size)

  def checkpoint_metadata(self) -> dict:
    """Recorded with the model in the workdir, for evaluate.py / generate.py."""
    return {"tokenizer": self.resolved_vocab_path}

  def model_requirements(self) -> tuple[Requirement, ...]:
    """What the batches need of M6Config (cpm_jax.model_fit): the vocabulary's ids, seq_len text positions, the
    image size (M6Model.loss checks the images' shape too: a larger config would not fit them either)."""
    return (Requirement("vocab_size", self.vocab.vocab_size, f"the vocabulary M6Data.vocab_path = "
                        f"{self.resolved_vocab_path!r}", ("inputs", "targets"), adopt=True),
            Requirement("max_text_positions", self.seq_len, f"M6Data.seq_len = {self.seq_len}"),
            Requirement("image_size", self.image_size, f"M6Data.image_size = {self.image_size}", adopt=True))

  def _task_dataset(self, name: str, split: str) -> tuple[grain.MapDataset, Any]:
    """(the task's records of `split`, record + rng -> example)."""
    task = TASKS[name]
    source = (sources.load_split(task.dataset, split, os.path.expanduser(self.data_dir)) if task.dataset
              else self.source(split))
    return grain.MapDataset.source(source), functools.partial(example, task=task, vocab=self.vocab,
                                                               text_len=self.seq_len, image_size=self.image_size)

  def train_iterator(self, seed: int) -> Iterator[dict]:
    index, count, rows = self.process_share()
    datasets = []
    for number, (name, _) in enumerate(self.mixture):
      records, make = self._task_dataset(name, self.train_split)
      share = processes.process_examples(records, index, count, f"{name} examples")
      datasets.append(share.shuffle(seed + number).repeat().random_map(make, seed=seed + number))
    mixed = grain.MapDataset.mix(datasets, [weight for _, weight in self.mixture])
    batches = mixed.batch(rows, drop_remainder=True)
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                          prefetch_buffer_size=4 * self.read_threads)))

  def eval_batches(self) -> Iterable[dict]:
    """The first eval_examples of every task's eval split (windows drawn with seed 0), in task order, as this
    process's rows of each global batch (cpm_jax.data.processes); the last batch padded with empty rows."""
    index, count, _ = self.process_share()
    parts = []
    for name, _ in self.mixture:
      records, make = self._task_dataset(name, self.eval_split)
      parts.append(records[:self.eval_examples].random_map(make, seed=0))
    batches = grain.MapDataset.concatenate(parts).batch(self.global_batch_size).to_iter_dataset()
    return processes.process_rows(batches, self.global_batch_size, index, count)
