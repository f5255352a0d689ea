"""CPM's Megatron/DeepSpeed shards <-> cpm_jax: release-style shards at mp 1/2/4, lossless mp=2 round trip, config;
torch files read and written tensor by tensor."""

import dataclasses

import numpy as np
import pytest
import torch
from convert_util import assert_trees_equal, random_gpt2, release_shards
from jax.numpy import bfloat16

from cpm_jax.models.cpm import convert as cpm_layout
from cpm_jax.convert import megatron, torch_io
from cpm_jax.models import cpm
from cpm_jax.models.cpm import hf
from cpm_jax.convert.common import ConversionError


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A random HF model (4 heads, vocab and ffn divisible by 4) and its cpm_jax params converted from HF."""
  model = random_gpt2(2, 32, 4, vocab=512, inner=64, seed=3)
  directory = tmp_path_factory.mktemp("hf")
  model.save_pretrained(directory)
  return model, hf.load_hf(directory)


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_release_shards_convert_to_the_hf_params(tmp_path, gpt2, num_ranks):
  model, from_hf = gpt2
  release_shards(model, tmp_path / "ckpt", num_ranks)
  loaded = cpm_layout.load_megatron(tmp_path / "ckpt", num_heads=4)
  assert loaded.config == from_hf.config
  assert_trees_equal(loaded.params, from_hf.params)
  assert any(f"merged {num_ranks} model-parallel rank(s)" in note for note in loaded.notes)


def test_mp2_round_trip_is_lossless_and_splits_like_the_release(tmp_path, gpt2):
  model, from_hf = gpt2
  cpm_layout.save_megatron(from_hf.params, from_hf.config, tmp_path / "ours", 2)
  release_shards(model, tmp_path / "release", 2)
  assert (tmp_path / "ours" / "latest_checkpointed_iteration.txt").read_text() == "release"
  for rank in range(2):
    ours = torch.load(tmp_path / "ours" / "release" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=True)
    theirs = torch.load(tmp_path / "release" / "1000" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)
    assert ours["mp_world_size"] == 2 and set(ours["module"]) == set(theirs["module"])
    for key, tensor in theirs["module"].items():
      assert torch.equal(ours["module"][key], tensor), key
  back = cpm_layout.load_megatron(tmp_path / "ours", config=from_hf.config)
  assert_trees_equal(back.params, from_hf.params)
  assert back.notes[0] == "num_heads=4 from the gin model config"


def test_resharding_mp4_to_mp2_via_cpm_jax(tmp_path, gpt2):
  model, from_hf = gpt2
  release_shards(model, tmp_path / "mp4", 4)
  loaded = cpm_layout.load_megatron(tmp_path / "mp4", tag="1000", num_heads=4)
  cpm_layout.save_megatron(loaded.params, loaded.config, tmp_path / "mp2", 2, tag="1000")
  assert_trees_equal(cpm_layout.load_megatron(tmp_path / "mp2", num_heads=4).params, from_hf.params)


def test_split_and_merge_are_inverse_by_parts():
  x = np.arange(24 * 6).reshape(24, 6)
  pieces = megatron.split_tensor(x, megatron.QKV, 4)
  # Rank 1 holds rows 2:4 of each third (Q, K, V have 8 rows each).
  np.testing.assert_array_equal(pieces[1], np.concatenate([x[2:4], x[10:12], x[18:20]]))
  for split in (megatron.QKV, megatron.KV, megatron.COLUMN, megatron.ROW, megatron.REPLICATED):
    np.testing.assert_array_equal(megatron.merge_tensors(megatron.split_tensor(x, split, 2), split), x)


def test_heads_from_flag_gin_or_released_sizes():
  found = {"vocab_size": 64, "num_layers": 2, "embed_dim": 768, "ffn_dim": 3072, "max_positions": 32}
  config, note = cpm_layout.resolve_config(found, "ckpt")
  assert config.num_heads == 12 and "inferred from hidden size 768" in note
  config, note = cpm_layout.resolve_config(found, "ckpt", num_heads=24)
  assert config.num_heads == 24 and "--num_heads" in note
  with pytest.raises(ConversionError, match="pass --num_heads"):
    cpm_layout.resolve_config(dict(found, embed_dim=32, ffn_dim=128), "ckpt")
  gin = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=768, num_heads=6, max_positions=32)
  assert cpm_layout.resolve_config(found, "ckpt", base=gin)[0].num_heads == 6
  with pytest.raises(ConversionError, match="num_heads disagree: 24 .* 6 from the gin model config"):
    cpm_layout.resolve_config(found, "ckpt", base=gin, num_heads=24)
  with pytest.raises(ConversionError, match="num_layers: checkpoint 2, gin 3"):
    cpm_layout.resolve_config(found, "ckpt", base=dataclasses.replace(gin, num_layers=3))


def test_mp_must_divide_heads_vocab_and_ffn(tmp_path, gpt2):
  _, from_hf = gpt2
  with pytest.raises(ConversionError, match="--mp=3 must divide num_heads=4"):
    cpm_layout.save_megatron(from_hf.params, from_hf.config, tmp_path / "out", 3)
  assert not (tmp_path / "out").exists()


def test_tensor_files_read_views_bfloat16_and_legacy_files_and_write_placeholders_in_place(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  module = {"transposed": base.t(), "rows": base[1:3], "whole": base, "bf16": torch.arange(5).to(torch.bfloat16)}
  for zipped in (True, False):
    path = tmp_path / f"state_{zipped}.pt"
    torch.save({"module": module, "iteration": 3}, path, _use_new_zipfile_serialization=zipped)
    file = torch_io.TensorFile(path)
    assert file.state["iteration"] == 3
    for key, tensor in module.items():
      got = file.read(file.state["module"][key])
      assert got.dtype == torch_io.numpy_dtype(tensor) and got.flags.c_contiguous, key
      np.testing.assert_array_equal(got.astype(np.float32), tensor.float().numpy(), err_msg=key)

  # Room reserved by torch.save, then filled tensor by tensor: torch reads back what was written.
  values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4).astype(bfloat16)}
  torch_io.save_placeholders(tmp_path / "out.pt", {"module": {key: torch_io.placeholder(v.shape, v.dtype)
                                                              for key, v in values.items()}})
  out = torch_io.TensorFile(tmp_path / "out.pt", writable=True)
  for key, value in values.items():
    out.write(out.state["module"][key], value)
  written = torch.load(tmp_path / "out.pt", weights_only=True)["module"]
  np.testing.assert_array_equal(written["a"].numpy(), values["a"])
  np.testing.assert_array_equal(written["b"].float().numpy(), values["b"].astype(np.float32))
  with pytest.raises(ValueError, match=r"array float32\[3\] written into a tensor torch.float32\[2, 3\]"):
    out.write(out.state["module"]["a"], np.zeros(3, np.float32))
