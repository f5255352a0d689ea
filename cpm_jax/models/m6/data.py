"""M6's multitask training data: one Grain pipeline mixing image-to-text, image+text-to-text, text prefix-LM and
plain LM examples in every batch (the mode is set per example; masks.py).

Tasks (TASKS), each over an embedded TFDS dataset (cpm_jax.data.sources, built on first use):
  shapes_caption   shapes_captions: image -> caption             image-to-text
  shapes_vqa       shapes_captions: image + question -> answer   image+text-to-text
  digits_caption   digits_captions: image -> "数字7"             image-to-text
  photo_caption    sample_photos: image -> caption               image-to-text
  text_prefix_lm   peoples_daily_1998: a window cut in two       text-to-text prefix LM
  text_lm          peoples_daily_1998: a window                  plain causal LM
A batch is a dict of numpy arrays, [per_process_batch, ...]:
  images          float32 [b, size, size, 3] (cpm_jax.data.images.model_input; zeros without an image)
  has_image       int32 [b]
  prefix_lengths  int32 [b]   text tokens in the bidirectional prefix (0: causal LM)
  inputs, targets int32 [b, text_len]; weights float32 (1 on the targets after the prefix); segment_ids int32
Training: each task's split is sharded over processes (process p reads examples p, p + P, ...), shuffled and
repeated, the tasks mixed by `mixture` weights (grain.MapDataset.mix); the iterator is checkpointable. Random
windows of the news paragraphs are drawn per example from Grain's seeded rng, so batches are deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import gin
import grain
import jax
import numpy as np

from cpm_jax.data import images, sources
from cpm_jax.models.m6 import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of example: its dataset, whether it has an image, and which fields give prompt and target.

  prompt_field None and target_field set: image -> target (an empty prompt). text_window: the target is a random
  window of the `text` field, cut in two at a random point for a prefix LM (prefix_lm) or kept whole for the
  causal LM.
  """

  dataset: str
  image: bool
  prompt_field: str | None = None
  target_field: str | None = None
  prefix_lm: bool = True


TASKS = {
    "shapes_caption": Task("shapes_captions", image=True, target_field="caption"),
    "shapes_vqa": Task("shapes_captions", image=True, prompt_field="question", target_field="answer"),
    "digits_caption": Task("digits_captions", image=True, target_field="caption"),
    "photo_caption": Task("sample_photos", image=True, target_field="caption"),
    "text_prefix_lm": Task("peoples_daily_1998", image=False),
    "text_lm": Task("peoples_daily_1998", image=False, prefix_lm=False),
}
IMAGE_DATASETS = {"shapes_captions": ("caption", "question", "answer"), "digits_captions": ("caption",),
                  "sample_photos": ("caption",)}
