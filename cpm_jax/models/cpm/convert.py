"""CPM-LM parameters <-> HF GPT-2 and Megatron key layouts: one table, config inference, exactly-once loading.


Every cpm_jax parameter is one `Entry`. Its *HF layout* (GPT2LMHeadModel, Conv1D weights [in, out]) is a
reshape of the cpm_jax array per layer: matrices keep their `in_dims` leading dims as rows; vectors are
flattened. Megatron's layout is the HF one, transposed for torch Linear weights ([out, in]).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import layers, partitioning
from cpm_jax.convert import megatron, torch_io
from cpm_jax.convert.common import ConversionError, Loaded, TargetParams, device_placer, flatten
from cpm_jax.models.cpm import model as cpm

# hidden size -> heads of the released CPM sizes (small, medium, large)
KNOWN_HEADS = {768: 12, 1024: 16, 2560: 32}


@dataclasses.dataclass(frozen=True)
class Entry:
  target: str            # path in the cpm_jax params tree
  hf: str                # GPT2LMHeadModel key without "transformer."; "{i}" = layer
  megatron: str          # Megatron/DeepSpeed module key
  split: megatron.Split  # over model-parallel ranks, in the Megatron layout
  in_dims: int = 0       # matrices: how many leading cpm_jax dims form the input (HF rows); 0 = vector
  linear: bool = False   # torch Linear weight in Megatron ([out, in] = HF transposed)

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def _norm(target: str, hf: str, meg: str) -> list[Entry]:
  return [Entry(f"{target}/scale", f"{hf}.weight", f"{meg}.weight", megatron.REPLICATED),
          Entry(f"{target}/bias", f"{hf}.bias", f"{meg}.bias", megatron.REPLICATED)]


_LAYER = "transformer.layers.{i}"
ENTRIES: tuple[Entry, ...] = (
    Entry("embed/wte", "wte.weight", "word_embeddings.weight", megatron.COLUMN, in_dims=1),
    Entry("embed/wpe", "wpe.weight", "position_embeddings.weight", megatron.REPLICATED, in_dims=1),
    *_norm("blocks/ln_1", "h.{i}.ln_1", f"{_LAYER}.input_layernorm"),
    Entry("blocks/attn/qkv_kernel", "h.{i}.attn.c_attn.weight", f"{_LAYER}.attention.query_key_value.weight",
          megatron.QKV, in_dims=1, linear=True),
    Entry("blocks/attn/qkv_bias", "h.{i}.attn.c_attn.bias", f"{_LAYER}.attention.query_key_value.bias",
          megatron.QKV),
    Entry("blocks/attn/out_kernel", "h.{i}.attn.c_proj.weight", f"{_LAYER}.attention.dense.weight",
          megatron.ROW, in_dims=2, linear=True),
    Entry("blocks/attn/out_bias", "h.{i}.attn.c_proj.bias", f"{_LAYER}.attention.dense.bias", megatron.REPLICATED),
    *_norm("blocks/ln_2", "h.{i}.ln_2", f"{_LAYER}.post_attention_layernorm"),
    Entry("blocks/mlp/in_kernel", "h.{i}.mlp.c_fc.weight", f"{_LAYER}.mlp.dense_h_to_4h.weight", megatron.COLUMN,
          in_dims=1, linear=True),
    Entry("blocks/mlp/in_bias", "h.{i}.mlp.c_fc.bias", f"{_LAYER}.mlp.dense_h_to_4h.bias", megatron.COLUMN),
    Entry("blocks/mlp/out_kernel", "h.{i}.mlp.c_proj.weight", f"{_LAYER}.mlp.dense_4h_to_h.weight", megatron.ROW,
          in_dims=1, linear=True),
    Entry("blocks/mlp/out_bias", "h.{i}.mlp.c_proj.bias", f"{_LAYER}.mlp.dense_4h_to_h.bias", megatron.REPLICATED),
    *_norm("ln_f", "ln_f", "transformer.final_layernorm"),
)


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """HF layout of one layer's cpm_jax array of `shape`."""
  if not entry.in_dims:
    return (math.prod(shape),)
  return (math.prod(shape[:entry.in_dims]), math.prod(shape[entry.in_dims:]))


def megatron_layout(entry: Entry, hf_array: np.ndarray) -> np.ndarray:
  """HF layout <-> Megatron layout (its own inverse: a transpose for Linear weights)."""
  return hf_array.T if entry.linear else hf_array


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


def structure(config: cpm.CPMConfig) -> dict[str, Any]:
  """The fields of `config` that fix the shapes and numerics of the weights (what `resolve_config` checks)."""
  return {"vocab_size": config.vocab_size, "num_layers": config.num_layers, "embed_dim": config.embed_dim,
          "ffn_dim": config.ffn_dim, "max_positions": config.max_positions, "num_heads": config.num_heads,
          "layer_norm_eps": config.layer_norm_eps}


# ---- params ------------------------------------------------------------------------------------

def abstract_params(config: cpm.CPMConfig) -> dict:
  return layers.abstract_params(cpm.param_specs(config), config.param_dtype)


def placer(config: cpm.CPMConfig, mesh: jax.sharding.Mesh | None):
  """Places each converted tensor with its NamedSharding on `mesh`; without a mesh, keeps numpy arrays."""
  if mesh is None:
    return None
  shardings = partitioning.tree_shardings(layers.logical_axes(cpm.param_specs(config)), mesh, abstract_params(config))
  return device_placer(shardings)


