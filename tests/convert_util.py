"""Helpers of tests/test_convert_*.py: random GPT-2 models with CPM's settings, shards split as the release did."""

from __future__ import annotations

import pathlib
import random

import jax
import numpy as np
import torch
import transformers

from cpm_jax.tokenization import CPMTokenizer

TEXT = ("清华大学和北京智源人工智能研究院发布了中文预训练语言模型。\n"
        "它在两周内读完了一百GB的中文文本，能写诗、答题，也会 讲故事。")


def random_gpt2(layers: int, embed: int, heads: int, *, vocab: int = 30000, positions: int = 64,
                inner: int | None = None, seed: int = 0) -> transformers.GPT2LMHeadModel:
  """A float32 GPT2LMHeadModel with CPM's settings and every weight random (biases and norms included)."""
  config = transformers.GPT2Config(
      vocab_size=vocab, n_positions=positions, n_embd=embed, n_layer=layers, n_head=heads, n_inner=inner,
      activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True, resid_pdrop=0.0,
      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=7, eos_token_id=7, pad_token_id=5)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_scale = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
      param.normal_(1.0 if is_scale else 0.0, 0.2 if is_scale else 0.1)
  return model


def hf_state(model: transformers.GPT2LMHeadModel) -> dict[str, torch.Tensor]:
  """The model's weights as GPT2LMHeadModel saves them (tied head and buffers left out)."""
  return {key: value for key, value in model.state_dict().items() if key.startswith("transformer.")
          and not key.endswith((".attn.bias", ".attn.masked_bias"))}


def release_shards(model: transformers.GPT2LMHeadModel, directory: pathlib.Path, num_ranks: int,
                   iteration: int = 1000) -> pathlib.Path:
  """CPM's Megatron/DeepSpeed layout split over `num_ranks`, written as the release did (FORMATS.md).

  Independent of cpm_jax.convert: torch Linear weights are the HF Conv1D weights transposed; QKV is split
  per third; each rank file carries rng-state bookkeeping beside 'module'.
  """
  sd = {key.removeprefix("transformer."): value for key, value in hf_state(model).items()}
  layers = model.config.n_layer

  def chunk(tensor, dim, rank):
    return tensor.chunk(num_ranks, dim)[rank]

  def rank_module(rank: int) -> dict[str, torch.Tensor]:
    out = {"word_embeddings.weight": chunk(sd["wte.weight"], 0, rank),
           "position_embeddings.weight": sd["wpe.weight"]}
    for i in range(layers):
      h, m = f"h.{i}.", f"transformer.layers.{i}."
      qkv_w, qkv_b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
      out.update({
          m + "input_layernorm.weight": sd[h + "ln_1.weight"], m + "input_layernorm.bias": sd[h + "ln_1.bias"],
          m + "attention.query_key_value.weight": torch.cat([chunk(p, 0, rank) for p in qkv_w.chunk(3, 0)]),
          m + "attention.query_key_value.bias": torch.cat([chunk(p, 0, rank) for p in qkv_b.chunk(3, 0)]),
          m + "attention.dense.weight": chunk(sd[h + "attn.c_proj.weight"].t(), 1, rank),
          m + "attention.dense.bias": sd[h + "attn.c_proj.bias"],
          m + "post_attention_layernorm.weight": sd[h + "ln_2.weight"],
          m + "post_attention_layernorm.bias": sd[h + "ln_2.bias"],
          m + "mlp.dense_h_to_4h.weight": chunk(sd[h + "mlp.c_fc.weight"].t(), 0, rank),
          m + "mlp.dense_h_to_4h.bias": chunk(sd[h + "mlp.c_fc.bias"], 0, rank),
          m + "mlp.dense_4h_to_h.weight": chunk(sd[h + "mlp.c_proj.weight"].t(), 1, rank),
          m + "mlp.dense_4h_to_h.bias": sd[h + "mlp.c_proj.bias"],
      })
    out["transformer.final_layernorm.weight"] = sd["ln_f.weight"]
    out["transformer.final_layernorm.bias"] = sd["ln_f.bias"]
    return {key: value.clone().contiguous() for key, value in out.items()}

  (directory / str(iteration)).mkdir(parents=True)
  (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))
  for rank in range(num_ranks):
    state = {"module": rank_module(rank), "iteration": iteration, "mp_world_size": num_ranks,
             "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state()}
    torch.save(state, directory / str(iteration) / f"mp_rank_{rank:02d}_model_states.pt")
  return directory


def assert_trees_equal(got, want) -> None:
  """Same structure and bitwise-equal leaves (dtype included)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (jax.tree_util.keystr(path), a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def cpm_tokens(vocab_path: pathlib.Path, text: str = TEXT) -> np.ndarray:
  """[1, length] ids of `text` under the real CPM vocab."""
  return np.asarray([CPMTokenizer(vocab_path).encode(text)], np.int32)
