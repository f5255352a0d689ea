"""CPM-LM: the GPT-2-style Chinese decoder of CPM-1, as a pure function of a params pytree.

Pre-LN blocks (ln_1 -> attention -> residual; ln_2 -> MLP -> residual), learned positions, tanh-GELU,
LayerNorm eps 1e-5, final LayerNorm, output head tied to the word embedding (no bias).

Params layout (every block param is stacked over layers on a leading `layers` axis):
  embed/wte [vocab, embed], embed/wpe [positions, embed]
  blocks/ln_1/{scale,bias} [L, embed]
  blocks/attn/qkv_kernel [L, embed, 3, heads, head_dim], qkv_bias [L, 3, heads, head_dim]
  blocks/attn/out_kernel [L, heads, head_dim, embed], out_bias [L, embed]
  blocks/ln_2/{scale,bias} [L, embed]
  blocks/mlp/in_kernel [L, embed, mlp], in_bias [L, mlp], out_kernel [L, mlp, embed], out_bias [L, embed]
  ln_f/{scale,bias} [embed]
Cached decoding takes the blocks per layer with each dense kernel a matrix [out, in] (`decode_layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import gin
import jax
import jax.numpy as jnp

from cpm_jax import layers, objectives, partitioning

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CPMConfig:
  """Sizes and options of a CPM-LM model (released sizes in gin_configs/models/)."""

  vocab_size: int = 30000
  num_layers: int = 12
  embed_dim: int = 768
  num_heads: int = 12
  mlp_dim: int = 0  # 0 -> 4 * embed_dim
  max_positions: int = 1024
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  init_stddev: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"  # one of REMAT_POLICIES
  scan_layers: bool = True
  attention_impl: str = "xla"  # "xla" (einsum), "jax" or "cudnn" (jax.nn.dot_product_attention)

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"CPMConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"CPMConfig.remat_policy={self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}.")
    if self.attention_impl not in ("xla", "jax", "cudnn"):
      raise ValueError(f"CPMConfig.attention_impl={self.attention_impl!r}; expected 'xla', 'jax' or 'cudnn'.")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def ffn_dim(self) -> int:
    return self.mlp_dim or 4 * self.embed_dim

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def param_specs(config: CPMConfig) -> dict:
  std = config.init_stddev
  out_std = std / math.sqrt(2 * config.num_layers)
  block = {
      "ln_1": layers.layer_norm_specs(config.embed_dim),
      "attn": layers.attention_specs(config.embed_dim, config.num_heads, config.head_dim, std, out_std),
      "ln_2": layers.layer_norm_specs(config.embed_dim),
      "mlp": layers.mlp_specs(config.embed_dim, config.ffn_dim, std, out_std),
  }
  return {
      "embed": {
          "wte": layers.ParamSpec((config.vocab_size, config.embed_dim), ("vocab", "embed"), layers.normal(std)),
          "wpe": layers.ParamSpec((config.max_positions, config.embed_dim), ("positions", "embed"),
                                  layers.normal(std)),
      },
      "blocks": layers.stacked(block, config.num_layers),
      "ln_f": layers.layer_norm_specs(config.embed_dim),
  }


def init(config: CPMConfig, key: jax.Array) -> dict:
  return layers.init_from_specs(param_specs(config), key, jnp.dtype(config.param_dtype))


def logical_axes(config: CPMConfig) -> dict:
  return layers.logical_axes(param_specs(config))


def abstract_params(config: CPMConfig) -> dict:
  return jax.eval_shape(functools.partial(init, config), jax.random.key(0))


# ---- KV cache ----------------------------------------------------------------------------------

def init_cache(config: CPMConfig, batch: int, length: int, dtype=None, per_layer: bool = False,
               num_layers: int | None = None) -> dict:
  """Empty KV cache for `length` positions; slots with segment id 0 are never attended.

  k/v are [layers, batch, length, heads, head_dim], or with per_layer a tuple of one array per layer in
  `layers.cached_attention`'s layout, [batch * heads, length, head_dim] (the layout for `decode_layout` params: no
  per-step slicing or restacking, and the attention dots read it in place). num_layers defaults to
  config.num_layers (PLUG's decoder passes its own, with its config).
  """
  dtype = dtype or config.compute_dtype
  num_layers = num_layers or config.num_layers
  if per_layer:
    k, v = zip(*(layers.empty_cache(batch, config.num_heads, length, config.head_dim, dtype)
                 for _ in range(num_layers)))
  else:
    k = v = jnp.zeros((num_layers, batch, length, config.num_heads, config.head_dim), dtype)
  return {
      "k": k,
      "v": v,
      "segment_ids": jnp.zeros((batch, length), jnp.int32),
      "positions": jnp.zeros((batch, length), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def cache_logical_axes(config: CPMConfig | None = None, per_layer: bool = False,
                       num_layers: int | None = None) -> dict:
  """Logical axes of `init_cache`'s tree (per_layer needs the number of layers: num_layers or the config's)."""
  if per_layer:
    num_layers = num_layers or config.num_layers
    k = v = (layers.CACHE_AXES,) * num_layers
  else:
    k = v = ("layers", "batch", "cache_length", "act_heads", None)
  return {"k": k, "v": v, "segment_ids": ("batch", "cache_length"),
          "positions": ("batch", "cache_length"), "index": ()}


def decode_layout(params: dict) -> dict:
  """params in the decode layout: `blocks` as a tuple of per-layer trees whose dense weights are stored [out, in]
  (`layers.decode_layout`). Params already in it are returned as they are.

  Cached decoding under jit then reads every layer's weights in place (with stacked blocks XLA copies each layer's
  slice on every step), as matrix-vector products over weights whose contracted dim is minor (faster on XLA:CPU).
  The conversion is compiled on its own, outside any decode program, and costs one copy of the block weights:
  callers that generate repeatedly convert once (`decoding.generate` converts per call otherwise).
  """
  if isinstance(params["blocks"], tuple):
    return params
  return _to_decode_layout(params)


@jax.jit
def _to_decode_layout(params: dict) -> dict:
  return {**params, "blocks": layers.decode_blocks(params["blocks"])}


# ---- forward -----------------------------------------------------------------------------------

def _block(x, params, config: CPMConfig, mask, rng, kv=None, cache_index=None, heads_major: bool = False):
  """One pre-LN block. With `kv` (this layer's cached k, v), new k/v are written at cache_index.

  The cached k/v are [batch, length, heads, head_dim], or in `layers.cached_attention`'s layouts if heads_major.
  """
  dtype = config.compute_dtype
  rate = config.dropout_rate if rng is not None else 0.0
  rngs = jax.random.split(rng, 3) if rng is not None else (None,) * 3
  h = layers.layer_norm(x, params["ln_1"], config.layer_norm_eps)
  attn, kv = layers.self_attention(h, params["attn"], mask, dtype, config.attention_impl, kv, cache_index,
                                   heads_major)
  x = x + layers.dropout(attn, rate, rngs[0])
  h = layers.layer_norm(x, params["ln_2"], config.layer_norm_eps)
  h = layers.mlp(h, params["mlp"], dtype, approximate_gelu=True, dropout_rate=rate, rng=rngs[1])
  x = x + layers.dropout(h, rate, rngs[2])
  return partitioning.constrain(x, ("batch", "length", "act_embed")), kv


def embed(params: dict, tokens: jax.Array, positions: jax.Array, config: CPMConfig) -> jax.Array:
  x = params["embed"]["wte"][tokens] + params["embed"]["wpe"][positions]
  return partitioning.constrain(x.astype(config.compute_dtype), ("batch", "length", "act_embed"))


def logits_from_hidden(params: dict, hidden: jax.Array, config: CPMConfig) -> jax.Array:
  """Tied output head: hidden @ wte^T, float32 logits [batch, length, vocab]."""
  wte = params["embed"]["wte"].astype(config.compute_dtype)
  logits = jnp.einsum("bte,ve->btv", hidden, wte, preferred_element_type=jnp.float32)
  return partitioning.constrain(logits, ("batch", "length", "act_vocab"))


def hidden_states(params: dict, tokens: jax.Array, config: CPMConfig, *, positions=None, segment_ids=None,
                  dropout_rng=None, cache: dict | None = None) -> tuple[jax.Array, dict | None]:
  """Final-LayerNorm hidden states [batch, length, embed] and the updated cache (or None).

  tokens: int [batch, length]. positions: per-token positions (default 0.. or continuing the cache);
  they restart per document in packed rows. segment_ids: document id per token, 0 = padding
  (default all 1). dropout_rng: enables dropout. cache: from `init_cache`; the tokens are appended
  at cache["index"] and attend to everything cached before them. params may be in the `decode_layout`
  layout (then with a per_layer cache).
  """
  batch, length = tokens.shape
  offset = cache["index"] if cache is not None else 0
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  x = embed(params, tokens, positions, config)
  if dropout_rng is not None:
    dropout_rng, embed_rng = jax.random.split(dropout_rng)
    x = layers.dropout(x, config.dropout_rate, embed_rng)

  if cache is None:
    mask = layers.attention_mask(segment_ids, segment_ids, positions, positions)
  else:
    kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, offset, axis=1)
    kv_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, offset, axis=1)
    mask = layers.attention_mask(segment_ids, kv_segments, positions, kv_positions)

  per_layer = isinstance(params["blocks"], tuple)  # `decode_layout` (decoding)

  def body(x, layer_inputs):
    layer_params, index, kv = layer_inputs
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
    return _block(x, layer_params, config, mask, rng, kv, offset, heads_major=per_layer)

  policy = REMAT_POLICIES[config.remat_policy]
  if config.remat_policy != "none":
    body = jax.checkpoint(body, policy=policy, prevent_cse=not config.scan_layers)

  layer_ids = jnp.arange(config.num_layers)
  cached_kv = None if cache is None else (cache["k"], cache["v"])
  if per_layer:  # unrolled over separate arrays, a per-layer heads-major cache
    outs = []
    for i, layer in enumerate(params["blocks"]):
      x, kv = body(x, (layer, i, None if cache is None else (cache["k"][i], cache["v"][i])))
      outs.append(kv)
    new_kv = None if cache is None else tuple(zip(*outs))
  elif config.scan_layers:
    x, new_kv = jax.lax.scan(body, x, (params["blocks"], layer_ids, cached_kv))
  else:
    outs = []
    for i in range(config.num_layers):
      layer = jax.tree.map(lambda a, i=i: a[i], (params["blocks"], layer_ids, cached_kv))
      x, kv = body(x, layer)
      outs.append(kv)
    new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

  x = layers.layer_norm(x, params["ln_f"], config.layer_norm_eps)
  new_cache = None
  if cache is not None:
    new_cache = {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_segments, "positions": kv_positions,
                 "index": offset + length}
  return x, new_cache


def forward(params: dict, tokens: jax.Array, config: CPMConfig, **kwargs) -> tuple[jax.Array, dict | None]:
  """Logits [batch, length, vocab] (float32) and the updated cache; kwargs as `hidden_states`."""
  hidden, cache = hidden_states(params, tokens, config, **kwargs)
  return logits_from_hidden(params, hidden, config), cache


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CPMLanguageModel:
  """CPM-LM as the training loop sees a model: param specs, a loss over batches, FLOPs per token.

  Batches are dicts of [batch, length] arrays: inputs, targets, weights, segment_ids, positions
  (the Grain LM pipeline's format).
  """

  config: CPMConfig = dataclasses.field(default_factory=CPMConfig)
  z_loss: float = 0.0

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    logits, _ = forward(params, batch["inputs"], self.config, positions=batch.get("positions"),
                        segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)
    return objectives.lm_loss(logits, batch["targets"], batch["weights"], self.z_loss)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (blocks + tied logits head) + attention scores.

    Attention: QK^T and AV are 2 x 2 x seq_len x embed FLOPs per token per layer forward, x3 with
    the backward pass (PaLM's accounting: 12 x layers x embed x seq_len).
    """
    c = self.config
    per_layer = 4 * c.embed_dim * c.embed_dim + 2 * c.embed_dim * c.ffn_dim
    matmul_params = c.num_layers * per_layer + c.vocab_size * c.embed_dim
    return 6.0 * matmul_params + 12.0 * c.num_layers * c.embed_dim * seq_len
