"""Hugging Face GPT2LMHeadModel directories <-> cpm_jax CPM-LM params.

Reads config.json plus model.safetensors or pytorch_model.bin (or their sharded *.index.json forms);
writes config.json and one model.safetensors that `GPT2LMHeadModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import jax
import numpy as np

from cpm_jax.convert import hf_io, megatron, safetensors_io, table
from cpm_jax.convert.common import ConversionError, Loaded, atomic_output_dir
from cpm_jax.models.cpm import convert as cpm_layout
from cpm_jax.models.cpm import model as cpm

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Buffers of older GPT-2 checkpoints (the causal mask), not parameters.
_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias")


def read_config(directory: pathlib.Path) -> dict:
  """config.json, checked to describe a model cpm_jax's CPM-LM computes exactly."""
  path = directory / "config.json"
  try:
    hf = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: cannot read the model config ({e}).") from e
  checks = [("model_type", hf.get("model_type"), "gpt2"),
            ("activation_function", hf.get("activation_function", "gelu_new") in TANH_GELUS, True),
            ("scale_attn_weights", hf.get("scale_attn_weights", True), True),
            ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), False),
            ("add_cross_attention", hf.get("add_cross_attention", False), False)]
  for name, value, wanted in checks:
    if value != wanted:
      raise ConversionError(f"{path}: {name}={hf.get(name)!r} is not a CPM-LM setting (CPM is a GPT-2 with "
                            f"model_type 'gpt2', tanh GELU {TANH_GELUS}, 1/sqrt(head_dim) attention scale).")
  return hf


def gpt2_config(config: cpm.CPMConfig) -> dict:
  """A GPT2Config (config.json) for `config`; <eod>=7 ends documents, <pad>=5."""
  dropout = config.dropout_rate
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
          "n_positions": config.max_positions, "n_embd": config.embed_dim, "n_layer": config.num_layers,
          "n_head": config.num_heads, "n_inner": config.mlp_dim, "activation_function": "gelu_new",
          "layer_norm_epsilon": config.layer_norm_eps, "resid_pdrop": dropout, "embd_pdrop": dropout,
          "attn_pdrop": dropout, "initializer_range": config.init_stddev, "tie_word_embeddings": True,
          "scale_attn_weights": True, "bos_token_id": 7, "eos_token_id": 7, "pad_token_id": 5,
          "dtype": config.param_dtype}


def load_hf(path: str | os.PathLike, *, config: cpm.CPMConfig | None = None, num_heads: int | None = None,
            dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
            trust_pickle: bool = False) -> Loaded:
  """CPM-LM params from a GPT2LMHeadModel directory; `config` (e.g. from gin) is checked against it.

  dtype: of the params (default: the checkpoint's). With `mesh`, each parameter is placed with its
  NamedSharding as soon as it is converted.
  """
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise ConversionError(f"{directory}: not a directory (expected a Hugging Face GPT2LMHeadModel directory).")
  hf = read_config(directory)
  weights = hf_io.Weights(directory, trust_pickle)
  prefix = "transformer." if "transformer.wte.weight" in weights.ledger else ""
  (vocab, embed), wte_dtype = weights.spec(prefix + "wte.weight")
  layer_ids = [int(m.group(1)) for key in weights.keys()
               if (m := re.fullmatch(re.escape(prefix) + r"h\.(\d+)\.ln_1\.weight", key))]
  found = {"vocab_size": vocab, "embed_dim": embed, "max_positions": weights.spec(prefix + "wpe.weight")[0][0],
           "num_layers": max(layer_ids, default=-1) + 1, "ffn_dim": weights.spec(prefix + "h.0.mlp.c_fc.weight")[0][1],
           "num_heads": hf.get("n_head"), "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5)}
  for name, hf_name in (("vocab_size", "vocab_size"), ("embed_dim", "n_embd"), ("num_layers", "n_layer"),
                        ("max_positions", "n_positions")):
    if hf.get(hf_name, found[name]) != found[name]:
      raise ConversionError(f"{directory / 'config.json'}: {hf_name}={hf[hf_name]} but the weights have "
                            f"{name}={found[name]}.")
  config, note = cpm_layout.resolve_config(found, f"{directory / 'config.json'}", config, num_heads,
                                           dtype or wte_dtype.name)
  ignore = lambda name: name == "lm_head.weight" or bool(_BUFFER.fullmatch(name))  # noqa: E731
  tensors = table.stored_tensors(cpm_layout.abstract_params(config), cpm_layout.HF_ENTRIES, prefix)
  weights.ledger.expect({t.key for t in tensors}, ignore)

  def read(key: str, split: megatron.Split) -> tuple[np.ndarray, str]:
    del split  # one file holds the whole tensor
    array, origin = weights.read(prefix + key)
    if key == "wte.weight" and "lm_head.weight" in weights.ledger:
      head, head_origin = weights.read("lm_head.weight")
      if not np.array_equal(head, array):
        raise ConversionError(f"{head_origin} differs from {origin}; CPM-LM ties its output head to the word "
                              "embedding (tie_word_embeddings).")
    return array, origin

  params = cpm_layout.load_params(config, cpm_layout.HF_ENTRIES, read, mesh)
  weights.ledger.check_all_taken(lambda name: bool(_BUFFER.fullmatch(name)))
  return Loaded(params, config, [note])


def save_hf(params: dict, config: cpm.CPMConfig, path: str | os.PathLike) -> pathlib.Path:
  """Writes a GPT2LMHeadModel directory (config.json, model.safetensors) atomically, tensor by tensor."""
  tensors = table.stored_tensors(params, cpm_layout.HF_ENTRIES, "transformer.")
  with atomic_output_dir(path) as tmp:
    (tmp / "config.json").write_text(json.dumps(gpt2_config(config), indent=2) + "\n")
    safetensors_io.write(tmp / "model.safetensors", [(t.key, t.dtype, t.shape) for t in tensors],
                         table.stored_arrays(params, tensors), {"format": "pt"})
  return pathlib.Path(path)
