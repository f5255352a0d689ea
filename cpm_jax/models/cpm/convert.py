"""CPM-LM parameters <-> HF GPT-2 and Megatron key layouts: one table, config inference, exactly-once loading.

Every cpm_jax parameter is one row of `_entries`, read as `table.Entry`s of either format. Its *HF layout*
(GPT2LMHeadModel, Conv1D weights [in, out]) is a reshape of the cpm_jax array per layer: matrices keep their
`in_dims` leading dims as rows; vectors are flattened. Megatron's layout is the HF one, transposed for torch Linear
weights ([out, in]).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp

from cpm_jax import layers
from cpm_jax.convert import megatron, table
from cpm_jax.convert.common import ConversionError, Loaded
from cpm_jax.models.cpm import model as cpm

# hidden size -> heads of the released CPM sizes (small, medium, large)
KNOWN_HEADS = {768: 12, 1024: 16, 2560: 32}


def _entries(in_megatron: bool) -> tuple[table.Entry, ...]:
  """The table in the HF layout (keys without "transformer.") or in Megatron's."""
  def entry(target: str, hf: str, meg: str, split: megatron.Split, in_dims: int = 0, linear: bool = False):
    return table.Entry(target, meg if in_megatron else hf, split, in_dims, transposed=linear and in_megatron)

  def norm(target: str, hf: str, meg: str):
    return [entry(f"{target}/scale", f"{hf}.weight", f"{meg}.weight", megatron.REPLICATED),
            entry(f"{target}/bias", f"{hf}.bias", f"{meg}.bias", megatron.REPLICATED)]

  layer = "transformer.layers.{i}"
  return (
      entry("embed/wte", "wte.weight", "word_embeddings.weight", megatron.COLUMN, in_dims=1),
      entry("embed/wpe", "wpe.weight", "position_embeddings.weight", megatron.REPLICATED, in_dims=1),
      *norm("blocks/ln_1", "h.{i}.ln_1", f"{layer}.input_layernorm"),
      entry("blocks/attn/qkv_kernel", "h.{i}.attn.c_attn.weight", f"{layer}.attention.query_key_value.weight",
            megatron.QKV, in_dims=1, linear=True),
      entry("blocks/attn/qkv_bias", "h.{i}.attn.c_attn.bias", f"{layer}.attention.query_key_value.bias",
            megatron.QKV),
      entry("blocks/attn/out_kernel", "h.{i}.attn.c_proj.weight", f"{layer}.attention.dense.weight", megatron.ROW,
            in_dims=2, linear=True),
      entry("blocks/attn/out_bias", "h.{i}.attn.c_proj.bias", f"{layer}.attention.dense.bias", megatron.REPLICATED),
      *norm("blocks/ln_2", "h.{i}.ln_2", f"{layer}.post_attention_layernorm"),
      entry("blocks/mlp/in_kernel", "h.{i}.mlp.c_fc.weight", f"{layer}.mlp.dense_h_to_4h.weight", megatron.COLUMN,
            in_dims=1, linear=True),
      entry("blocks/mlp/in_bias", "h.{i}.mlp.c_fc.bias", f"{layer}.mlp.dense_h_to_4h.bias", megatron.COLUMN),
      entry("blocks/mlp/out_kernel", "h.{i}.mlp.c_proj.weight", f"{layer}.mlp.dense_4h_to_h.weight", megatron.ROW,
            in_dims=1, linear=True),
      entry("blocks/mlp/out_bias", "h.{i}.mlp.c_proj.bias", f"{layer}.mlp.dense_4h_to_h.bias", megatron.REPLICATED),
      *norm("ln_f", "ln_f", "transformer.final_layernorm"),
  )


HF_ENTRIES = _entries(in_megatron=False)
MEGATRON_ENTRIES = _entries(in_megatron=True)


# ---- config ------------------------------------------------------------------------------------

