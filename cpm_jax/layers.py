"""Building blocks shared by CPM and PLUG: parameter specs, norms, attention, MLP.

Models are pure functions of a params pytree. Each parameter is declared once as a `ParamSpec`
(shape, logical axes, initializer); from that one declaration we get initial values, abstract
shapes (no allocation) and shardings.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cpm_jax import partitioning

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

# Large negative for masked attention logits (the release adds -10000; finite keeps softmax NaN-free).
MASK_VALUE = -1e9


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Declaration of one parameter: its shape, logical axis names and initializer; whether it trains (a frozen param
  gets no gradient and no optimizer state, e.g. a base model under adapters) and its dtype (None: the model's)."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: Initializer
  trainable: bool = True
  dtype: str | None = None

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"ParamSpec shape {self.shape} and axes {self.axes} differ in rank.")


def normal(stddev: float) -> Initializer:
  return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def is_spec(node: Any) -> bool:
  return isinstance(node, ParamSpec)


def stacked(specs: Any, num_layers: int) -> Any:
  """Prepends a `layers` axis of size num_layers to every spec (one array per param for all layers).

  Each layer is initialised with its own key, so stacking never correlates layers.
  """

  def stack(spec: ParamSpec) -> ParamSpec:
    def init(key, shape, dtype):
      keys = jax.random.split(key, shape[0])
      return jax.vmap(lambda k: spec.init(k, shape[1:], dtype))(keys)

    return ParamSpec((num_layers, *spec.shape), ("layers", *spec.axes), init)

  return jax.tree.map(stack, specs, is_leaf=is_spec)


def init_from_specs(specs: Any, key: jax.Array, dtype=jnp.float32) -> Any:
  """Initial values for a tree of ParamSpecs, one independent key per leaf (by tree position)."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [s.init(k, s.shape, jnp.dtype(s.dtype or dtype)) for s, k in zip(leaves, keys)])


def logical_axes(specs: Any) -> Any:
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def abstract_params(specs: Any, dtype=jnp.float32) -> Any:
  """ShapeDtypeStructs of the params a tree of specs declares (no allocation), of `dtype` unless a spec has its
  own."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or dtype)), specs, is_leaf=is_spec)


def trainable(specs: Any) -> Any:
  """The tree of each spec's `trainable`."""
  return jax.tree.map(lambda s: s.trainable, specs, is_leaf=is_spec)


def count_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---- spec builders -----------------------------------------------------------------------------

def layer_norm_specs(dim: int) -> dict[str, ParamSpec]:
  return {"scale": ParamSpec((dim,), ("embed",), ones), "bias": ParamSpec((dim,), ("embed",), zeros)}


def attention_specs(embed: int, heads: int, head_dim: int, stddev: float, out_stddev: float,
                    fused_qkv: int = 3) -> dict[str, ParamSpec]:
  """Self-attention (fused_qkv=3: Q, K, V) or the K/V half of cross-attention (fused_qkv=2).

  The fused kernel [embed, n, heads, head_dim] split on `heads` is exactly Megatron's per-rank
  [Q_r; K_r; V_r] layout: one matmul for all projections, column-parallel on `tensor`.
  """
  return {
      "qkv_kernel": ParamSpec((embed, fused_qkv, heads, head_dim), ("embed", "qkv", "heads", "kv"),
                              normal(stddev)),
      "qkv_bias": ParamSpec((fused_qkv, heads, head_dim), ("qkv", "heads", "kv"), zeros),
      "out_kernel": ParamSpec((heads, head_dim, embed), ("heads", "kv", "embed"), normal(out_stddev)),
      "out_bias": ParamSpec((embed,), ("embed",), zeros),
  }


def query_specs(embed: int, heads: int, head_dim: int, stddev: float) -> dict[str, ParamSpec]:
  """A single query projection (cross-attention's Q; its K/V come from attention_specs(fused_qkv=2))."""
  return {
      "q_kernel": ParamSpec((embed, heads, head_dim), ("embed", "heads", "kv"), normal(stddev)),
      "q_bias": ParamSpec((heads, head_dim), ("heads", "kv"), zeros),
  }


