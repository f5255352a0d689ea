"""HF GPT2LMHeadModel <-> cpm_jax: logits parity with transformers on real CPM-tokenized text, bitwise round trips."""

import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from convert_util import assert_trees_equal, cpm_tokens, hf_state, random_gpt2

from cpm_jax.models import cpm
from cpm_jax.models.cpm import hf


@pytest.mark.parametrize("layers,embed,heads,inner", [(1, 32, 2, None), (2, 48, 4, None), (3, 64, 8, 96)])
def test_logits_match_transformers_at_every_position(tmp_path, cpm_vocab_path, layers, embed, heads, inner):
  model = random_gpt2(layers, embed, heads, inner=inner, seed=layers)
  model.save_pretrained(tmp_path / "hf")
  tokens = cpm_tokens(cpm_vocab_path)
  assert tokens.shape[1] > 20 and tokens.max() > 1000  # real Chinese pieces, not specials

  loaded = hf.load_hf(tmp_path / "hf")
  assert (loaded.config.num_layers, loaded.config.embed_dim, loaded.config.num_heads) == (layers, embed, heads)
  assert loaded.config.ffn_dim == (inner or 4 * embed)
  logits = cpm.forward(loaded.params, tokens, loaded.config)
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(want).max() > 1.0  # weights large enough that a mis-mapped tensor shows
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


def test_cpm_jax_to_hf_gives_back_the_same_tensors(tmp_path):
  model = random_gpt2(2, 32, 4)
  model.save_pretrained(tmp_path / "hf")
  loaded = hf.load_hf(tmp_path / "hf")
  hf.save_hf(loaded.params, loaded.config, tmp_path / "out")

  written = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
  want = hf_state(model)
  assert set(written) == set(want)
  for key, tensor in want.items():
    assert torch.equal(written[key], tensor), key
  reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(
      tmp_path / "out", output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (config["n_layer"], config["n_embd"], config["n_head"], config["eos_token_id"]) == (2, 32, 4, 7)
  tokens = torch.arange(40).reshape(2, 20)
  with torch.no_grad():
    assert torch.equal(reloaded.eval()(tokens).logits, model(tokens).logits)


def test_pytorch_bin_bfloat16_and_sharded_safetensors(tmp_path):
  model = random_gpt2(2, 32, 4)
  model.save_pretrained(tmp_path / "single")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="500KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  (tmp_path / "bin").mkdir()
  model.config.to_json_file(tmp_path / "bin" / "config.json")
  # An old-style .bin: bfloat16, with the tied lm_head and the attention-mask buffers.
  state = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
           for key, value in model.state_dict().items()}
  torch.save(state, tmp_path / "bin" / "pytorch_model.bin")

  single = hf.load_hf(tmp_path / "single")
  assert_trees_equal(hf.load_hf(tmp_path / "sharded").params, single.params)
  from_bin = hf.load_hf(tmp_path / "bin")
  assert from_bin.config.param_dtype == "bfloat16"
  assert_trees_equal(from_bin.params, hf.load_hf(tmp_path / "single", dtype="bfloat16").params)
  upcast = hf.load_hf(tmp_path / "bin", dtype="float32").params
  assert_trees_equal(upcast, jax.tree.map(lambda x: np.asarray(x, np.float32), from_bin.params))