def load_params(config: cpm.CPMConfig, read: Callable[[Entry, int | None], tuple[np.ndarray, str]],
                mesh: jax.sharding.Mesh | None = None) -> dict:
  """Params of `config` from `read(entry, layer) -> (HF-layout array, "file: key")`, one group at a time.

  Each parameter group (e.g. qkv_kernel of all layers) is assembled on the host, placed (sharded on
  `mesh`), and freed before the next; every parameter must be assigned exactly once.
  """
  target = TargetParams(abstract_params(config), placer(config, mesh))
  for entry in ENTRIES:
    shape = target.specs[entry.target].shape
    if entry.per_layer:
      buffer = target.new_buffer(entry.target)
      for layer in range(config.num_layers):
        buffer[layer] = _from_hf(entry, *read(entry, layer), shape[1:], config)
      target.assign(entry.target, buffer, entry.target)
    else:
      array, origin = read(entry, None)
      target.assign(entry.target, _from_hf(entry, array, origin, shape, config), origin)
  return target.result()


def _from_hf(entry: Entry, array: np.ndarray, origin: str, shape: tuple[int, ...],
             config: cpm.CPMConfig) -> np.ndarray:
  expected = hf_shape(entry, shape)
  if tuple(array.shape) != expected:
    raise ConversionError(f"{origin}: shape {tuple(array.shape)}, expected {expected} for a model with "
                          f"{config.num_layers} layers, hidden {config.embed_dim}, {config.num_heads} heads, "
                          f"ffn {config.ffn_dim}, vocab {config.vocab_size}.")
  return array if tuple(array.shape) == tuple(shape) else array.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One source-format tensor: a layer of an entry (layer None for unstacked params), in HF layout."""

  entry: Entry
  layer: int | None
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype


def tensors(params: dict, key: Callable[[Entry], str]) -> list[Tensor]:
  """Every source tensor of `params` (arrays or ShapeDtypeStructs), entry-major, named by `key(entry)`."""
  flat = flatten(params)
  out = []
  for entry in ENTRIES:
    leaf = flat[entry.target]
    shape = leaf.shape[1:] if entry.per_layer else leaf.shape
    for layer in (range(leaf.shape[0]) if entry.per_layer else (None,)):
      out.append(Tensor(entry, layer, key(entry).format(i=layer), hf_shape(entry, shape), np.dtype(leaf.dtype)))
  return out


def hf_arrays(params: dict, wanted: list[Tensor]) -> Iterator[np.ndarray]:
  """The HF-layout host arrays of `wanted`, in order; one parameter group is fetched to the host at a time."""
  flat = flatten(params)
  name, group = None, None
  for tensor in wanted:
    if tensor.entry.target != name:
      group = None  # free the previous group before fetching the next
      name = tensor.entry.target
      group = np.asarray(flat[name])
    array = group if tensor.layer is None else group[tensor.layer]
    yield array.reshape(tensor.shape)


# ---- Megatron / DeepSpeed shards ---------------------------------------------------------------

def load_megatron(path: str | os.PathLike, *, tag: str | None = None, config: cpm.CPMConfig | None = None,
                  num_heads: int | None = None, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                  trust_pickle: bool = False) -> Loaded:
  """CPM-LM params from CPM's model-parallel shards (any number of ranks), merged tensor by tensor.

  Heads cannot be read from the weights: give `num_heads` or `config`, or they are inferred from the
  released sizes (the returned notes say which).
  """
  shards = megatron.read_shards(path, tag, trust_pickle)
  where = f"{shards.directory} (mp_rank_*_model_states.pt)"
  layer_norms = (re.fullmatch(r"transformer\.layers\.(\d+)\.input_layernorm\.weight", key) for key in shards.keys())
  layer_ids = [int(m.group(1)) for m in layer_norms if m]
  vocab, embed = megatron.merged_shape(megatron.COLUMN, shards.shapes("word_embeddings.weight"))
  ffn = megatron.merged_shape(megatron.COLUMN, shards.shapes("transformer.layers.0.mlp.dense_h_to_4h.weight"))[0]
  found = {"vocab_size": vocab, "embed_dim": embed, "num_layers": max(layer_ids, default=-1) + 1, "ffn_dim": ffn,
           "max_positions": shards.shapes("position_embeddings.weight")[0][0]}
  source_dtype = torch_io.to_numpy(shards.modules[0]["word_embeddings.weight"]).dtype
  config, note = resolve_config(found, where, config, num_heads, dtype or source_dtype.name)
  shards.ledger.expect({t.key for t in tensors(abstract_params(config), lambda entry: entry.megatron)})

  def read(entry: Entry, layer: int | None) -> tuple[np.ndarray, str]:
    key = entry.megatron.format(i=layer)
    return megatron_layout(entry, shards.take(key, entry.split)), f"{where}: {key}"

  params = load_params(config, read, mesh)
  shards.ledger.check_all_taken()
  return Loaded(params, config, [note, f"merged {shards.num_ranks} model-parallel rank(s) of {shards.directory}"])


def save_megatron(params: dict, config: cpm.CPMConfig, path: str | os.PathLike, num_ranks: int,
                  tag: str = "release") -> pathlib.Path:
  """Writes CPM's Megatron/DeepSpeed layout split over `num_ranks` model-parallel ranks, atomically."""
  for name, size in (("num_heads", config.num_heads), ("vocab_size", config.vocab_size),
                     ("ffn_dim", config.ffn_dim)):
    if size % num_ranks:
      raise ConversionError(f"--mp={num_ranks} must divide {name}={size} of the model.")
  wanted = tensors(params, lambda entry: entry.megatron)

  def rank_module(rank: int) -> dict:
    return {t.key: torch_io.from_numpy(megatron.split_tensor(megatron_layout(t.entry, array), t.entry.split,
                                                             num_ranks, t.key)[rank])
            for t, array in zip(wanted, hf_arrays(params, wanted))}

  return megatron.write_shards(path, num_ranks, rank_module, tag)
