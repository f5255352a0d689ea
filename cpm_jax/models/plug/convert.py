"""PLUG / StructBERT / BERT checkpoints <-> cpm_jax.models.plug params.

One table (`entries`, of `convert.table.Entry`s) names every tensor by the release's key (FORMATS.md), with how it is
split over DeepSpeed model-parallel ranks and how its torch layout (Linear weights [out, in]) maps onto our array.
Sources: PLUG's `mp_rank_XX_model_states.pt` shards (any rank count), Hugging Face BertModel /
BertForMaskedLM / BertForPreTraining (post-LN; separate query/key/value are fused on the fly), and our
own Orbax params. Every parameter is assigned exactly once and every source key must be used (the
shared ledgers of `cpm_jax.convert.common`); outputs appear only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import layers
from cpm_jax.convert import hf_io, megatron, table, torch_io
from cpm_jax.convert.common import ConversionError, KeyLedger, Loaded, flatten
from cpm_jax.convert.table import Entry
from cpm_jax.models.plug import model as plug

DECODER_WEIGHT = "cls.predictions.decoder_weight"  # PLUG's tied copy of the word embedding (vocab-split)
# Heads a source may lack; they are initialised from the config (and reported) when absent.
OPTIONAL_GROUPS = ("mlm", "pooler", "relation", "classifier")


def _linear(key: str, target: str, weight: str, bias: str, split: megatron.Split, in_dims: int = 1) -> list[Entry]:
  """A torch Linear: column-parallel weights split their bias the same way; row-parallel biases are replicated."""
  bias_split = megatron.REPLICATED if split == megatron.ROW else split
  return [Entry(f"{target}/{weight}", f"{key}.weight", split, in_dims, transposed=True),
          Entry(f"{target}/{bias}", f"{key}.bias", bias_split)]


def _norm(key: str, target: str) -> list[Entry]:
  return [Entry(f"{target}/scale", f"{key}.weight"), Entry(f"{target}/bias", f"{key}.bias")]


def _dense(key: str, target: str) -> list[Entry]:
  return _linear(key, target, "kernel", "bias", megatron.REPLICATED)


def entries(config: plug.PlugConfig) -> list[Entry]:
  """Every release tensor of a model with this config."""
  col, row, rep = megatron.COLUMN, megatron.ROW, megatron.REPLICATED
  e = "bert.encoder.layer.{i}."
  ln_1, ln_2 = ("attention.LayerNorm", "LayerNorm") if config.encoder_pre_ln else (
      "attention.output.LayerNorm", "output.LayerNorm")
  out = [Entry("embed/wte", "bert.embeddings.word_embeddings.weight", col, 1),
         Entry("embed/wpe", "bert.embeddings.position_embeddings.weight", rep, 1),
         Entry("embed/wtt", "bert.embeddings.token_type_embeddings.weight", rep, 1),
         *_norm("bert.embeddings.LayerNorm", "embed/ln"),
         *_norm(e + ln_1, "encoder/blocks/ln_1"),
         *_linear(e + "attention.self.query_key_value", "encoder/blocks/attn", "qkv_kernel", "qkv_bias",
                  megatron.QKV),
         *_linear(e + "attention.output.dense", "encoder/blocks/attn", "out_kernel", "out_bias", row, 2),
         *_norm(e + ln_2, "encoder/blocks/ln_2"),
         *_linear(e + "intermediate.dense", "encoder/blocks/mlp", "in_kernel", "in_bias", col),
         *_linear(e + "output.dense", "encoder/blocks/mlp", "out_kernel", "out_bias", row)]
  if config.encoder_pre_ln:
    out += _norm("bert.encoder.LayerNorm", "encoder/ln_f")
  if config.num_decoder_layers:
    d, b = "decoder.decoder.layer.{i}.", "decoder/blocks"
    out += [*_norm(d + "input_layernorm", f"{b}/ln_1"),
            *_linear(d + "attention.query_key_value", f"{b}/self_attn", "qkv_kernel", "qkv_bias", megatron.QKV),
            *_linear(d + "attention.dense", f"{b}/self_attn", "out_kernel", "out_bias", row, 2),
            *_norm(d + "post_attention_layernorm", f"{b}/ln_2"),
            *_linear(d + "cross_attention.query", f"{b}/cross_attn", "q_kernel", "q_bias", col),
            *_linear(d + "cross_attention.key_value", f"{b}/cross_attn", "qkv_kernel", "qkv_bias", megatron.KV),
            *_linear(d + "cross_attention.dense", f"{b}/cross_attn", "out_kernel", "out_bias", row, 2),
            *_norm(d + "post_cross_attention_layernorm", f"{b}/ln_3"),
            *_linear(d + "intermediate", f"{b}/mlp", "in_kernel", "in_bias", col),
            *_linear(d + "output", f"{b}/mlp", "out_kernel", "out_bias", row),
            *_norm("decoder.decoder.final_layernorm", "decoder/ln_f")]
  out += [*_linear("cls.predictions.transform.dense", "mlm", "dense_kernel", "dense_bias", rep),
          *_norm("cls.predictions.transform.LayerNorm", "mlm/ln"),
          Entry("mlm/bias", "cls.predictions.bias", col)]
  if config.has_pooler:
    out += _dense("bert.pooler.dense", "pooler")
  if config.num_relations:
    out += _dense("cls.seq_relationship", "relation")
  if config.num_classes:
    out += _dense("classifier", "classifier")
  return out


# ---- loading -----------------------------------------------------------------------------------

def load_params(config: plug.PlugConfig, read: table.Reader, present: Callable[[str], bool],
                mesh: jax.sharding.Mesh | None = None, init_key: jax.Array | None = None) -> tuple[dict, list[str]]:
  """Params of `config` by `table.load_params` (placed on `mesh` as they arrive); returns (params, notes).

  Optional head groups whose keys are not `present` are initialised from the config (noted).
  """
  specs = plug.param_specs(config)
  wanted = entries(config)
  group = lambda entry: entry.target.split("/")[0]  # noqa: E731
  absent = sorted({group(e) for e in wanted if group(e) in OPTIONAL_GROUPS}
                  - {group(e) for e in wanted if present(e.key.format(i=0))})
  fresh = {}
  if absent:
    key = jax.random.key(0) if init_key is None else init_key
    initialised = layers.init_from_specs({name: specs[name] for name in absent}, key, jnp.dtype(config.param_dtype))
    fresh = {path: np.asarray(value) for path, value in flatten(initialised).items()}
  params = table.load_params(specs, config.param_dtype, [e for e in wanted if group(e) not in absent], read,
                             mesh=mesh, config_summary="layers, hidden, heads, FFN, vocab, positions, token types",
                             fresh=fresh)
  return params, [f"initialised {name} from the config (not in the checkpoint)" for name in absent]


def _check_tied(params: dict, tied: np.ndarray, origin: str) -> None:
  """decoder_weight must equal the word embedding."""
  wte = np.asarray(params["embed"]["wte"])
  if not np.array_equal(tied.astype(wte.dtype), wte):
    raise ConversionError(f"{origin}: should be tied to bert.embeddings.word_embeddings.weight but differs from it.")


def load_deepspeed(path: str | os.PathLike, *, config: plug.PlugConfig | None = None, tag: str | None = None,
                   dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                   trust_pickle: bool = False) -> Loaded:
  """PLUG params from its model-parallel DeepSpeed shards (any rank count), merged tensor by tensor.

  Heads cannot be read from the weights, so the shapes are checked against `config` (default: PLUG 27B).
  """
  shards = megatron.read_shards(path, tag, trust_pickle)
  source_dtype = shards.dtype("bert.embeddings.word_embeddings.weight")
  config = dataclasses.replace(config or plug.PlugConfig(), param_dtype=dtype or source_dtype.name)
  keys = set(shards.keys())
  params, notes = load_params(config, shards.read, keys.__contains__, mesh)
  if DECODER_WEIGHT in keys:
    _check_tied(params, *shards.read(DECODER_WEIGHT, megatron.COLUMN))
  shards.ledger.check_all_taken()
  return Loaded(params, config, notes + [f"merged {shards.num_ranks} model-parallel rank(s) of {shards.directory}"])


class _HFBert:
  """Reads a Hugging Face BERT state under PLUG's key names (q/k/v fused, `bert.` prefix as needed)."""

  def __init__(self, keys: list[str], read: Callable[[str], tuple[np.ndarray, str]]):
    self._keys, self._read = set(keys), read
    self._prefix = "bert." if any(k.startswith("bert.") for k in keys) else ""

  def name(self, key: str) -> str:
    return self._prefix + key[len("bert."):] if key.startswith("bert.") else key

  def present(self, key: str) -> bool:
    return self.name(key.replace("query_key_value", "query")) in self._keys

  def read(self, key: str, split: megatron.Split) -> tuple[np.ndarray, str]:
    del split
    if ".query_key_value." not in key:
      return self._read(self.name(key))
    parts = [self._read(self.name(key.replace("query_key_value", p))) for p in ("query", "key", "value")]
    return np.concatenate([array for array, _ in parts]), parts[0][1].replace(".query.", ".{query,key,value}.")


