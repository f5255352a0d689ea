"""Bad checkpoints fail loudly, naming the file and key, and leave no partial output."""

import fractions
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from convert_util import random_gpt2, release_shards

from cpm_jax.convert import common, torch_io
from cpm_jax.models import cpm
from cpm_jax.models.cpm import convert as cpm_layout
from cpm_jax.models.cpm import hf
from cpm_jax.convert.common import ConversionError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Release-style shards of one small model at mp=2 and mp=4, and at mp=2 for another iteration."""
  model = random_gpt2(2, 32, 4, vocab=64)
  base = tmp_path_factory.mktemp("shards")
  for name, ranks, iteration in (("mp2", 2, 1000), ("mp4", 4, 1000), ("mp2_later", 2, 2000)):
    release_shards(model, base / name, ranks, iteration)
  hf = base / "hf"
  model.save_pretrained(hf)
  return base


def copy(shards, name, tmp_path):
  return shutil.copytree(shards / name, tmp_path / name)


def rank_file(directory, rank, iteration=1000):
  return directory / str(iteration) / f"mp_rank_{rank:02d}_model_states.pt"


def edit_module(path, edit):
  state = torch.load(path, weights_only=False)
  edit(state["module"])
  torch.save(state, path)


def load(directory, **kwargs):
  return cpm_layout.load_megatron(directory, num_heads=4, **kwargs)


def test_missing_shard(shards, tmp_path):
  directory = copy(shards, "mp4", tmp_path)
  rank_file(directory, 2).unlink()
  with pytest.raises(ConversionError, match=r"missing shard .*mp_rank_02_model_states\.pt"):
    load(directory)


def test_shards_from_different_mp_sizes(shards, tmp_path):
  directory = copy(shards, "mp2", tmp_path)
  shutil.copy(rank_file(shards / "mp4", 1), rank_file(directory, 1))
  with pytest.raises(ConversionError, match=r"mp_rank_01_model_states\.pt: saved with mp_world_size=4"):
    load(directory)
  without_bookkeeping = {"module": torch.load(rank_file(directory, 1), weights_only=False)["module"]}
  torch.save(without_bookkeeping, rank_file(directory, 1))
  with pytest.raises(ConversionError, match="word_embeddings.weight.*ranks hold different shapes"):
    load(directory)


def test_shards_from_different_iterations(shards, tmp_path):
  directory = copy(shards, "mp2", tmp_path)
  shutil.copy(rank_file(shards / "mp2_later", 1, 2000), rank_file(directory, 1))
  with pytest.raises(ConversionError, match=r"mp_rank_01_model_states\.pt: holds iteration 2000 but sits in"):
    load(directory)


def test_unknown_missing_and_rank_inconsistent_keys(shards, tmp_path):
  directory = copy(shards, "mp2", tmp_path)
  extra = "transformer.layers.0.attention.rotary.weight"
  for rank in range(2):
    edit_module(rank_file(directory, rank), lambda module: module.update({extra: torch.zeros(2)}))
  with pytest.raises(ConversionError, match=f"unknown keys '{extra}'"):
    load(directory)
  gone = "transformer.layers.1.mlp.dense_4h_to_h.bias"
  for rank in range(2):
    edit_module(rank_file(directory, rank), lambda module: (module.pop(extra), module.pop(gone)))
  with pytest.raises(ConversionError, match=f"1000 .*: missing key '{gone}'"):
    load(directory)
  edit_module(rank_file(directory, 0), lambda module: module.update({gone: torch.zeros(32)}))
  with pytest.raises(ConversionError, match=rf"mp_rank_01_model_states\.pt: keys \['{gone}'\] differ"):
    load(directory)


def test_shape_that_disagrees_with_the_config(shards, tmp_path):
  directory = copy(shards, "mp2", tmp_path)
  key = "transformer.layers.1.attention.dense.weight"
  for rank in range(2):
    edit_module(rank_file(directory, rank), lambda module: module.update({key: torch.zeros(32, 20)}))
  with pytest.raises(ConversionError, match=rf"{key}: shape \(32, 40\), expected \(32, 32\)"):  # as stored
    load(directory)
  gin = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=64, num_heads=4, max_positions=64)
  with pytest.raises(ConversionError, match="does not match the gin model config: embed_dim: checkpoint 32"):
    cpm_layout.load_megatron(shards / "mp2", config=gin)


def test_files_that_are_not_torch_pickles(shards, tmp_path):
  directory = copy(shards, "mp2", tmp_path)
  rank_file(directory, 1).write_bytes(b"this is not a checkpoint")
  with pytest.raises(ConversionError, match=r"mp_rank_01_model_states\.pt is not a torch checkpoint"):
    load(directory)
  hf_dir = copy(shards, "hf", tmp_path)
  (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  with pytest.raises(ConversionError, match=r"model\.safetensors is not a safetensors file"):
    hf.load_hf(hf_dir)


def test_python_objects_need_trust_pickle(tmp_path):
  path = tmp_path / "state.pt"
  torch.save({"module": {"w": torch.ones(2)}, "ratio": fractions.Fraction(1, 3)}, path)
  with pytest.raises(ConversionError, match=r"state\.pt: weights-only loading refused.*--trust_pickle"):
    torch_io.load(path)
  assert torch_io.load(path, trust_pickle=True)["ratio"] == fractions.Fraction(1, 3)


def test_hf_untied_head_unknown_key_and_foreign_config(shards, tmp_path):
  hf_dir = copy(shards, "hf", tmp_path)
  config = json.loads((hf_dir / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps(dict(config, activation_function="relu")))
  with pytest.raises(ConversionError, match=r"config\.json: activation_function='relu'"):
    hf.load_hf(hf_dir)
  (hf_dir / "config.json").write_text(json.dumps(config))
  model = random_gpt2(2, 32, 4, vocab=64)
  state = dict(model.state_dict(), **{"lm_head.weight": torch.zeros(64, 32)})
  (hf_dir / "model.safetensors").unlink()
  torch.save(state, hf_dir / "pytorch_model.bin")
  with pytest.raises(ConversionError, match=r"pytorch_model\.bin: lm_head\.weight differs from"):
    hf.load_hf(hf_dir)
  state = dict(model.state_dict(), **{"transformer.h.0.attn.c_q.weight": torch.zeros(2)})
  torch.save(state, hf_dir / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="unknown keys 'transformer.h.0.attn.c_q.weight'"):
    hf.load_hf(hf_dir)


def test_every_target_assigned_exactly_once():
  target = common.TargetParams({"a": np.zeros((2,)), "b": {"c": np.zeros((3,))}})
  target.assign("a", np.ones(2), "file: a")
  with pytest.raises(ConversionError, match="'a' was already assigned"):
    target.assign("a", np.ones(2), "file: a2")
  with pytest.raises(ConversionError, match=r"file: c: shape \(4,\) does not fit parameter 'b/c'"):
    target.assign("b/c", np.ones(4), "file: c")
  with pytest.raises(ConversionError, match=r"\['b/c'\] were never assigned"):
    target.result()


def test_failed_write_leaves_nothing(shards, tmp_path, monkeypatch):
  loaded = load(shards / "mp2")
  calls, original = [], torch.save

  def failing_save(obj, path):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    original(obj, path)

  monkeypatch.setattr(torch, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    cpm_layout.save_megatron(loaded.params, loaded.config, tmp_path / "out", 2)
  assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_command_line_error_exits_nonzero_without_output(shards, tmp_path):
  directory = copy(shards, "mp2", tmp_path)
  rank_file(directory, 0).write_bytes(b"garbage")
  result = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "convert_checkpoint.py"), "--from=megatron", f"--input={directory}",
       f"--output={tmp_path / 'out'}", "--num_heads=4"],
      capture_output=True, text=True, cwd=ROOT, check=False,
      env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ["PYTHONPATH"]})  # conftest's
  assert result.returncode != 0
  assert f"{rank_file(directory, 0)} is not a torch checkpoint" in result.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mp2"]
