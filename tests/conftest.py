"""Test set-up: 8 fake CPU devices for every test (set before jax is imported anywhere).

The tests compile many small programs and run them briefly, so XLA's CPU backend optimisation is off
(--xla_backend_optimization_level=0): single-worker wall time falls by 39% for test_training.py, 33% for
test_partitioning / plug_model / cpm_model / decoding, 2-18% for test_plug_training.py (there the demo-data
training runs slower unoptimised). Benchmarks do not import this file and keep the default.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Programs the tests start as subprocesses import this checkout's cpm_jax (not whichever one pip installed).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

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