TEXT_DATASET = "peoples_daily_1998"


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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
    prompt = vocab.encode(_text(record[task.prompt_field])) if task.prompt_field else []
    features = text_features(prompt, vocab.encode(_text(record[task.target_field])), vocab, text_len)
  elif task.prefix_lm:
    window = _window(_text(record["text"]), text_len - 2, rng)
    cut = int(rng.integers(1, len(window))) if len(window) > 1 else len(window)
    features = text_features(vocab.encode(window[:cut]), vocab.encode(window[cut:]), vocab, text_len)
  else:
    features = text_features(None, vocab.encode(_window(_text(record["text"]), text_len - 1, rng)), vocab, text_len)
  features["has_image"] = np.asarray(int(task.image), np.int32)
  features["images"] = (images.model_input(record["image"], image_size) if task.image
                        else np.zeros((image_size, image_size, 3), np.float32))
  return features


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """A batch padded with all-zero rows (no weight, no image) up to `rows`."""
  return {k: np.pad(v, [(0, rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def load_vocab(data_dir: str, path: str, size: int) -> vocab_lib.CharVocab:
  """The character vocabulary at `path`, built there first if absent (vocab.build): every character of the
  image datasets' train texts, then People's Daily's most frequent characters, at most `size` tokens."""
  if not os.path.isfile(path):
    required = [_text(record[field]) for name, fields in IMAGE_DATASETS.items()
                for record in sources.load_split(name, "train", data_dir) for field in fields]
    others = [_text(record["text"]) for record in sources.load_split(TEXT_DATASET, "train", data_dir)]
    vocab_lib.build(required, others, path, size)
  vocab = vocab_lib.CharVocab(path)
  vocab_lib.check_fits(vocab, size, "M6Data.vocab_path")
  return vocab


@gin.configurable
@dataclasses.dataclass(frozen=True)
class M6Data:
  """Multitask M6 batches over the embedded datasets (module docstring).

  mixture: (task name in TASKS, weight) pairs. vocab_path: the character vocabulary (default
  `<data_dir>/m6_chars_<vocab_size>.txt`, built on first use); vocab_size must not exceed the model's.
  image_size: the model's M6Config.image_size. eval_examples: validation examples per task in eval_batches().
  """

  data_dir: str = "~/tensorflow_datasets"
  vocab_path: str | None = None
  vocab_size: int = 4096
  mixture: Sequence[tuple[str, float]] = (("shapes_caption", 0.3), ("shapes_vqa", 0.3), ("digits_caption", 0.1),
                                          ("photo_caption", 0.05), ("text_prefix_lm", 0.1), ("text_lm", 0.15))
  image_size: int = 32
  text_len: int = 48
  global_batch_size: int = 32
  train_split: str = "train"
  eval_split: str = "validation"
  eval_examples: int = 64
  read_threads: int = 2

  def __post_init__(self):
    unknown = [name for name, _ in self.mixture if name not in TASKS]
    if unknown:
      raise ValueError(f"M6Data.mixture names tasks {unknown}; known tasks: {sorted(TASKS)}.")
    if not self.mixture or any(weight <= 0 for _, weight in self.mixture):
      raise ValueError(f"M6Data.mixture={list(self.mixture)}: expected (task, weight > 0) pairs, at least one.")
    if self.text_len < 4:
      raise ValueError(f"M6Data.text_len={self.text_len}; expected at least 4.")

  @property
  def seq_len(self) -> int:
    """Text tokens per row (what the train loop counts per step; M6Model.flops_per_token adds the patches)."""
    return self.text_len

  @property
  def resolved_vocab_path(self) -> str:
    path = self.vocab_path or os.path.join(self.data_dir, f"m6_chars_{self.vocab_size}.txt")
    return os.path.abspath(os.path.expanduser(path))

  @property
  def vocab(self) -> vocab_lib.CharVocab:
    return load_vocab(os.path.expanduser(self.data_dir), self.resolved_vocab_path, self.vocab_size)

  def checkpoint_metadata(self) -> dict:
    """Recorded with the model in the workdir, for evaluate.py / generate.py."""
    return {"tokenizer": self.resolved_vocab_path}

  def _task_dataset(self, name: str, split: str) -> tuple[grain.MapDataset, Any]:
    """(the task's records of `split`, record + rng -> example)."""
    task = TASKS[name]
    source = sources.load_split(task.dataset, split, os.path.expanduser(self.data_dir))
    return grain.MapDataset.source(source), functools.partial(example, task=task, vocab=self.vocab,
                                                               text_len=self.text_len, image_size=self.image_size)

  def train_iterator(self, seed: int) -> Iterator[dict]:
    index, count = jax.process_index(), jax.process_count()
    if self.global_batch_size % count:
      raise ValueError(f"M6Data.global_batch_size {self.global_batch_size} is not a multiple of the {count} "
                       "processes.")
    datasets = []
    for number, (name, _) in enumerate(self.mixture):
      records, make = self._task_dataset(name, self.train_split)
      datasets.append(records[index::count].shuffle(seed + number).repeat().random_map(make, seed=seed + number))
    mixed = grain.MapDataset.mix(datasets, [weight for _, weight in self.mixture])
    batches = mixed.batch(self.global_batch_size // count, drop_remainder=True)
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                          prefetch_buffer_size=4 * self.read_threads)))

  def eval_batches(self) -> Iterable[dict]:
    """The first eval_examples of every task's eval split (windows drawn with seed 0), in task order, as this
    process's rows of each global batch; the last batch padded with empty rows."""
    parts = []
    for name, _ in self.mixture:
      records, make = self._task_dataset(name, self.eval_split)
      parts.append(records[:self.eval_examples].random_map(make, seed=0))
    batches = grain.MapDataset.concatenate(parts).batch(self.global_batch_size)
    per_process = self.global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    for batch in batches:
      batch = _pad_rows(batch, self.global_batch_size)
      yield {k: v[start:start + per_process] for k, v in batch.items()}
