"""Transformer stacks shared by every family: remat policies, the loop over layers, the decode cache and its
params layout, the tied output head.

Params are created, trained and checkpointed with every block stacked on a leading `layers` axis
(`layers.Layout.TRAINING`). Cached decoding runs on `DecodeParams`: the same tree with the named blocks as a tuple
of per-layer trees whose dense weights are [out, in] matrices (`layers.Layout.DECODE`), made once by
`to_decode_params`. The type says which layout a function holds; nothing inspects a tree to find out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cpm_jax import layers, partitioning, pipeline_parallel  # pipeline_parallel runs stacks with run_layers

# What a block keeps for its backward pass. "elementwise" keeps the values a layer's products and softmax need
# (named by checkpoint_name in layers.py and the blocks) and recomputes the element-wise ops between them,
# LayerNorm, GELU and the residual adds: for cpm_small 0.53 GB of residuals a step against 1.5 GB with "none" (which
# keeps every intermediate autodiff linearises, five [tokens, mlp] arrays per layer for the tanh-GELU alone).
REMAT_POLICIES = {
    "none": None,
    "elementwise": jax.checkpoint_policies.save_only_these_names(
        "attention_qkv", "attention_probs", "attention_context", "attention_residual", "mlp_pre_activation",
        "dropout_mask"),
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLEMENTATIONS = ("xla", "jax", "cudnn")
# Config fields that say how a model runs, not what it computes: a checkpoint may be used with other values.
EXECUTION_FIELDS = ("dropout_rate", "init_stddev", "dtype", "param_dtype", "remat_policy", "scan_layers",
                    "attention_impl", "pipeline_microbatches", "pipeline_repeats")


def check_options(config: Any) -> None:
  """The checks every transformer config makes of its shared fields (ValueError naming the field), and mlp_dim
  stored as None when it is the default 4 x embed_dim (so that configs compare equal however it was given)."""
  config_name, embed_dim, num_heads, mlp_dim = (type(config).__name__, config.embed_dim, config.num_heads,
                                                config.mlp_dim)
  remat_policy, attention_impl = config.remat_policy, config.attention_impl
  if num_heads < 1 or embed_dim % num_heads:
    raise ValueError(f"{config_name}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")
  if mlp_dim is not None and mlp_dim < 1:
    raise ValueError(f"{config_name}.mlp_dim={mlp_dim}; expected a positive size, or None for 4 x embed_dim.")
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"{config_name}.remat_policy={remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}.")
  if attention_impl not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"{config_name}.attention_impl={attention_impl!r}; expected one of "
                     f"{list(ATTENTION_IMPLEMENTATIONS)}.")
  if mlp_dim == 4 * embed_dim:
    object.__setattr__(config, "mlp_dim", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """The fields every transformer family's config shares (how it runs, EXECUTION_FIELDS, and its LayerNorm eps;
  a family redeclares one to change its default), checks at construction, head_dim, ffn_dim, compute_dtype.
  The family's sizes (embed_dim, num_heads, mlp_dim, ...) are its own fields."""

  execution_fields: ClassVar[tuple[str, ...]] = EXECUTION_FIELDS

  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  init_stddev: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"  # one of REMAT_POLICIES
  scan_layers: bool = True
  attention_impl: str = "xla"  # "xla" (einsum), "jax" or "cudnn" (jax.nn.dot_product_attention)

  def __post_init__(self):
    check_options(self)

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def ffn_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelinedConfig(TransformerConfig):
  """A TransformerConfig whose stacks run through cpm_jax.pipeline_parallel on a mesh with a `stage` axis."""

  pipeline_microbatches: int = 1
  pipeline_repeats: int = 1  # > 1: a circular pipeline schedule


def run_layers(body: Callable, x: jax.Array, xs: Any, num_layers: int, *, remat_policy: str = "none",
               scan: bool = True, per_layer: bool = False) -> tuple[jax.Array, Any]:
  """Applies `body(x, layer_xs) -> (x, y)` over the layers, rematerialised by `remat_policy`.

  xs stacked on a leading axis: a scan (scan=True) or an unrolled loop, ys stacked likewise. per_layer: xs is a
  sequence of each layer's xs (decode-layout blocks), an unrolled loop, ys a tuple.
  """
  if remat_policy != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=per_layer or not scan)
  if scan and not per_layer:
    return jax.lax.scan(body, x, xs)
  ys = []
  for i in range(num_layers):
    x, y = body(x, xs[i] if per_layer else jax.tree.map(lambda a, i=i: a[i], xs))
    ys.append(y)
  return x, tuple(ys) if per_layer else jax.tree.map(lambda *a: jnp.stack(a), *ys)