def resolve_config(found: dict[str, Any], where: str, base: cpm.CPMConfig | None = None,
                   num_heads: int | None = None, dtype: str = "float32") -> tuple[cpm.CPMConfig, str]:
  """The model config of a checkpoint, checked against `base` (a gin config) when given.

  found: what the checkpoint says: vocab_size, num_layers, embed_dim, ffn_dim, max_positions, and
  optionally num_heads / layer_norm_eps. Heads come from `num_heads`, the checkpoint, `base`, or the
  released CPM sizes, in that order; all that are given must agree. Returns (config, how heads were found).
  """
  found = dict(found)
  claims = [(value, source) for value, source in ((num_heads, "num_heads (--num_heads)"),
                                                  (found.pop("num_heads", None), where),
                                                  (base and base.num_heads, "the gin model config"))
            if value is not None]
  if claims:
    heads, heads_note = claims[0][0], f"num_heads={claims[0][0]} from {claims[0][1]}"
    for value, source in claims[1:]:
      if value != heads:
        raise ConversionError(f"num_heads disagree: {heads} from {claims[0][1]} but {value} from {source}.")
  elif found["embed_dim"] in KNOWN_HEADS:
    heads = KNOWN_HEADS[found["embed_dim"]]
    heads_note = f"num_heads={heads} inferred from hidden size {found['embed_dim']} (a released CPM size)"
  else:
    raise ConversionError(f"{where}: the number of attention heads cannot be read from the weights (hidden size "
                          f"{found['embed_dim']} is no released CPM size {sorted(KNOWN_HEADS)}); pass --num_heads "
                          "or a gin model config.")
  try:
    jnp.dtype(dtype)
  except TypeError as e:
    raise ConversionError(f"dtype {dtype!r} is not a dtype name (e.g. float32, bfloat16, float16).") from e
  ffn = found.pop("ffn_dim")
  if base is not None:
    mismatched = [f"{name}: checkpoint {value}, gin {getattr(base, name)}" for name, value in found.items()
                  if getattr(base, name) != value]
    if base.ffn_dim != ffn:
      mismatched.append(f"ffn_dim: checkpoint {ffn}, gin {base.ffn_dim}")
    if mismatched:
      raise ConversionError(f"{where} does not match the gin model config: {'; '.join(mismatched)}.")
  try:
    config = dataclasses.replace(base or cpm.CPMConfig(), **found, num_heads=heads,
                                 mlp_dim=ffn, param_dtype=dtype)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e
  return config, heads_note


# ---- params ------------------------------------------------------------------------------------

def summary(config: cpm.CPMConfig) -> str:
  """What the config says of the weights' shapes, for shape errors."""
  return (f"{config.num_layers} layers, hidden {config.embed_dim}, {config.num_heads} heads, ffn {config.ffn_dim}, "
          f"vocab {config.vocab_size}, positions {config.max_positions}")


def abstract_params(config: cpm.CPMConfig) -> dict:
  return layers.abstract_params(cpm.param_specs(config), config.param_dtype)


def load_params(config: cpm.CPMConfig, entries: tuple[table.Entry, ...], read: table.Reader,
                mesh: jax.sharding.Mesh | None = None) -> dict:
  """Params of `config` by `table.load_params`, placed on `mesh` (sharded) as each parameter is assembled."""
  return table.load_params(cpm.param_specs(config), config.param_dtype, entries, read, mesh=mesh,
                           config_summary=summary(config))


# ---- Megatron / DeepSpeed shards ---------------------------------------------------------------

def load_megatron(path: str | os.PathLike, *, tag: str | None = None, config: cpm.CPMConfig | None = None,
                  num_heads: int | None = None, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                  trust_pickle: bool = False) -> Loaded:
  """CPM-LM params from CPM's model-parallel shards (any number of ranks), merged tensor by tensor.

  Heads cannot be read from the weights: give `num_heads` or `config`, or they are inferred from the
  released sizes (the returned notes say which).
  """
  shards = megatron.read_shards(path, tag, trust_pickle)
  layer_norms = (re.fullmatch(r"transformer\.layers\.(\d+)\.input_layernorm\.weight", key) for key in shards.keys())
  layer_ids = [int(m.group(1)) for m in layer_norms if m]
  vocab, embed = megatron.merged_shape(megatron.COLUMN, shards.shapes("word_embeddings.weight"))
  ffn = megatron.merged_shape(megatron.COLUMN, shards.shapes("transformer.layers.0.mlp.dense_h_to_4h.weight"))[0]
  found = {"vocab_size": vocab, "embed_dim": embed, "num_layers": max(layer_ids, default=-1) + 1, "ffn_dim": ffn,
           "max_positions": shards.shapes("position_embeddings.weight")[0][0]}
  source_dtype = shards.dtype("word_embeddings.weight")
  config, note = resolve_config(found, shards.where, config, num_heads, dtype or source_dtype.name)
  shards.ledger.expect({t.key for t in table.stored_tensors(abstract_params(config), MEGATRON_ENTRIES)})
  params = load_params(config, MEGATRON_ENTRIES, shards.read, mesh)
  shards.ledger.check_all_taken()
  return Loaded(params, config, [note, f"merged {shards.num_ranks} model-parallel rank(s) of {shards.directory}"])


def save_megatron(params: dict, config: cpm.CPMConfig, path: str | os.PathLike, num_ranks: int,
                  tag: str = "release") -> pathlib.Path:
  """Writes CPM's Megatron/DeepSpeed layout split over `num_ranks` model-parallel ranks, atomically."""
  return megatron.save_shards(params, config, MEGATRON_ENTRIES, path, num_ranks, tag)
