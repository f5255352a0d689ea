"""Where the data meets the model (cpm_jax.model_fit): sizes from the tokenizer unless gin sets them, bad sizes as
start-up errors naming the bindings, per-batch host checks, and the training program end to end (no probe noise)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import gin
import numpy as np
import pytest

from _data_helpers import demo_data_dir, small_tokenizer  # noqa: F401  (session fixtures)
from cpm_jax import gin_setup, model_fit, train_loop
from cpm_jax.models import cpm, plug

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _fitted(bindings, data):
  gin_setup.parse([], bindings)
  return model_fit.fit(cpm.CPMLanguageModel(cpm.CPMConfig()), data).config


def test_vocab_comes_from_the_tokenizer_unless_set(small_tokenizer, clean_gin):  # noqa: F811
  data = cpm.LMData(tokenizer_path=small_tokenizer.model_path, seq_len=128)
  assert _fitted(["CPMConfig.max_positions = 128"], data).vocab_size == 2000  # CPMConfig's default is 30000
  gin.clear_config()
  assert _fitted(["CPMConfig.vocab_size = 2048"], data).vocab_size == 2048  # padded: larger is kept
  gin.clear_config()
  with pytest.raises(ValueError, match=re.escape(
      f"CPMConfig.vocab_size = 1000 is too small for the data: the tokenizer LMData.tokenizer_path = "
      f"'{small_tokenizer.model_path}' needs at least 2000")):
    _fitted(["CPMConfig.vocab_size = 1000"], data)
  gin.clear_config()
  with pytest.raises(ValueError, match=r"CPMConfig.max_positions = 1024 is too small .* LMData.seq_len = 2048 needs"):
    model_fit.fit(cpm.CPMLanguageModel(cpm.CPMConfig()), cpm.LMData(tokenizer_path=small_tokenizer.model_path,
                                                                   seq_len=2048))


def test_plug_data_declares_token_types_relations_and_labels(plug_vocab_path, clean_gin):
  tiny = dict(vocab_size=21128, num_encoder_layers=1, num_decoder_layers=0, embed_dim=16, num_heads=2,
              max_positions=64)
  vocab = str(plug_vocab_path)
  pairs = plug.ClassificationData(vocab_path=vocab, seq_len=64, text_fields=("a", "b"), labels=("x", "y", "z"))
  model = plug.ClassifierModel(plug.PlugConfig(**tiny, type_vocab_size=2, num_classes=3))
  assert model_fit.fit(model, pairs) is model  # everything fits: nothing to change
  with pytest.raises(ValueError, match=r"PlugConfig.num_classes = 2 is too small .*ClassificationData.labels = "
                                       r"\('x', 'y', 'z'\) needs at least 3"):
    model_fit.fit(plug.ClassifierModel(plug.PlugConfig(**tiny, type_vocab_size=2, num_classes=2)), pairs)
  with pytest.raises(ValueError, match=r"PlugConfig.type_vocab_size = 1 is too small .*ClassificationData's "
                                       "encoder input needs at least 2"):
    model_fit.fit(plug.ClassifierModel(plug.PlugConfig(**tiny, type_vocab_size=1, num_classes=3)), pairs)
  structbert = plug.StructBertData(vocab_path=vocab, seq_len=64)
  with pytest.raises(ValueError, match="PlugConfig.num_relations = 0 is too small .*sentence relations"):
    model_fit.fit(plug.StructBertModel(plug.PlugConfig(**tiny, num_relations=0)), structbert)
  palm = plug.PalmData(vocab_path=vocab, seq_len=64, target_len=96)
  with pytest.raises(ValueError, match="PlugConfig.max_positions = 64 is too small .*PalmData.target_len = 96"):
    model_fit.fit(plug.Seq2SeqModel(plug.PlugConfig(**{**tiny, "num_decoder_layers": 1})), palm)


def test_batches_are_checked_on_the_host():
  config = cpm.CPMConfig(vocab_size=100, max_positions=16)
  check = model_fit.BatchCheck(config, [model_fit.Requirement("vocab_size", 100, "x", ("inputs", "targets")),
                                        model_fit.Requirement("max_positions", 16, "y", ("positions",))])
  batch = {"inputs": np.full((2, 16), 99), "targets": np.zeros((2, 16), np.int32),
           "positions": np.broadcast_to(np.arange(16), (2, 16))}
  check(batch, "batch 0")
  with pytest.raises(ValueError, match=r"batch 3: batch array 'targets' holds 100, out of range for "
                                       r"CPMConfig.vocab_size = 100"):
    check(dict(batch, targets=np.full((2, 16), 100)), "batch 3")
  with pytest.raises(KeyError, match=r"declares batch array 'positions'"):
    check({"inputs": batch["inputs"], "targets": batch["targets"]}, "batch 0")


def _demo_bindings(tokenizer_path, data_dir):
  return [f"LMData.tokenizer_path = '{tokenizer_path}'", f"LMData.data_dir = '{data_dir}'"]


def test_training_start_fails_on_a_vocab_below_the_tokenizers(small_tokenizer, demo_data_dir, tmp_path,  # noqa: F811
                                                              clean_gin):
  gin_setup.parse(["experiments/cpm_demo.gin"], _demo_bindings(small_tokenizer.model_path, demo_data_dir) + [
      "CPMConfig.vocab_size = 1000"])
  with pytest.raises(ValueError, match=r"^CPMConfig.vocab_size = 1000 is too small for the data: the tokenizer "
                                       r"LMData.tokenizer_path = .* needs at least 2000"):
    train_loop.train(str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing was built or written


def test_training_start_fails_on_a_batch_the_mesh_cannot_split(small_tokenizer, demo_data_dir, tmp_path,  # noqa: F811
                                                               clean_gin):
  gin_setup.parse(["experiments/cpm_demo.gin"], _demo_bindings(small_tokenizer.model_path, demo_data_dir) + [
      "LMData.global_batch_size = 6", "train.mesh_config = @MeshConfig()", "MeshConfig.data = 2",
      "MeshConfig.fsdp = 2", "MeshConfig.tensor = 2"])
  with pytest.raises(ValueError, match=re.escape("LMData.global_batch_size=6 does not split into num_microbatches=1 "
                                                 "x 4 batch shards")):
    train_loop.train(str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_train_program_takes_the_vocab_from_the_tokenizer_and_logs_no_probe_noise(
    small_tokenizer, demo_data_dir, tmp_path):  # noqa: F811
  """The demo recipe without a vocab binding (CPMConfig's default is 30000), shrunk to 2 steps."""
  workdir = tmp_path / "run"
  bindings = _demo_bindings(small_tokenizer.model_path, demo_data_dir) + [
      "CPMConfig.num_layers = 1", "CPMConfig.embed_dim = 32", "CPMConfig.num_heads = 2", "LMData.seq_len = 32",
      "LMData.global_batch_size = 8", "LMData.max_documents = 64", "LMData.eval_max_documents = 16",
      "train.num_steps = 2", "train.log_every = 1", "train.eval_max_batches = 0", "train.peak_flops = 1e12"]
  command = [sys.executable, str(REPO / "experiments" / "train.py"), "--gin_file=experiments/cpm_demo.gin",
             f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in bindings)]
  result = subprocess.run(command,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})  # as users run it
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stdout + result.stderr
  assert "step 2/2" in log and "CPMConfig.vocab_size = 2000, from the tokenizer" in log
  assert json.loads((workdir / "model.json").read_text())["model_config"]["vocab_size"] == 2000
  # gin's include probe (the file is then found under gin_configs/) and jax's probe for an absent TPU runtime.
  # TFDS's log of each dataset it opens; redrawn progress bars.
  for noise in ("Path not found", "resource_reader.py", "libtpu", "Unable to initialize backend", "Reusing dataset",
                "\r"):
    assert noise not in log, noise


def test_every_plug_training_batch_passes_its_own_check(plug_vocab_path, demo_data_dir):  # noqa: F811
  """The host check of each PLUG data class names only arrays its batches hold (a classifier has no `targets`)."""
  config = plug.PlugConfig(vocab_size=21128, num_encoder_layers=1, num_decoder_layers=1, embed_dim=16, num_heads=2,
                           max_positions=64, type_vocab_size=3, num_relations=3, num_classes=2)
  common = dict(vocab_path=str(plug_vocab_path), data_dir=str(demo_data_dir), seq_len=32, global_batch_size=8)
  for data in (plug.ClassificationData(**common), plug.StructBertData(**common),
               plug.PalmData(**common, target_len=8)):
    batch = next(data.train_iterator(seed=0))
    model_fit.BatchCheck(config, data.model_requirements())(batch, type(data).__name__)