def pre_ln_block_specs(config: Any) -> dict:
  """`pre_ln_block`'s params, stacked over config.num_layers: weights N(0, init_stddev), the residual branches'
  output projections N(0, init_stddev / sqrt(2 x layers)) (GPT-2's scaling)."""
  std = config.init_stddev
  out_std = std / math.sqrt(2 * config.num_layers)
  block = {
      "ln_1": layers.layer_norm_specs(config.embed_dim),
      "attn": layers.attention_specs(config.embed_dim, config.num_heads, config.head_dim, std, out_std),
      "ln_2": layers.layer_norm_specs(config.embed_dim),
      "mlp": layers.mlp_specs(config.embed_dim, config.ffn_dim, std, out_std),
  }
  return layers.stacked(block, config.num_layers)


def pre_ln_block(x: jax.Array, params: dict, config: Any, mask: jax.Array, rng: jax.Array | None,
                 layout: layers.Layout = layers.Layout.TRAINING, kv: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | int | None = None, span: int | None = None) -> tuple[jax.Array, Any]:
  """One GPT-2-style pre-LN block (ln_1 -> self-attention -> residual; ln_2 -> tanh-GELU MLP -> residual), dropout
  on each residual branch when `rng` is given; returns (output, kv). params: ln_1, attn, ln_2, mlp (CPM, M6);
  config: compute_dtype, dropout_rate, layer_norm_eps, attention_impl. With `kv` (this layer's decode cache) the
  new keys and values are written at cache_index and attention reads the cache's first `span` slots (default all)."""
  dtype = config.compute_dtype
  rate = config.dropout_rate if rng is not None else 0.0
  rngs = jax.random.split(rng, 3) if rng is not None else (None,) * 3
  h = layers.layer_norm(x, params["ln_1"], config.layer_norm_eps)
  attn, kv = layers.self_attention(h, params["attn"], mask, dtype, config.attention_impl, layout, kv, cache_index,
                                   span)
  x = checkpoint_name(x + layers.dropout(attn, rate, rngs[0]), "attention_residual")
  h = layers.layer_norm(x, params["ln_2"], config.layer_norm_eps)
  h = layers.mlp(h, params["mlp"], dtype, approximate_gelu=True, dropout_rate=rate, rng=rngs[1], layout=layout)
  x = x + layers.dropout(h, rate, rngs[2])
  return partitioning.constrain(x, ("batch", "length", "act_embed")), kv


