"""Smaller weights for serving: bfloat16; int8 weight-only quantisation with one float32 scale per output channel
(activations stay in the model's compute dtype); or w8a8, the same int8 weights with each product's activations
quantised to int8 per row as they come (int8 x int8 products, int32 accumulation: `layers.int8_product`).

int8: every dense matrix a decode step reads (the blocks in the decode layout, `{name}_weight` [out, in]) and the
tables a family names (CPM's tied word embedding: rows are its output channels) become int8 values q = round(w / s)
with s = max |w| / 127 over each output channel's inputs; `layers.dense` in Layout.DECODE_INT8 computes
(x . q) * s + b (Layout.DECODE_W8A8 for w8a8). What is converted is named per family by a `Quantized` (block
paths, tables), so that

  `for_decoding(decode params, weights, quantized)`   the served weights (once per run: generate.py --weights),
  `round_trip(params, weights, quantized)`            the same numbers in the training layout (what evaluation
                                                      scores with: evaluate.py --weights; dequantised int8 is the
                                                      function the int8 decoder computes, up to float rounding;
                                                      w8a8 has none: its activation quantisation exists only in
                                                      the decode layout, so its scoring prefills the decode path),
  `to_checkpoint` / `from_checkpoint`                 an int8 checkpoint in the training layout (convert_checkpoint.py
                                                      --weights=int8; metadata "weights": "int8"), read back as its
                                                      dequantised floats, which quantise again to the same int8.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cpm_jax import layers, transformer
from cpm_jax.layers import Layout

WEIGHTS = ("float32", "bfloat16", "int8", "w8a8")
# Served weights whose numbers the training layout holds (`round_trip`); w8a8 quantises activations as it decodes.
ROUND_TRIPS = (None, "float32", "bfloat16", "int8")
SCALE_SUFFIX = "_scale"
INT8_LAYOUTS = {"int8": Layout.DECODE_INT8, "w8a8": Layout.DECODE_W8A8}  # served weights stored int8


@dataclasses.dataclass(frozen=True)
class Quantized:
  """Where a family's int8 weights are: `blocks`, paths of stacked blocks whose dense kernels ({name}_kernel beside
  {name}_bias; per output channel = per entry of the bias) are quantised, and `tables`, paths of [rows, dim] tables
  quantised per row (a tied embedding: its rows are the output head's channels)."""

  blocks: tuple[tuple[str, ...], ...]
  tables: tuple[tuple[str, ...], ...] = ()


def check_weights(weights: str | None, where: str = "--weights") -> None:
  """A ValueError naming `where` unless weights is one of WEIGHTS or None (the params as they are)."""
  if weights is not None and weights not in WEIGHTS:
    raise ValueError(f"{where}={weights!r}; expected one of {list(WEIGHTS)}.")


def weight_bytes(tree: Any) -> int:
  """Bytes of every array in `tree`."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _at(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _replace(tree: dict, path: tuple[str, ...], fn) -> dict:
  head, *rest = path
  return {**tree, head: fn(tree[head]) if not rest else _replace(tree[head], tuple(rest), fn)}


def _kernel_channels(block: dict, kernel: str) -> tuple[int, ...]:
  """The input axes of a stacked `{name}_kernel` [layers, *in, *out] (those its bias [layers, *out] lacks)."""
  bias = block[kernel[:-len("_kernel")] + "_bias"]
  return tuple(range(1, 1 + block[kernel].ndim - bias.ndim))


def _map_kernels(blocks: dict, fn) -> dict:
  """`fn(block, key)` applied to every `{name}_kernel` with a `{name}_bias` in the (nested) block dicts."""
  out = {}
  for key, value in blocks.items():
    if isinstance(value, dict):
      out[key] = _map_kernels(value, fn)
    elif key.endswith("_kernel") and key[:-len("_kernel")] + "_bias" in blocks:
      out.update(fn(blocks, key))
    else:
      out[key] = value
  return out


def round_trip(params: dict, weights: str | None, quantized: Quantized) -> dict:
  """Training-layout params holding the numbers `for_decoding` serves: None the params as they are; float32 /
  bfloat16 casts every leaf; int8 quantises and dequantises what `quantized` names (the rest stays as it is). w8a8
  is a ValueError: no training-layout params compute what it serves."""
  check_weights(weights)
  if weights not in ROUND_TRIPS:
    raise ValueError(f"weights={weights!r} quantises activations as it decodes, which the training layout cannot "
                     f"express; score it through the decode path. Expected one of {list(ROUND_TRIPS)}.")
  if weights is None:
    return params
  if weights != "int8":
    return jax.tree.map(lambda x: x.astype(weights), params)
  return _dequantised(params, quantized)


@jax.jit(static_argnums=1)  # one program: op by op, every kernel shape compiled each of quantize's ops
def _dequantised(params: dict, quantized: Quantized) -> dict:
  def fake(block, key):
    q, scale = layers.quantize_int8(block[key], _kernel_channels(block, key))
    return {key: (q.astype(jnp.float32) * scale).astype(block[key].dtype)}

  for path in quantized.blocks:
    params = _replace(params, path, lambda blocks: _map_kernels(blocks, fake))
  for path in quantized.tables:
    params = _replace(params, path,
                      lambda table: (lambda q, s: (q * s).astype(table.dtype))(*layers.quantize_int8(table, (1,))))
  return params


def for_decoding(params: transformer.DecodeParams, weights: str | None, quantized: Quantized
                 ) -> transformer.DecodeParams:
  """Decode-layout params as served: None as they are, every leaf cast to float32 / bfloat16, or (int8, w8a8) each
  decode block's `{name}_weight` [out, in] and each of `quantized.tables` as int8 with `{name}_scale` [out]
  (Layout.DECODE_INT8, Layout.DECODE_W8A8). Compiled as one program of its own."""
  check_weights(weights)
  return params if weights is None else _for_decoding(params, weights, quantized)


def serving_layout(decode_layout: Callable[[Any], transformer.DecodeParams], weights: str | None,
                   quantized: Quantized) -> Callable[[Any], transformer.DecodeParams]:
  """params -> `for_decoding(decode_layout(params), weights, quantized)`: a family's decode layout as served (what an
  evaluation adapter's batching.ModelRunner makes once)."""
  check_weights(weights)
  return lambda params: for_decoding(decode_layout(params), weights, quantized)


@jax.jit(static_argnums=(1, 2))
def _for_decoding(params: transformer.DecodeParams, weights: str, quantized: Quantized) -> transformer.DecodeParams:
  if weights not in INT8_LAYOUTS:
    return transformer.DecodeParams(jax.tree.map(lambda x: x.astype(weights), params.tree), params.layout)

  def block(tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = block(value)
      elif key.endswith("_weight"):
        q, scale = layers.quantize_int8(value, (1,))
        out[key], out[key[:-len("_weight")] + SCALE_SUFFIX] = q, scale[:, 0]
      else:
        out[key] = value
    return out

  tree = params.tree
  for path in quantized.blocks:
    tree = _replace(tree, path, lambda blocks: tuple(block(b) for b in blocks))
  for path in quantized.tables:
    q, scale = layers.quantize_int8(_at(tree, path), (1,))
    tree = _replace(tree, path[:-1], lambda parent, q=q, scale=scale, name=path[-1]: {
        **parent, name: q, name + SCALE_SUFFIX: scale[:, 0]})
  return transformer.DecodeParams(tree, INT8_LAYOUTS[weights])


# ---- int8 checkpoints (training layout) ---------------------------------------------------------

@jax.jit(static_argnums=1)
def to_checkpoint(params: dict, quantized: Quantized) -> dict:
  """The tree an int8 checkpoint stores: what `quantized` names as int8, each with a `{key}_scale` beside it."""
  def store(block, key):
    q, scale = layers.quantize_int8(block[key], _kernel_channels(block, key))
    return {key: q, key + SCALE_SUFFIX: scale}

  for path in quantized.blocks:
    params = _replace(params, path, lambda blocks: _map_kernels(blocks, store))
  for path in quantized.tables:
    q, scale = layers.quantize_int8(_at(params, path), (1,))
    params = _replace(params, path[:-1], lambda parent, q=q, scale=scale, name=path[-1]: {
        **parent, name: q, name + SCALE_SUFFIX: scale})
  return params


def checkpoint_abstract(abstract: dict, logical_axes: dict, quantized: Quantized) -> tuple[dict, dict]:
  """(ShapeDtypeStructs, logical axes) of `to_checkpoint`'s tree for a model whose float params are `abstract` and
  `logical_axes`: a scale has its values' axes, unsharded where it has size 1 (the input axes)."""
  stored = jax.eval_shape(lambda params: to_checkpoint(params, quantized), abstract)
  axes = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}

  def axes_of(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith(SCALE_SUFFIX + "']"):
      values = axes[name[:-len(SCALE_SUFFIX + "']")] + "']"]
      return tuple(None if n == 1 else a for a, n in zip(values, leaf.shape))
    return axes[name]

  return stored, jax.tree_util.tree_map_with_path(axes_of, stored)


@jax.jit(static_argnums=(1, 2))
def from_checkpoint(stored: dict, quantized: Quantized, dtype) -> dict:
  """The float params (dequantised, in `dtype`) of `to_checkpoint`'s tree."""
  def restore(block, key):
    return {key: (block[key].astype(jnp.float32) * block[key + SCALE_SUFFIX]).astype(dtype)}

  def drop_scales(block):
    return {k: drop_scales(v) if isinstance(v, dict) else v for k, v in block.items()
            if not k.endswith("_kernel" + SCALE_SUFFIX)}

  for path in quantized.blocks:
    stored = _replace(stored, path, lambda blocks: drop_scales(_map_kernels(blocks, restore)))
  for path in quantized.tables:
    stored = _replace(stored, path[:-1], lambda parent, name=path[-1]: {
        **{k: v for k, v in parent.items() if k != name + SCALE_SUFFIX},
        name: (parent[name].astype(jnp.float32) * parent[name + SCALE_SUFFIX]).astype(dtype)})
  return stored