def mlp_specs(embed: int, hidden: int, stddev: float, out_stddev: float) -> dict[str, ParamSpec]:
  return {
      "in_kernel": ParamSpec((embed, hidden), ("embed", "mlp"), normal(stddev)),
      "in_bias": ParamSpec((hidden,), ("mlp",), zeros),
      "out_kernel": ParamSpec((hidden, embed), ("mlp", "embed"), normal(out_stddev)),
      "out_bias": ParamSpec((embed,), ("embed",), zeros),
  }


# ---- functions ---------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="eps")
def layer_norm(x: jax.Array, params: dict, eps: float) -> jax.Array:
  """LayerNorm computed in float32, returned in x's dtype.

  A jitted function of its own (inlined where it is called) so that its backward pass sums its input gradient into
  one array before the residual stream's gradient is added to it. Without that, in an unrolled stack the sum of every
  later layer's terms was fused into each layer's consumers instead: XLA:CPU's work grew with the square of the
  depth (the unrolled cpm_small step 1.28x slower; BUILD.md, "Session of 2026-12-04").
  """
  x32 = x.astype(jnp.float32)
  centered = x32 - x32.mean(-1, keepdims=True)
  y = centered * jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
  y = y * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
  return y.astype(x.dtype)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """approximate=True is the tanh form (HF gelu_new, CPM); False is erf (BERT, PLUG)."""
  return jax.nn.gelu(x, approximate=approximate)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  keep = checkpoint_name(jax.random.bernoulli(rng, 1.0 - rate, x.shape), "dropout_mask")
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_positions: jax.Array | None,
                   kv_positions: jax.Array | None) -> jax.Array:
  """Boolean mask [batch, 1, q, kv]: same non-zero segment and (if positions given) causal.

  Segment 0 marks padding / empty cache slots. With packed rows the segment restricts attention
  to its own document; comparing positions gives causality inside each document.
  """
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if q_positions is not None:
    mask &= q_positions[:, :, None] >= kv_positions[:, None, :]
  return mask[:, None, :, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: Literal["xla", "jax", "cudnn"] = "xla") -> jax.Array:
  """Scaled dot-product attention over [batch, length, heads, head_dim] with a boolean mask.

  "xla" is our explicit einsum form; "jax" and "cudnn" go through jax.nn.dot_product_attention
  (cuDNN flash attention on GPU). Softmax is always computed in float32.
  """
  if implementation == "xla":
    # Heads before positions for both products: XLA:CPU's batched dots are faster on [b, h, t, d] operands than on
    # [b, t, h, d] ones, the same numbers (the cpm_small step 1.04x; BUILD.md, "Session of 2026-12-03, evening").
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = checkpoint_name(softmax(jnp.where(mask, logits, MASK_VALUE)), "attention_probs")
    out = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v), 1, 2)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if implementation == "jax" else
                                       implementation)
  # Rows with no visible key (padding) give zeros, not a uniform average; zeroing the output rather than the
  # probabilities keeps one [b, h, q, k] array for the backward pass, not two.
  return jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0).astype(v.dtype)


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis whose gradient reads only its output: jax.nn.softmax's default linearisation also
  keeps exp(x - max) for the backward pass, a second [.., q, k] array per attention layer."""
  unnormalized = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
  return unnormalized / unnormalized.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = softmax(x)
  return y, y * (x_dot - (y * x_dot).sum(-1, keepdims=True))


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 softmax over the last axis of the visible logits; rows with no visible key (padding) get zeros,
  not a uniform average."""
  weights = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  return jnp.where(mask.any(-1, keepdims=True), weights, 0.0)


# Logical axes of a decode cache array (keys or values, one layer) in `cached_attention`'s layout.
CACHE_AXES = ("batch*act_heads", "cache_length", None)


