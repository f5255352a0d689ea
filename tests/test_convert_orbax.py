"""Conversion into cpm_jax's sharded Orbax layout, resharding, and the command line end to end."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from convert_util import assert_trees_equal, random_gpt2, release_shards

from cpm_jax import checkpointing, partitioning
from cpm_jax.models import cpm
from cpm_jax.convert import orbax
from cpm_jax.models.cpm import hf

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  model = random_gpt2(2, 32, 4, vocab=512, seed=5)
  directory = tmp_path_factory.mktemp("hf")
  model.save_pretrained(directory)
  return model, directory


def mesh(data, fsdp, tensor):
  return partitioning.make_mesh(partitioning.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def test_sharded_load_then_restore_on_another_mesh_changes_no_value(tmp_path, gpt2):
  _, hf_dir = gpt2
  reference = hf.load_hf(hf_dir)
  mesh_a, mesh_b = mesh(1, 2, 4), mesh(2, 4, 1)
  on_a = hf.load_hf(hf_dir, mesh=mesh_a)
  want_a = partitioning.tree_shardings(cpm.logical_axes(on_a.config), mesh_a)
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), on_a.params, want_a)
  assert_trees_equal(on_a.params, reference.params)

  orbax.save_orbax(cpm.FAMILY, on_a.params, on_a.config, tmp_path / "orbax", tokenizer="vocab.model")
  on_b = orbax.load_orbax(cpm.FAMILY, tmp_path / "orbax", mesh=mesh_b)
  assert on_b.config == reference.config and on_b.metadata["tokenizer"] == "vocab.model"
  want_b = partitioning.tree_shardings(cpm.logical_axes(on_b.config), mesh_b)
  jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), on_b.params, want_b)
  assert_trees_equal(on_b.params, reference.params)
  restored, metadata = checkpointing.restore_params(tmp_path / "orbax", cpm.abstract_params(on_b.config), want_b)
  assert_trees_equal(restored, reference.params)
  assert cpm.FAMILY.config_from_record(metadata, "orbax") == reference.config


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(ROOT / "experiments" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_command_line_release_shards_to_orbax_to_hf(tmp_path, gpt2):
  model, hf_dir = gpt2
  release_shards(model, tmp_path / "release", 2)
  (tmp_path / "model.gin").write_text("CPMConfig.vocab_size = 512\nCPMConfig.num_layers = 2\n"
                                      "CPMConfig.embed_dim = 32\nCPMConfig.num_heads = 4\n"
                                      "CPMConfig.max_positions = 64\nMeshConfig.tensor = 4\n")
  out = run_cli("--from=megatron", f"--input={tmp_path / 'release'}", f"--output={tmp_path / 'orbax'}",
                f"--gin_file={tmp_path / 'model.gin'}", "--mesh_fsdp=2", "--tokenizer=chinese_vocab.model")
  assert "num_heads=4 from the gin model config" in out
  metadata = json.loads((tmp_path / "orbax" / "metadata.json").read_text())
  assert metadata["converted_from"]["format"] == "megatron" and metadata["tokenizer"] == "chinese_vocab.model"
  assert_trees_equal(orbax.load_orbax(cpm.FAMILY, tmp_path / "orbax").params, hf.load_hf(hf_dir).params)

  run_cli("--to=hf", f"--input={tmp_path / 'orbax'}", f"--output={tmp_path / 'hf'}")
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
  tokens = torch.arange(30).reshape(1, 30)
  with torch.no_grad():
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_command_line_reads_a_training_workdir(tmp_path, gpt2):
  """--input=WORKDIR: the params of its latest checkpoint, the model its model.json records."""
  model, hf_dir = gpt2
  loaded = hf.load_hf(hf_dir)
  workdir = tmp_path / "workdir"
  with checkpointing.Checkpointer(workdir / "checkpoints", async_save=False) as checkpointer:
    for step, scale in ((2, 0.5), (4, 1.0)):  # the latest checkpoint is the one converted
      state = {"params": jax.tree.map(lambda x: x * scale, loaded.params), "step": np.int32(step),
               "opt_state": {"mu": loaded.params}}
      checkpointer.maybe_save(step, state, force=True)
  (workdir / checkpointing.MODEL_RECORD).write_text(json.dumps(cpm.FAMILY.record(loaded.config, tokenizer="v.model")))
  out = run_cli(f"--input={workdir}", f"--output={tmp_path / 'hf'}", "--to=hf")
  assert "(cpm, hf)" in out
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
  tokens = torch.arange(30).reshape(1, 30)
  with torch.no_grad():
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
