"""Test set-up: 8 fake CPU devices for every test (set before jax is imported anywhere)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_VOCAB = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "vocab"


@pytest.fixture(scope="session")
def cpm_vocab_path() -> pathlib.Path:
  """The real CPM SentencePiece model; tests using it skip where ../shared/vocab is absent."""
  path = SHARED_VOCAB / "cpm" / "chinese_vocab.model"
  if not path.exists():
    pytest.skip(f"real CPM vocab not found at {path}")
  return path


@pytest.fixture(scope="session")
def plug_vocab_path() -> pathlib.Path:
  """The real BERT-Chinese vocab.txt used by PLUG; skips where ../shared/vocab is absent."""
  path = SHARED_VOCAB / "plug" / "vocab.txt"
  if not path.exists():
    pytest.skip(f"real PLUG vocab not found at {path}")
  return path