def empty_cache(batch: int, heads: int, length: int, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
  """One layer's empty decode cache (keys, values) for `length` slots, each [batch * heads, length, head_dim]."""
  return tuple(jnp.zeros((batch * heads, length, head_dim), dtype) for _ in range(2))


def cache_layout(x: jax.Array) -> jax.Array:
  """Keys or values [b, t, heads, d] in the decode cache's layout, [b * heads, t, d] (see `cached_attention`;
  queries take it too, for the batched attention products)."""
  b, t, heads, d = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * heads, t, d)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                     implementation: Literal["xla", "jax", "cudnn"] = "xla") -> jax.Array:
  """`dot_product_attention` of queries [b, t, heads, d] over a decode cache: keys and values
  [b * heads, length, d] (`cache_layout`).

  Both attention products are then batched matrix products over the cache as stored, and a step's new keys and
  values are written as contiguous [d] rows. Any 4-D cache in the decode loop (b and heads as two axes) made
  XLA:CPU copy or transpose the whole cache around each step, because the dots need the [b * heads] view; keys
  stored transposed ([b * heads, d, length]) made each step's write a strided scatter of single floats (~2.5% of
  a batch-8 step).
  """
  b, t, heads, d = q.shape
  length = keys.shape[1]
  if implementation != "xla":
    return dot_product_attention(q, *(jnp.swapaxes(a.reshape(b, heads, length, d), 1, 2) for a in (keys, values)),
                                 mask, implementation)
  logits = jnp.einsum("nqd,nkd->nqk", cache_layout(q), keys, preferred_element_type=jnp.float32)
  weights = masked_softmax(logits.reshape(b, heads, t, length) / math.sqrt(d), mask)
  out = jnp.einsum("nqk,nkd->nqd", weights.astype(values.dtype).reshape(b * heads, t, length), values)
  return jnp.swapaxes(out.reshape(b, heads, t, d), 1, 2)


class Layout(enum.Enum):
  """How a block's dense weights are stored; every function that reads them is told which, never guesses.

  TRAINING: `{name}_kernel` [*in, *out] (the layout params are created, trained and checkpointed in).
  DECODE: `{name}_weight` [out, in], a 2-D matrix (`decode_layout`), for cached decoding.
  DECODE_INT8: DECODE with int8 weights and a float32 `{name}_scale` [out] per output channel
  (cpm_jax.serving_weights); activations in the compute dtype (weight-only int8).
  DECODE_W8A8: DECODE_INT8's weights, and each product's activations quantised to int8 too, per row, as they come
  (`int8_product`).
  """

  TRAINING = "training"
  DECODE = "decode"
  DECODE_INT8 = "decode_int8"
  DECODE_W8A8 = "decode_w8a8"

  @property
  def int8(self) -> bool:
    """Whether the weights are stored int8 with a `{name}_scale` per output channel."""
    return self in (Layout.DECODE_INT8, Layout.DECODE_W8A8)


