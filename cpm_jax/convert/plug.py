"""PLUG / StructBERT / BERT checkpoints <-> cpm_jax.models.plug params.

A full (merged) PLUG state dict uses the release's key names (FORMATS.md); torch Linear weights are
[out, in]. Hugging Face BertModel / BertForMaskedLM state dicts are mapped onto the same names first
(separate query/key/value fused into query_key_value), so one table serves both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import layers
from cpm_jax.models import plug

# Keys that hold no parameter of their own: tied copies of the word embedding, buffers.
TIED_KEYS = ("cls.predictions.decoder_weight", "cls.predictions.decoder.weight")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor: its key, our param path, layer index (stacked) and layout.

  in_dims: None for vectors / embeddings (reshaped as is); k for a torch Linear weight [out, in] whose
  transpose is our kernel with the first k dims forming `in`.
  """

  key: str
  path: tuple[str, ...]
  layer: int | None = None
  in_dims: int | None = None


def to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy / jax array or a torch tensor (bfloat16 tensors become float32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _linear(prefix: str, path: tuple, weight: str, bias: str, layer=None, in_dims=1) -> list[Entry]:
  return [Entry(f"{prefix}.weight", path[:-1] + (weight,), layer, in_dims),
          Entry(f"{prefix}.bias", path[:-1] + (bias,), layer)]


def _norm(prefix: str, path: tuple, layer=None) -> list[Entry]:
  return [Entry(f"{prefix}.weight", path + ("scale",), layer), Entry(f"{prefix}.bias", path + ("bias",), layer)]


def entries(config: plug.PlugConfig) -> list[Entry]:
  """Every checkpoint tensor of a model with this config, in the release's key names."""
  out = [Entry("bert.embeddings.word_embeddings.weight", ("embed", "wte")),
         Entry("bert.embeddings.position_embeddings.weight", ("embed", "wpe")),
         Entry("bert.embeddings.token_type_embeddings.weight", ("embed", "wtt")),
         *_norm("bert.embeddings.LayerNorm", ("embed", "ln"))]
  blocks = ("encoder", "blocks")
  for n in range(config.num_encoder_layers):
    p = f"bert.encoder.layer.{n}."
    attn = blocks + ("attn", "_")
    out += _linear(p + "attention.self.query_key_value", attn, "qkv_kernel", "qkv_bias", n)
    out += _linear(p + "attention.output.dense", attn, "out_kernel", "out_bias", n, in_dims=2)
    out += _linear(p + "intermediate.dense", blocks + ("mlp", "_"), "in_kernel", "in_bias", n)
    out += _linear(p + "output.dense", blocks + ("mlp", "_"), "out_kernel", "out_bias", n)
    ln_1, ln_2 = ("attention.LayerNorm", "LayerNorm") if config.encoder_pre_ln else (
        "attention.output.LayerNorm", "output.LayerNorm")
    out += _norm(p + ln_1, blocks + ("ln_1",), n) + _norm(p + ln_2, blocks + ("ln_2",), n)
  if config.encoder_pre_ln:
    out += _norm("bert.encoder.LayerNorm", ("encoder", "ln_f"))
  blocks = ("decoder", "blocks")
  for n in range(config.num_decoder_layers):
    p = f"decoder.decoder.layer.{n}."
    self_attn, cross = blocks + ("self_attn", "_"), blocks + ("cross_attn", "_")
    out += _linear(p + "attention.query_key_value", self_attn, "qkv_kernel", "qkv_bias", n)
    out += _linear(p + "attention.dense", self_attn, "out_kernel", "out_bias", n, in_dims=2)
    out += _linear(p + "cross_attention.query", cross, "q_kernel", "q_bias", n)
    out += _linear(p + "cross_attention.key_value", cross, "qkv_kernel", "qkv_bias", n)
    out += _linear(p + "cross_attention.dense", cross, "out_kernel", "out_bias", n, in_dims=2)
    out += _norm(p + "input_layernorm", blocks + ("ln_1",), n)
    out += _norm(p + "post_attention_layernorm", blocks + ("ln_2",), n)
    out += _norm(p + "post_cross_attention_layernorm", blocks + ("ln_3",), n)
    out += _linear(p + "intermediate", blocks + ("mlp", "_"), "in_kernel", "in_bias", n)
    out += _linear(p + "output", blocks + ("mlp", "_"), "out_kernel", "out_bias", n)
  if config.num_decoder_layers:
    out += _norm("decoder.decoder.final_layernorm", ("decoder", "ln_f"))
  out += _linear("cls.predictions.transform.dense", ("mlm", "_"), "dense_kernel", "dense_bias")
  out += _norm("cls.predictions.transform.LayerNorm", ("mlm", "ln"))
  out.append(Entry("cls.predictions.bias", ("mlm", "bias")))
  if config.has_pooler:
    out += _linear("bert.pooler.dense", ("pooler", "_"), "kernel", "bias")
  if config.num_relations:
    out += _linear("cls.seq_relationship", ("relation", "_"), "kernel", "bias")
  if config.num_classes:
    out += _linear("classifier", ("classifier", "_"), "kernel", "bias")
  return out


def _shape_of(specs: dict, entry: Entry) -> tuple[int, ...]:
  spec = specs
  for name in entry.path:
    spec = spec[name]
  return spec.shape[1:] if entry.layer is not None else spec.shape


def _to_ours(array: np.ndarray, entry: Entry, shape: tuple[int, ...]) -> np.ndarray:
  if entry.in_dims is not None:
    array = array.T
  if array.size != math.prod(shape):
    raise ValueError(f"Checkpoint key {entry.key!r} has shape {array.shape}; expected "
                     f"{math.prod(shape)} elements for {'/'.join(entry.path)} {shape}. Check the model config.")
  return array.reshape(shape)


def _to_theirs(array: np.ndarray, entry: Entry) -> np.ndarray:
  if entry.in_dims is None:
    return array.reshape(-1) if array.ndim > 1 and entry.path[-1].endswith("bias") else array
  return array.reshape(math.prod(array.shape[:entry.in_dims]), -1).T


def _set(tree: dict, path: tuple, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def params_from_state(state: Mapping[str, Any], config: plug.PlugConfig, *, allow_missing: tuple[str, ...] = (),
                      init_key: jax.Array | None = None) -> tuple[dict, list[str]]:
  """Our params from a full PLUG-named state dict of numpy arrays; returns (params, initialised keys).

  Keys missing from `state` are an error unless their our-side top-level group (e.g. "pooler",
  "relation", "classifier") is in `allow_missing`; those get fresh values from the config's init
  (`init_key`). Unknown keys are an error, except tied copies of the word embedding, which must equal it.
  """
  specs = plug.param_specs(config)
  wanted = entries(config)
  missing = [e for e in wanted if e.key not in state]
  not_allowed = [e.key for e in missing if e.path[0] not in allow_missing]
  if not_allowed:
    raise KeyError(f"Checkpoint lacks {len(not_allowed)} keys the model needs, e.g. {not_allowed[:5]}.")
  known = {e.key for e in wanted}
  unexpected = sorted(k for k in state if k not in known and k not in TIED_KEYS and not k.endswith("position_ids"))
  if unexpected:
    raise KeyError(f"Checkpoint has {len(unexpected)} keys this model config does not use, e.g. "
                   f"{unexpected[:5]}; check num_*_layers / encoder_pre_ln / heads in the config.")
  groups = {e.path[0] for e in missing}
  fresh = layers.init_from_specs({g: specs[g] for g in groups}, jax.random.key(0) if init_key is None else init_key,
                                 jnp.dtype(config.param_dtype))

  stacks: dict[tuple, dict[int, np.ndarray]] = {}
  params: dict = {}
  for entry in wanted:
    if entry.key not in state:
      value = fresh
      for name in entry.path:
        value = value[name]
      _set(params, entry.path, np.asarray(value))
      continue
    value = _to_ours(to_numpy(state[entry.key]), entry, _shape_of(specs, entry))
    if entry.layer is None:
      _set(params, entry.path, value)
    else:
      stacks.setdefault(entry.path, {})[entry.layer] = value
  for path, by_layer in stacks.items():
    if path not in {e.path for e in missing}:
      _set(params, path, np.stack([by_layer[i] for i in range(len(by_layer))]))
  wte = params["embed"]["wte"]
  for key in TIED_KEYS:
    if key in state and not np.array_equal(to_numpy(state[key]), wte):
      raise ValueError(f"Checkpoint key {key!r} should be tied to the word embedding but differs from it.")
  return params, sorted({e.key for e in missing})


def state_from_params(params: dict, config: plug.PlugConfig) -> dict[str, np.ndarray]:
  """A full PLUG-named state dict (numpy, torch layout) from our params, with the tied decoder_weight."""
  params = jax.tree.map(to_numpy, params)
  state = {}
  for entry in entries(config):
    value = params
    for name in entry.path:
      value = value[name]
    value = value if entry.layer is None else value[entry.layer]
    state[entry.key] = _to_theirs(value, entry)
  state["cls.predictions.decoder_weight"] = state["bert.embeddings.word_embeddings.weight"]
  return state


# ---- Hugging Face BERT ---------------------------------------------------------------------------

def state_from_hf_bert(hf_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Renames a BertModel / BertForMaskedLM state dict to PLUG's post-LN key names (q, k, v fused)."""
  state = {(k if k.startswith(("bert.", "cls.")) else "bert." + k): to_numpy(v) for k, v in hf_state.items()}
  state.pop("cls.predictions.decoder.bias", None)  # HF ties it to cls.predictions.bias
  layer_prefixes = {k.split(".attention.self.")[0] for k in state if ".attention.self.query." in k}
  for prefix in layer_prefixes:
    for kind in ("weight", "bias"):
      parts = [state.pop(f"{prefix}.attention.self.{p}.{kind}") for p in ("query", "key", "value")]
      state[f"{prefix}.attention.self.query_key_value.{kind}"] = np.concatenate(parts, axis=0)
  return state


def params_from_hf_bert(hf_state: Mapping[str, Any], config: plug.PlugConfig,
                        init_key: jax.Array | None = None) -> tuple[dict, list[str]]:
  """Our encoder params from a Hugging Face BertModel / BertForMaskedLM (post-LN) state dict.

  Heads the HF checkpoint lacks (MLM head for BertModel; pooler / relation / classifier for
  BertForMaskedLM) are initialised from the config; their keys are returned.
  """
  if config.encoder_pre_ln or config.num_decoder_layers:
    raise ValueError("params_from_hf_bert: BERT is a post-LN encoder; use a config with encoder_pre_ln=False "
                     "and num_decoder_layers=0.")
  return params_from_state(state_from_hf_bert(hf_state), config,
                           allow_missing=("mlm", "pooler", "relation", "classifier"), init_key=init_key)