def _load_hf_bert(keys: list[str], read, ledger: KeyLedger, config: plug.PlugConfig, mesh, init_key) -> tuple:
  if config.encoder_pre_ln or config.num_decoder_layers:
    raise ConversionError("A Hugging Face BERT checkpoint is a post-LN encoder: use a model config with "
                          "encoder_pre_ln=False and num_decoder_layers=0 (e.g. "
                          "gin_configs/models/structbert_large.gin).")
  source = _HFBert(keys, read)
  params, notes = load_params(config, source.read, source.present, mesh, init_key)
  for tied in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
    if tied in ledger:
      reference = params["embed"]["wte"] if tied.endswith("weight") else params["mlm"]["bias"]
      array, origin = read(tied)
      if not np.array_equal(array.astype(np.asarray(reference).dtype), np.asarray(reference)):
        raise ConversionError(f"{origin}: should be tied but differs from the parameter it is tied to.")
  ledger.check_all_taken(ignore=lambda key: key.endswith("position_ids"))
  return params, notes


def params_from_hf_state(state: Mapping[str, Any], config: plug.PlugConfig,
                         init_key: jax.Array | None = None) -> tuple[dict, list[str]]:
  """Params from an in-memory HF BertModel / BertForMaskedLM state dict of torch tensors (e.g. `model.state_dict()`);
  returns (params, notes on heads initialised from the config)."""
  ledger = KeyLedger(state, "Hugging Face BERT state dict")

  def read(key: str) -> tuple[np.ndarray, str]:
    ledger.take(key)
    return torch_io.to_numpy(state[key]), key

  return _load_hf_bert(list(state), read, ledger, config, None, init_key)