def quantize_int8(x: jax.Array, reduce_axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """(int8 values, float32 scales) of `x`, symmetric: one scale per slice, the max |x| over `reduce_axes` / 127
  (kept as dims of size 1; 1 where a slice is all zero)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=tuple(reduce_axes), keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def int8_product(x: jax.Array, weight: jax.Array, weight_scale: jax.Array) -> jax.Array:
  """x [..., in] times int8 `weight` [out, in] (one float32 `weight_scale` [out] per row) with x quantised to int8
  per row as well (W8A8, dynamic): an int8 x int8 product accumulated in int32, then both scales; float32 [..., out].

  One row is duplicated into two: XLA:CPU runs int8 x int8 dots fast through YNNPACK, which takes no one-row
  product (a batch-1 decode step's shape) and leaves it to a kernel several times slower.
  """
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1])
  rows = x.shape[0]
  if rows == 1:
    x = jnp.concatenate([x, x])
  values, scale = quantize_int8(x, (1,))
  product = jax.lax.dot_general(values, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  out = product.astype(jnp.float32) * scale * weight_scale.astype(jnp.float32)
  return out[:rows].reshape(*lead, -1)


def dense(x: jax.Array, params: dict, name: str, dtype, in_dims: int = 1,
          layout: Layout = Layout.TRAINING) -> jax.Array:
  """x [..., *in] times the layer's `{name}_kernel` [*in, *out] (Layout.TRAINING) or `{name}_weight` [out, in]
  (Layout.DECODE, see `decode_layout`; Layout.DECODE_INT8: int8, times `{name}_scale` [out]; Layout.DECODE_W8A8:
  `int8_product`), plus `{name}_bias` [*out].

  Several input dims are merged into one before the product: contracted as separate dims (e.g. an output
  projection's heads and head_dim) XLA:CPU re-lays the kernel out (a full copy) on every call.
  """
  bias = params[f"{name}_bias"].astype(dtype)
  lead = x.shape[:x.ndim - in_dims]
  x = x.astype(dtype).reshape(*lead, -1)
  if layout is Layout.TRAINING:
    kernel = params[f"{name}_kernel"].astype(dtype)
    out = jax.lax.dot_general(x, kernel.reshape(-1, *bias.shape), (((x.ndim - 1,), (0,)), ((), ()))) + bias
    if f"{name}_lora_a" in params:  # a low-rank update beside the kernel (cpm_jax.adapters)
      out = out + low_rank_update(x, params, name, dtype).reshape(out.shape)
    return out
  if layout is Layout.DECODE_W8A8:
    out = int8_product(x, params[f"{name}_weight"], params[f"{name}_scale"]).astype(dtype)
  else:
    out = jax.lax.dot_general(x, params[f"{name}_weight"].astype(dtype), (((x.ndim - 1,), (1,)), ((), ())))
  if layout is Layout.DECODE_INT8:
    out = out * params[f"{name}_scale"].astype(dtype)
  if bias.ndim == 3:  # fused [n, heads, head_dim] outputs, stored heads first
    out = jnp.swapaxes(out.reshape(*lead, bias.shape[1], bias.shape[0], bias.shape[2]), -3, -2)
  return out.reshape(*lead, *bias.shape) + bias


def low_rank_update(x: jax.Array, params: dict, name: str, dtype) -> jax.Array:
  """LoRA's scale x (x A) B for the kernel `name`: `{name}_lora_a` [*in, rank], `{name}_lora_b` [rank, *out] and the
  scalar `{name}_lora_scale` (alpha / rank); x [..., in] with its input dims merged. Returns [..., out] merged."""
  a, b = params[f"{name}_lora_a"].astype(dtype), params[f"{name}_lora_b"].astype(dtype)
  rank = a.shape[-1]
  low = jnp.dot(x, a.reshape(-1, rank))
  return jnp.dot(low, b.reshape(rank, -1)) * params[f"{name}_lora_scale"].astype(dtype)


def decode_block(block: dict) -> dict:
  """One layer's params in Layout.DECODE: every `{name}_kernel` [*in, *out] stored as a matrix `{name}_weight`
  [out, in] (torch.nn.Linear's order), which `dense` contracts on its minor dim.

  A batch-1 decode step is a chain of matrix-vector products, and XLA:CPU streams a weight whose contracted dim is
  minor 1.2-1.4x faster than one stored [in, out] (BUILD.md, decode throughput). The weights are 2-D because XLA
  copies a weight with several output dims back to [in, out] before every product. A kernel's input dims are
  those its bias lacks; a fused projection's [n, heads, head_dim] outputs are stored heads first, so a split of
  the heads over a mesh axis stays a split of the matrix's rows.
  """
  converted = {}
  for key, value in block.items():
    if isinstance(value, dict):
      converted[key] = decode_block(value)
    elif key.endswith("_kernel"):
      name = key[:-len("_kernel")]
      out_dims = block[f"{name}_bias"].ndim
      in_dims = value.ndim - out_dims
      weight = jnp.transpose(value, (*range(in_dims, value.ndim), *range(in_dims)))
      if out_dims == 3:
        weight = jnp.swapaxes(weight, 0, 1)
      converted[f"{name}_weight"] = weight.reshape(math.prod(weight.shape[:out_dims]), -1)
    else:
      converted[key] = value
  return converted


def decode_blocks(stacked: Any) -> tuple:
  """Blocks stacked on a leading `layers` axis in the decode layout: a tuple of per-layer trees, each in
  Layout.DECODE (`decode_block`)."""
  count = jax.tree.leaves(stacked)[0].shape[0]
  return tuple(decode_block(jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(count))


def project_qkv(x: jax.Array, params: dict, dtype, layout: Layout = Layout.TRAINING) -> jax.Array:
  """x [b, t, e] -> [b, t, n, heads, head_dim] with one fused matmul."""
  out = dense(x, params, "qkv", dtype, layout=layout)
  return partitioning.constrain(out, ("batch", "length", None, "act_heads", None))


def project_q(x: jax.Array, params: dict, dtype, layout: Layout = Layout.TRAINING) -> jax.Array:
  """x [b, t, e] -> queries [b, t, heads, head_dim] (params from `query_specs`)."""
  out = dense(x, params, "q", dtype, layout=layout)
  return partitioning.constrain(out, ("batch", "length", "act_heads", None))


def self_attention(x: jax.Array, params: dict, mask: jax.Array, dtype, implementation: str = "xla",
                   layout: Layout = Layout.TRAINING, kv: tuple[jax.Array, jax.Array] | None = None,
                   cache_index: jax.Array | int | None = None, span: int | None = None) -> tuple[jax.Array, Any]:
  """Fused-QKV self-attention with its output projection; returns (output [b, t, e], kv).

  With `kv` (this layer's decode cache: keys and values in `cache_layout`) the new keys and values are written at
  `cache_index`, the queries attend over the cache's first `span` slots (default: all; the mask has as many), and
  the updated kv is returned.
  """
  qkv = checkpoint_name(project_qkv(x, params, dtype, layout), "attention_qkv")
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if kv is None:
    if "prefix_k" in params:  # trainable keys and values every query sees first (cpm_jax.adapters)
      k, v, mask = with_prefix(k, v, mask, params["prefix_k"], params["prefix_v"])
    context = checkpoint_name(dot_product_attention(q, k, v, mask, implementation), "attention_context")
    return project_out(context, params, dtype, layout), None
  kv = tuple(jax.lax.dynamic_update_slice_in_dim(cached, cache_layout(new).astype(cached.dtype), cache_index, axis=1)
             for cached, new in zip(kv, (k, v)))
  keys, values = (a[:, :span].astype(dtype) for a in kv)
  out = cached_attention(q, keys, values, mask, implementation)
  return project_out(out, params, dtype, layout), kv


def with_prefix(k: jax.Array, v: jax.Array, mask: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array):
  """Keys and values [b, t, heads, d] with the prefix [p, heads, d] in front (P-tuning v2), and the mask [b, 1, q, t]
  widened so that every query that sees any key also sees the prefix."""
  batch = k.shape[0]
  k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(a.dtype), (batch, *p.shape)), a], axis=1)
          for p, a in ((prefix_k, k), (prefix_v, v)))
  visible = jnp.broadcast_to(mask.any(-1, keepdims=True), (*mask.shape[:3], prefix_k.shape[0]))
  return k, v, jnp.concatenate([visible, mask], axis=-1)


def project_out(x: jax.Array, params: dict, dtype, layout: Layout = Layout.TRAINING) -> jax.Array:
  """Row-parallel output projection [b, t, heads, head_dim] -> [b, t, e]."""
  out = dense(x, params, "out", dtype, in_dims=2, layout=layout)
  return partitioning.constrain(out, ("batch", "length", "act_embed"))


def mlp(x: jax.Array, params: dict, dtype, approximate_gelu: bool, dropout_rate: float = 0.0,
        rng: jax.Array | None = None, layout: Layout = Layout.TRAINING) -> jax.Array:
  h = gelu(checkpoint_name(dense(x, params, "in", dtype, layout=layout), "mlp_pre_activation"), approximate_gelu)
  h = partitioning.constrain(h, ("batch", "length", "act_mlp"))
  h = dropout(h, dropout_rate, rng)
  out = dense(h, params, "out", dtype, layout=layout)
  return partitioning.constrain(out, ("batch", "length", "act_embed"))