def pre_ln_stack(blocks: dict, x: jax.Array, config: Any, mask: jax.Array,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
  """`pre_ln_block` over blocks stacked on a leading `layers` axis (the training layout), rematerialised and
  scanned as config.remat_policy / scan_layers say, pipelined on a mesh with a `stage` axis
  (cpm_jax.pipeline_parallel: config.pipeline_microbatches / pipeline_repeats); with dropout_rng, dropout on the
  input embeddings x and in every block. Returns the last block's output (before any final norm)."""
  if dropout_rng is not None:
    dropout_rng, embed_rng = jax.random.split(dropout_rng)
    x = layers.dropout(x, config.dropout_rate, embed_rng)

  def layer(x, mask, layer_params, rng):
    return pre_ln_block(x, layer_params, config, mask, rng)[0]

  return pipeline_parallel.run_stack(layer, x, mask, blocks, layers.logical_axes(pre_ln_block_specs(config)), config,
                                     dropout_rng)


def tied_logits(wte: jax.Array, hidden: jax.Array, dtype) -> jax.Array:
  """Output head tied to the word embedding: hidden @ wte^T, float32 logits [batch, length, vocab]."""
  logits = jnp.einsum("bte,ve->btv", hidden, wte.astype(dtype), preferred_element_type=jnp.float32)
  return partitioning.constrain(logits, ("batch", "length", "act_vocab"))


def gather_rows(table: jax.Array, ids: jax.Array, row_axis: str) -> jax.Array:
  """table[ids] for an embedding table [rows (logical axis `row_axis`), embed], its embed columns gathered first.

  With the columns split (embed over fsdp) and the ids split by batch, XLA's SPMD partitioner has no efficient way
  to a batch-split result and replicates the gathered activations on every device ("Involuntary full
  rematerialization"). Gathering the columns first is what FSDP does for every weight it uses; the rows stay split.
  """
  return partitioning.constrain(table, (row_axis, None))[ids]


def table_rows(tables: dict, name: str, ids: jax.Array, layout: layers.Layout) -> jax.Array:
  """Rows `ids` of the word table `tables[name]`: as stored, or (an int8 layout) int8 rows times their scale."""
  rows = gather_rows(tables[name], ids, "vocab")
  if layout.int8:
    return rows.astype(jnp.float32) * tables[f"{name}_scale"][ids][..., None]
  return rows


def tied_table_logits(tables: dict, name: str, hidden: jax.Array, dtype, layout: layers.Layout) -> jax.Array:
  """`tied_logits` of the table `tables[name]` in `layout` (the int8 layouts: int8 rows, one scale per row;
  Layout.DECODE_W8A8 quantises the hidden states per row too, `layers.int8_product`)."""
  if not layout.int8:
    return tied_logits(tables[name], hidden, dtype)
  if layout is layers.Layout.DECODE_W8A8:
    logits = layers.int8_product(hidden, tables[name], tables[f"{name}_scale"])
  else:
    logits = tied_logits(tables[name], hidden, dtype) * tables[f"{name}_scale"].astype(jnp.float32)
  return partitioning.constrain(logits, ("batch", "length", "act_vocab"))


def default_positions(tokens: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None,
                      offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
  """(positions, segment_ids) of tokens [batch, length]: by default offset.. and all 1 (one document)."""
  batch, length = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  return positions, segment_ids


# ---- the decode layout -------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeParams:
  """A family's params in the decode layout: `tree` is the params tree with the blocks named at conversion as
  a tuple of per-layer trees in `layout` (Layout.DECODE; Layout.DECODE_INT8 after cpm_jax.serving_weights, which
  also stores the tables it names as int8 `{name}` with `{name}_scale` per row). Made by `to_decode_params` (each
  family's `decode_layout`) and serving_weights.for_decoding."""

  tree: dict
  layout: layers.Layout = dataclasses.field(default=layers.Layout.DECODE, metadata=dict(static=True))


def to_decode_params(params: dict, block_paths: Sequence[tuple[str, ...]]) -> DecodeParams:
  """`params` (Layout.TRAINING) with the stacked blocks at each of `block_paths` (e.g. ("blocks",) or
  ("decoder", "blocks")) converted by `layers.decode_blocks`; compiled as a program of its own, costing one copy of
  those blocks."""
  return _convert(params, tuple(block_paths))


@jax.jit(static_argnums=1)
def _convert(params: dict, block_paths: tuple[tuple[str, ...], ...]) -> DecodeParams:
  def replace(tree: dict, path: tuple[str, ...]) -> dict:
    head, *rest = path
    return {**tree, head: layers.decode_blocks(tree[head]) if not rest else replace(tree[head], tuple(rest))}

  for path in block_paths:
    params = replace(params, path)
  return DecodeParams(params)


# ---- the self-attention decode cache -----------------------------------------------------------

def empty_cache(batch: int, length: int, num_layers: int, num_heads: int, head_dim: int, dtype) -> dict:
  """An empty self-attention decode cache for `length` slots: per layer keys and values in `layers.cache_layout`
  ([batch * heads, length, head_dim]); slots with segment id 0 are never attended."""
  k, v = zip(*(layers.empty_cache(batch, num_heads, length, head_dim, dtype) for _ in range(num_layers)))
  return {"k": k, "v": v, "segment_ids": jnp.zeros((batch, length), jnp.int32),
          "positions": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def cache_logical_axes(num_layers: int) -> dict:
  """Logical axes of `empty_cache`'s tree."""
  k = v = (layers.CACHE_AXES,) * num_layers
  return {"k": k, "v": v, "segment_ids": ("batch", "cache_length"), "positions": ("batch", "cache_length"),
          "index": ()}


def constrain_cache(cache: dict, axes: dict) -> dict:
  """Pins every cache leaf to the mesh by its logical axes (a no-op outside partitioning.activate)."""
  return jax.tree.map(partitioning.constrain, cache, axes, is_leaf=partitioning.is_logical_axes)


def cached_self_mask(cache: dict, segment_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                                         jax.Array]:
  """(causal mask of the new tokens over the cache with them written in, the cache's new segment ids and
  positions) for tokens appended at cache["index"]."""
  offset = cache["index"]
  kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, offset, axis=1)
  kv_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, offset, axis=1)
  return layers.attention_mask(segment_ids, kv_segments, positions, kv_positions), kv_segments, kv_positions


def updated_cache(cache: dict, new_kv: Sequence[tuple[jax.Array, jax.Array]], kv_segments: jax.Array,
                  kv_positions: jax.Array, length: int) -> dict:
  """The cache after `length` tokens were appended: each layer's (k, v), the segment ids and positions."""
  k, v = zip(*new_kv)
  return {**cache, "k": k, "v": v, "segment_ids": kv_segments, "positions": kv_positions,
          "index": cache["index"] + length}


def cached_pre_ln_stack(blocks: Sequence[dict], x: jax.Array, config: Any, cache: dict, mask: jax.Array,
                        kv_segments: jax.Array, kv_positions: jax.Array,
                        layout: layers.Layout = layers.Layout.DECODE,
                        span: int | None = None) -> tuple[jax.Array, dict]:
  """`pre_ln_block` over each layer's decode-layout block (in `layout`: DECODE, or DECODE_INT8 / DECODE_W8A8 for
  served int8 weights) and cache for positions x [batch, t, embed] appended at cache["index"] (mask, kv_segments,
  kv_positions as `cached_self_mask` gives them, mask cut to `span`); attention reads the caches' first `span` slots
  (default all). Returns (the last block's output, before any final norm; the updated cache)."""
  def body(x, layer_inputs):
    layer_params, kv = layer_inputs
    return pre_ln_block(x, layer_params, config, mask, None, layout, kv, cache["index"], span)

  x, new_kv = run_layers(body, x, tuple(zip(blocks, zip(cache["k"], cache["v"]))), config.num_layers, per_layer=True)
  return x, updated_cache(cache, new_kv, kv_segments, kv_positions, x.shape[1])