def load_hf_bert(path: str | os.PathLike, *, config: plug.PlugConfig, dtype: str | None = None,
                 mesh: jax.sharding.Mesh | None = None, trust_pickle: bool = False) -> Loaded:
  """Encoder params from a Hugging Face BERT directory (config.json + safetensors / pytorch_model.bin)."""
  directory = pathlib.Path(path)
  try:
    hf_config = json.loads((directory / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f"{directory / 'config.json'}: cannot read a BERT config ({e}).") from e
  expected = {"hidden_act": "gelu", "num_attention_heads": config.num_heads, "layer_norm_eps": config.layer_norm_eps,
              "num_hidden_layers": config.num_encoder_layers}
  wrong = [f"{name}={hf_config.get(name)!r} (model config: {value!r})" for name, value in expected.items()
           if hf_config.get(name, value) != value]
  if wrong:
    raise ConversionError(f"{directory / 'config.json'} does not match the model config: {'; '.join(wrong)}.")
  weights = hf_io.Weights(directory, trust_pickle)
  config = dataclasses.replace(config, param_dtype=dtype or config.param_dtype)
  params, notes = _load_hf_bert(weights.keys(), weights.read, weights.ledger, config, mesh, None)
  return Loaded(params, config, notes + [f"read Hugging Face BERT {directory}"])


# ---- writing -----------------------------------------------------------------------------------

def state_from_params(params: dict, config: plug.PlugConfig) -> dict[str, np.ndarray]:
  """The full (merged) release state dict, numpy, including the tied decoder_weight."""
  tensors = table.stored_tensors(params, entries(config))
  state = {t.key: array for t, array in zip(tensors, table.stored_arrays(params, tensors))}
  state[DECODER_WEIGHT] = state["bert.embeddings.word_embeddings.weight"]
  return state


def save_deepspeed(params: dict, config: plug.PlugConfig, path: str | os.PathLike, num_ranks: int,
                   tag: str = "release") -> pathlib.Path:
  """Writes PLUG's DeepSpeed layout split over `num_ranks` model-parallel ranks, atomically (decoder_weight: the
  word embedding's tensor, stored once)."""
  return megatron.save_shards(params, config, entries(config), path, num_ranks, tag,
                              aliases={DECODER_WEIGHT: "bert.embeddings.word_embeddings.weight"})

