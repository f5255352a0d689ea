"""PLUG: a StructBERT encoder + PALM decoder (and plain post-LN BERT), as pure functions of a params pytree.

Encoder: word + position + token-type embeddings -> LayerNorm; blocks pre-LN (PLUG: LN -> attention ->
residual; LN -> FFN -> residual; a final LN) or post-LN (BERT / StructBERT: attention -> residual -> LN;
FFN -> residual -> LN) by `encoder_pre_ln`. Decoder (PALM): the same embedding module (token type 0),
pre-LN blocks of causal self-attention, cross-attention over the final encoder output and FFN, a final LN,
logits tied to the word embedding without bias. erf-GELU everywhere.

Params layout (block params stacked over layers on a leading `layers` axis; attention as in CPM; cached
decoding takes the decoder blocks per layer, see `decode_layout`):
  embed/wte [vocab, embed], embed/wpe [positions, embed], embed/wtt [token_types, embed], embed/ln
  encoder/blocks/{ln_1, attn, ln_2, mlp}, encoder/ln_f (pre-LN only)
    pre-LN: ln_1 precedes attention, ln_2 the FFN. post-LN: ln_1 follows the attention residual
    (BERT's attention.output.LayerNorm), ln_2 the FFN residual (BERT's output.LayerNorm).
  decoder/blocks/{ln_1, self_attn, ln_2, cross_attn, ln_3, mlp}, decoder/ln_f
    cross_attn: q_kernel [L, embed, heads, head_dim], q_bias, qkv_kernel [L, embed, 2, heads, head_dim]
    (K, V over the encoder output), qkv_bias, out_kernel, out_bias
  mlm/{dense_kernel [embed, embed], dense_bias, ln, bias [vocab]}   (decoder weight tied to wte)
  pooler/{kernel, bias}, relation/{kernel [embed, 3], bias}   (when num_relations or num_classes > 0)
  classifier/{kernel [embed, classes], bias}                   (when num_classes > 0)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding as decoding_lib
from cpm_jax import layers, objectives, partitioning
from cpm_jax.models import cpm

ACT = ("batch", "length", "act_embed")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PlugConfig:
  """Sizes and options of a PLUG / StructBERT / PALM model (defaults: PLUG 27B as released)."""

  vocab_size: int = 21504  # BERT-Chinese 21128 padded to a multiple of 8 x 128
  num_encoder_layers: int = 24
  num_decoder_layers: int = 6  # 0: encoder only (StructBERT, BERT)
  embed_dim: int = 8192
  num_heads: int = 128
  mlp_dim: int = 32768
  max_positions: int = 2048
  type_vocab_size: int = 3
  encoder_pre_ln: bool = True  # False: post-LN BERT / StructBERT
  num_relations: int = 3  # sentence-relation head classes (0: no head)
  num_classes: int = 0  # classification head classes (0: no head)
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  init_stddev: float = 0.00707
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"  # one of cpm.REMAT_POLICIES
  scan_layers: bool = True
  attention_impl: str = "xla"  # "xla", "jax" or "cudnn"

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"PlugConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
    if self.remat_policy not in cpm.REMAT_POLICIES:
      raise ValueError(f"PlugConfig.remat_policy={self.remat_policy!r}; expected one of "
                       f"{sorted(cpm.REMAT_POLICIES)}.")
    if self.attention_impl not in ("xla", "jax", "cudnn"):
      raise ValueError(f"PlugConfig.attention_impl={self.attention_impl!r}; expected 'xla', 'jax' or 'cudnn'.")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def has_pooler(self) -> bool:
    return self.num_relations > 0 or self.num_classes > 0


# ---- params ------------------------------------------------------------------------------------

def _dense_specs(din: int, dout: int, axes: tuple, std: float) -> dict:
  return {"kernel": layers.ParamSpec((din, dout), axes, layers.normal(std)),
          "bias": layers.ParamSpec((dout,), axes[1:], layers.zeros)}


def param_specs(config: PlugConfig) -> dict:
  std, e, h, d = config.init_stddev, config.embed_dim, config.num_heads, config.head_dim
  ln = functools.partial(layers.layer_norm_specs, e)
  attn = functools.partial(layers.attention_specs, e, h, d, std, std)
  mlp = layers.mlp_specs(e, config.mlp_dim, std, std)
  specs = {
      "embed": {
          "wte": layers.ParamSpec((config.vocab_size, e), ("vocab", "embed"), layers.normal(std)),
          "wpe": layers.ParamSpec((config.max_positions, e), ("positions", "embed"), layers.normal(std)),
          "wtt": layers.ParamSpec((config.type_vocab_size, e), ("token_types", "embed"), layers.normal(std)),
          "ln": ln(),
      },
      "encoder": {"blocks": layers.stacked({"ln_1": ln(), "attn": attn(), "ln_2": ln(), "mlp": mlp},
                                           config.num_encoder_layers)},
      "mlm": {
          "dense_kernel": layers.ParamSpec((e, e), ("embed", None), layers.normal(std)),
          "dense_bias": layers.ParamSpec((e,), (None,), layers.zeros),
          "ln": ln(),
          "bias": layers.ParamSpec((config.vocab_size,), ("vocab",), layers.zeros),
      },
  }
  if config.encoder_pre_ln:
    specs["encoder"]["ln_f"] = ln()
  if config.num_decoder_layers:
    block = {"ln_1": ln(), "self_attn": attn(), "ln_2": ln(),
             "cross_attn": {**attn(fused_qkv=2), **layers.query_specs(e, h, d, std)},
             "ln_3": ln(), "mlp": mlp}
    specs["decoder"] = {"blocks": layers.stacked(block, config.num_decoder_layers), "ln_f": ln()}
  if config.has_pooler:
    specs["pooler"] = _dense_specs(e, e, ("embed", None), std)
  if config.num_relations:
    specs["relation"] = _dense_specs(e, config.num_relations, ("embed", "classes"), std)
  if config.num_classes:
    specs["classifier"] = _dense_specs(e, config.num_classes, ("embed", "classes"), std)
  return specs


def init(config: PlugConfig, key: jax.Array) -> dict:
  return layers.init_from_specs(param_specs(config), key, jnp.dtype(config.param_dtype))


def logical_axes(config: PlugConfig) -> dict:
  return layers.logical_axes(param_specs(config))


def abstract_params(config: PlugConfig) -> dict:
  return jax.eval_shape(functools.partial(init, config), jax.random.key(0))


# ---- shared pieces -----------------------------------------------------------------------------

def _split(rng, n):
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def _rate(config: PlugConfig, rng) -> float:
  return config.dropout_rate if rng is not None else 0.0


def embed(params: dict, tokens: jax.Array, token_types: jax.Array, positions: jax.Array, config: PlugConfig,
          rng: jax.Array | None = None) -> jax.Array:
  """word + position + token type -> LayerNorm -> dropout, [batch, length, embed]."""
  e = params["embed"]
  x = (e["wte"][tokens] + e["wpe"][positions] + e["wtt"][token_types]).astype(config.compute_dtype)
  x = layers.layer_norm(x, e["ln"], config.layer_norm_eps)
  return partitioning.constrain(layers.dropout(x, _rate(config, rng), rng), ACT)


def _run_layers(body, x, xs, num_layers: int, config: PlugConfig, per_layer: bool = False):
  """Applies `body(x, layer_xs) -> (x, y)` over the layers (with remat): xs stacked on a leading axis (scan or
  loop; ys stacked likewise), or with per_layer a sequence of each layer's xs (a loop; ys a tuple)."""
  if config.remat_policy != "none":
    body = jax.checkpoint(body, policy=cpm.REMAT_POLICIES[config.remat_policy],
                          prevent_cse=per_layer or not config.scan_layers)
  if config.scan_layers and not per_layer:
    return jax.lax.scan(body, x, xs)
  ys = []
  for i in range(num_layers):
    x, y = body(x, xs[i] if per_layer else jax.tree.map(lambda a, i=i: a[i], xs))
    ys.append(y)
  return x, tuple(ys) if per_layer else jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _ffn(x, params, config: PlugConfig, rngs):
  h = layers.mlp(x, params, config.compute_dtype, approximate_gelu=False, dropout_rate=_rate(config, rngs[0]),
                 rng=rngs[0])
  return layers.dropout(h, _rate(config, rngs[1]), rngs[1])


def _defaults(tokens, positions, segment_ids, offset=0):
  batch, length = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  return positions, segment_ids


# ---- encoder -----------------------------------------------------------------------------------

def _encoder_block(x, params, config: PlugConfig, mask, rng):
  dtype, eps = config.compute_dtype, config.layer_norm_eps
  rngs = _split(rng, 3)

  def attention(h):
    out, _ = layers.self_attention(h, params["attn"], mask, dtype, config.attention_impl)
    return layers.dropout(out, _rate(config, rngs[0]), rngs[0])

  if config.encoder_pre_ln:
    x = x + attention(layers.layer_norm(x, params["ln_1"], eps))
    x = x + _ffn(layers.layer_norm(x, params["ln_2"], eps), params["mlp"], config, rngs[1:])
  else:
    x = layers.layer_norm(x + attention(x), params["ln_1"], eps)
    x = layers.layer_norm(x + _ffn(x, params["mlp"], config, rngs[1:]), params["ln_2"], eps)
  return partitioning.constrain(x, ACT)


def encode(params: dict, tokens: jax.Array, config: PlugConfig, *, token_types=None, positions=None,
           segment_ids=None, dropout_rng=None) -> jax.Array:
  """Final encoder hidden states [batch, length, embed].

  token_types default 0; positions default 0.. (restart per document in packed rows); segment_ids:
  document id per token, 0 = padding (default all 1). Attention is bidirectional within a segment.
  """
  positions, segment_ids = _defaults(tokens, positions, segment_ids)
  token_types = jnp.zeros_like(tokens) if token_types is None else token_types
  rngs = _split(dropout_rng, 2)
  x = embed(params, tokens, token_types, positions, config, rngs[0])
  mask = layers.attention_mask(segment_ids, segment_ids, None, None)

  def body(x, layer):
    layer_params, index = layer
    rng = None if rngs[1] is None else jax.random.fold_in(rngs[1], index)
    return _encoder_block(x, layer_params, config, mask, rng), None

  x, _ = _run_layers(body, x, (params["encoder"]["blocks"], jnp.arange(config.num_encoder_layers)),
                     config.num_encoder_layers, config)
  if config.encoder_pre_ln:
    x = layers.layer_norm(x, params["encoder"]["ln_f"], config.layer_norm_eps)
  return x


# ---- heads -------------------------------------------------------------------------------------

def mlm_logits(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """MLM head: dense -> GELU -> LN -> tied word embedding + bias; float32 [batch, length, vocab]."""
  dtype, p = config.compute_dtype, params["mlm"]
  h = jnp.einsum("bte,ef->btf", hidden.astype(dtype), p["dense_kernel"].astype(dtype)) + p["dense_bias"].astype(dtype)
  h = layers.layer_norm(layers.gelu(h, approximate=False), p["ln"], config.layer_norm_eps)
  return cpm.logits_from_hidden(params, h, config) + p["bias"].astype(jnp.float32)


def _dense(x, params, dtype):
  return jnp.einsum("be,ec->bc", x.astype(dtype), params["kernel"].astype(dtype)) + params["bias"].astype(dtype)


def pooled(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """BERT pooler: tanh(dense(first token's state)), [batch, embed]."""
  return jnp.tanh(_dense(hidden[:, 0], params["pooler"], config.compute_dtype))


def relation_logits(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """Sentence-relation logits [batch, num_relations] (float32) from the pooled [CLS] state."""
  return _dense(pooled(params, hidden, config), params["relation"], config.compute_dtype).astype(jnp.float32)


def classification_logits(params: dict, hidden: jax.Array, config: PlugConfig,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """Classifier on the pooled [CLS] state -> dropout -> linear; float32 [batch, num_classes]."""
  x = layers.dropout(pooled(params, hidden, config), _rate(config, dropout_rng), dropout_rng)
  return _dense(x, params["classifier"], config.compute_dtype).astype(jnp.float32)


# ---- decoder -----------------------------------------------------------------------------------

def decode_layout(params: dict) -> dict:
  """params with decoder/blocks in the layout of cached decoding, as cpm.decode_layout: a tuple of per-layer trees
  with [out, in] dense weights, converted by a program of its own at the cost of one copy of the decoder blocks.
  Params already in this layout are returned as they are."""
  if isinstance(params["decoder"]["blocks"], tuple):
    return params
  return _to_decode_layout(params)


@jax.jit
def _to_decode_layout(params: dict) -> dict:
  return {**params, "decoder": {**params["decoder"], "blocks": layers.decode_blocks(params["decoder"]["blocks"])}}


def _decoder_layers(params: dict) -> tuple:
  blocks = params["decoder"]["blocks"]
  if not isinstance(blocks, tuple):
    raise ValueError("Cached decoding needs params in plug.decode_layout (per-layer decoder blocks).")
  return blocks


def init_cache(params: dict, config: PlugConfig, encoder_hidden: jax.Array, encoder_segment_ids: jax.Array,
               length: int, dtype=None) -> dict:
  """Decoder cache for params in `decode_layout`, per layer: empty self-attention K/V (cpm.init_cache's
  per_layer layout) and the cross-attention K/V over the encoder output in the same layout (cross_k, cross_v
  [batch * heads, src, head_dim]), computed once here (every step reuses them)."""
  dtype = dtype or config.compute_dtype
  cache = cpm.init_cache(config, encoder_hidden.shape[0], length, dtype, per_layer=True,
                         num_layers=config.num_decoder_layers)
  kv = [layers.project_qkv(encoder_hidden, block["cross_attn"], config.compute_dtype).astype(dtype)
        for block in _decoder_layers(params)]  # [batch, src, k/v, heads, head_dim] per layer
  return {**cache, "cross_k": tuple(layers.cache_layout(a[:, :, 0]) for a in kv),
          "cross_v": tuple(layers.cache_layout(a[:, :, 1]) for a in kv),
          "encoder_segment_ids": encoder_segment_ids.astype(jnp.int32)}


def cache_logical_axes(config: PlugConfig) -> dict:
  """Logical axes of `init_cache`'s tree."""
  axes = cpm.cache_logical_axes(per_layer=True, num_layers=config.num_decoder_layers)
  return {**axes, "cross_k": axes["k"], "cross_v": axes["v"], "encoder_segment_ids": ("batch", "cache_length")}


def _decoder_block(x, params, config: PlugConfig, self_mask, cross_mask, rng, encoder_hidden, layer_cache,
                   cache_index):
  """One pre-LN decoder block. Without `layer_cache` the cross-attention K/V are projected from encoder_hidden
  [b, s, e]; with it (this layer's (k, v, cross_k, cross_v), in `layers.cached_attention`'s layouts) the new
  self-attention K/V are written at cache_index and the cached cross K/V are read. Returns (x, updated (k, v)
  or None)."""
  dtype, eps = config.compute_dtype, config.layer_norm_eps
  rngs = _split(rng, 4)
  kv = None if layer_cache is None else layer_cache[:2]
  h = layers.layer_norm(x, params["ln_1"], eps)
  out, kv = layers.self_attention(h, params["self_attn"], self_mask, dtype, config.attention_impl, kv, cache_index,
                                  heads_major=True)
  x = x + layers.dropout(out, _rate(config, rngs[0]), rngs[0])

  p = params["cross_attn"]
  h = layers.layer_norm(x, params["ln_2"], eps)
  q = layers.project_q(h, p, dtype)
  if layer_cache is None:
    memory = layers.project_qkv(encoder_hidden, p, dtype)
    out = layers.dot_product_attention(q, memory[:, :, 0], memory[:, :, 1], cross_mask, config.attention_impl)
  else:
    keys, values = (a.astype(dtype) for a in layer_cache[2:])
    out = layers.cached_attention(q, keys, values, cross_mask, config.attention_impl)
  x = x + layers.dropout(layers.project_out(out, p, dtype), _rate(config, rngs[1]), rngs[1])

  x = x + _ffn(layers.layer_norm(x, params["ln_3"], eps), params["mlp"], config, rngs[2:])
  return partitioning.constrain(x, ACT), kv


def decode(params: dict, tokens: jax.Array, config: PlugConfig, *, encoder_hidden=None, encoder_segment_ids=None,
           positions=None, segment_ids=None, dropout_rng=None, cache: dict | None = None
           ) -> tuple[jax.Array, dict | None]:
  """Decoder hidden states [batch, length, embed] (after the final LN) and the updated cache.

  Without a cache, `encoder_hidden` (and its segment ids, default all 1) is required and decoder segment
  k attends encoder segment k. With a cache from `init_cache` (params in `decode_layout`), tokens
  are appended at cache["index"] and the cached cross K/V are used.
  """
  if config.num_decoder_layers == 0:
    raise ValueError("PlugConfig.num_decoder_layers is 0: this model has no decoder.")
  blocks = params["decoder"]["blocks"] if cache is None else _decoder_layers(params)
  per_layer = isinstance(blocks, tuple)
  offset = 0 if cache is None else cache["index"]
  positions, segment_ids = _defaults(tokens, positions, segment_ids, offset)
  rngs = _split(dropout_rng, 2)
  x = embed(params, tokens, jnp.zeros_like(tokens), positions, config, rngs[0])

  if cache is None:
    if encoder_hidden is None:
      raise ValueError("decode: pass encoder_hidden (or a cache from init_cache).")
    if encoder_segment_ids is None:
      encoder_segment_ids = jnp.ones(encoder_hidden.shape[:2], jnp.int32)
    self_mask = layers.attention_mask(segment_ids, segment_ids, positions, positions)
    layer_caches = (None,) * config.num_decoder_layers
  else:
    encoder_segment_ids = cache["encoder_segment_ids"]
    kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, offset, axis=1)
    kv_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, offset, axis=1)
    self_mask = layers.attention_mask(segment_ids, kv_segments, positions, kv_positions)
    layer_caches = tuple(zip(cache["k"], cache["v"], cache["cross_k"], cache["cross_v"]))
  cross_mask = layers.attention_mask(segment_ids, encoder_segment_ids, None, None)

  def body(x, layer):
    layer_params, index, layer_cache = layer
    rng = None if rngs[1] is None else jax.random.fold_in(rngs[1], index)
    return _decoder_block(x, layer_params, config, self_mask, cross_mask, rng, encoder_hidden, layer_cache, offset)

  n = config.num_decoder_layers
  xs = tuple(zip(blocks, range(n), layer_caches)) if per_layer else (blocks, jnp.arange(n), None)
  x, new_kv = _run_layers(body, x, xs, n, config, per_layer)
  x = layers.layer_norm(x, params["decoder"]["ln_f"], config.layer_norm_eps)
  if cache is None:
    return x, None
  k, v = zip(*new_kv)
  return x, {**cache, "k": k, "v": v, "segment_ids": kv_segments, "positions": kv_positions,
             "index": offset + tokens.shape[1]}


def decoder_logits(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """Tied decoder output: hidden @ wte^T (no bias), float32 [batch, length, vocab]."""
  return cpm.logits_from_hidden(params, hidden, config)


# ---- models as the training loop sees them -----------------------------------------------------

def _encoder_inputs(params: dict, batch: dict, config: PlugConfig, dropout_rng) -> jax.Array:
  return encode(params, batch["inputs"], config, token_types=batch.get("token_types"),
                positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)


def _matmul_params(config: PlugConfig) -> tuple[int, int]:
  """(encoder, decoder) matmul parameters per token, output heads included."""
  e, f = config.embed_dim, config.mlp_dim
  encoder = config.num_encoder_layers * (4 * e * e + 2 * e * f) + e * e + config.vocab_size * e
  decoder = config.num_decoder_layers * (8 * e * e + 2 * e * f) + config.vocab_size * e
  return encoder, decoder


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StructBertModel:
  """Stage 1: the encoder trained on MLM (with word-structural targets) + sentence relation.

  Batches from data.plug_pipeline.StructBertData.
  """

  config: PlugConfig = dataclasses.field(default_factory=PlugConfig)

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    rngs = _split(dropout_rng, 1)
    hidden = _encoder_inputs(params, batch, self.config, rngs[0])
    return objectives.structbert_loss(mlm_logits(params, hidden, self.config), batch["targets"], batch["weights"],
                                      relation_logits(params, hidden, self.config), batch["relation_labels"],
                                      batch["relation_weights"])

  def flops_per_token(self, seq_len: int) -> float:
    """6 x matmul params + attention (12 x layers x embed x seq_len), per encoder token."""
    return 6.0 * _matmul_params(self.config)[0] + 12.0 * self.config.num_encoder_layers * self.config.embed_dim * seq_len


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Seq2SeqModel:
  """Stage 2 (PALM: encoder MLM on the prefix + decoder LM on the continuation) and NLG fine-tuning
  (source -> target; the batches' MLM weights are 0). Batches from PalmData / Seq2SeqData."""

  config: PlugConfig = dataclasses.field(default_factory=PlugConfig)

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    rngs = _split(dropout_rng, 2)
    hidden = _encoder_inputs(params, batch, self.config, rngs[0])
    decoded, _ = decode(params, batch["decoder_inputs"], self.config, encoder_hidden=hidden,
                        encoder_segment_ids=batch.get("segment_ids"), positions=batch.get("decoder_positions"),
                        segment_ids=batch.get("decoder_segment_ids"), dropout_rng=rngs[1])
    return objectives.palm_loss(mlm_logits(params, hidden, self.config), batch["targets"], batch["weights"],
                                decoder_logits(params, decoded, self.config), batch["decoder_targets"],
                                batch["decoder_weights"])

  def flops_per_token(self, seq_len: int) -> float:
    """Per encoder token, counting one decoder token per encoder token (an upper bound for PALM's 80/20)."""
    c = self.config
    attention = 12.0 * (c.num_encoder_layers + 2 * c.num_decoder_layers) * c.embed_dim * seq_len
    return 6.0 * sum(_matmul_params(c)) + attention


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClassifierModel:
  """NLU fine-tuning: pooled [CLS] -> dropout -> linear (config.num_classes > 0). Batches from ClassificationData."""

  config: PlugConfig = dataclasses.field(default_factory=PlugConfig)

  def __post_init__(self):
    if not self.config.num_classes:
      raise ValueError("ClassifierModel needs PlugConfig.num_classes > 0.")

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def logits(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    rngs = _split(dropout_rng, 2)
    hidden = _encoder_inputs(params, batch, self.config, rngs[0])
    return classification_logits(params, hidden, self.config, rngs[1])

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    return objectives.lm_loss(self.logits(params, batch, dropout_rng), batch["labels"], batch["label_weights"])

  def flops_per_token(self, seq_len: int) -> float:
    c = self.config
    return 6.0 * c.num_encoder_layers * (4 * c.embed_dim ** 2 + 2 * c.embed_dim * c.mlp_dim) + \
        12.0 * c.num_encoder_layers * c.embed_dim * seq_len


def warm_start(params: dict, pretrained: dict) -> tuple[dict, list[str]]:
  """`params` with every leaf that `pretrained` holds at the same path and shape replaced by it (e.g. stage 2's
  encoder and heads from stage 1, a classifier's encoder from stage 1); returns (params, paths taken)."""
  source = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  taken = []

  def take(path, leaf):
    name = jax.tree_util.keystr(path)
    if name in source and source[name].shape == leaf.shape:
      taken.append(name)
      # A copy: the train step donates its params, which must not take `pretrained`'s buffers with them.
      return jax.device_put(jnp.array(source[name], leaf.dtype, copy=True), getattr(leaf, "sharding", None))
    return leaf

  return jax.tree_util.tree_map_with_path(take, params), taken


# ---- generation (through cpm_jax.decoding's generic loops) -------------------------------------

def prefill(params: dict, sources: jax.Array, source_segment_ids: jax.Array, config: PlugConfig, cache_length: int,
            *, cls_id: int, source_token_types: jax.Array | None = None) -> tuple[dict, jax.Array]:
  """Encodes right-padded sources [batch, src] once; returns (decoder cache holding the cross-attention K/V,
  first decoder tokens = [CLS]) for decoding.sample_loop / beam_search_loop with `step_fn`. params in
  `decode_layout`."""
  hidden = encode(params, sources, config, token_types=source_token_types, segment_ids=source_segment_ids)
  cache = init_cache(params, config, hidden, source_segment_ids, cache_length)
  cache = jax.tree.map(partitioning.constrain, cache, cache_logical_axes(config),
                       is_leaf=partitioning.is_logical_axes)
  return cache, jnp.full((sources.shape[0],), cls_id, jnp.int32)


def step_fn(config: PlugConfig, *, suppress_id: int | None = None, suppress_before: int = 0):
  """One cached decoder step (params in `decode_layout`): tokens [batch, 1] -> (float32 logits
  [batch, 1, vocab], cache).

  `suppress_id` (PLUG's sampling: [SEP]) cannot be produced before `suppress_before` other new tokens.
  """
  def step(params, tokens, cache):
    index = cache["index"]
    hidden, cache = decode(params, tokens, config, cache=cache)
    logits = decoder_logits(params, hidden, config)
    if suppress_id is not None:
      logits = logits.at[..., suppress_id].set(jnp.where(index < suppress_before, -1e30,
                                                         logits[..., suppress_id]))
    return logits, cache
  return step


@functools.lru_cache(maxsize=None)
def _generator(config: PlugConfig, decoding: Any, cls_id: int, sep_id: int, pad_id: int, sep_fraction: float):
  """Jitted (sources, segment ids, token types, rng) -> (tokens, lengths) for one setting."""
  def run(params, sources, segment_ids, token_types, rng):
    cache, first = prefill(params, sources, segment_ids, config, decoding.max_new_tokens, cls_id=cls_id,
                           source_token_types=token_types)
    if isinstance(decoding, decoding_lib.BeamSearchConfig):
      tokens, lengths, _ = decoding_lib.beam_search_loop(step_fn(config), params, cache, cache_logical_axes(config),
                                                         first, decoding, eod_id=sep_id, pad_id=pad_id)
      return tokens, lengths
    step = step_fn(config, suppress_id=sep_id, suppress_before=int(sep_fraction * decoding.max_new_tokens))
    tokens, lengths, _ = decoding_lib.sample_loop(step, params, cache, first, decoding, eod_id=sep_id, pad_id=pad_id,
                                         vocab_size=config.vocab_size, rng=rng)
    return tokens, lengths

  return jax.jit(run)


def generate(params: dict, sources: Sequence[Sequence[int]], config: PlugConfig, decoding: Any, *, cls_id: int,
             sep_id: int, pad_id: int = 0, token_types: Sequence[Sequence[int]] | None = None,
             sep_fraction: float = 0.8) -> list[list[int]]:
  """Decoder outputs (token ids, without [SEP]) for encoder inputs such as [CLS] answer [SEP] context [SEP].

  decoding: a decoding.BeamSearchConfig (GNMT length penalty; [SEP] forbidden before min_length) or a
  SamplingConfig (PLUG's: top_k 20, temperature 0.9; [SEP] forbidden before sep_fraction x max_new_tokens).
  Sources are right-padded to a power-of-two width; the decoder starts from [CLS]. Decoding runs on params in
  `decode_layout`: params in the training layout are converted first (a copy of the decoder blocks); callers that
  generate repeatedly pass decode_layout(params), converted once.
  """
  if not sources:
    return []
  longest = max(len(s) for s in sources)
  if longest > config.max_positions:
    raise ValueError(f"A source has {longest} tokens; the model takes at most max_positions={config.max_positions}.")
  width = decoding_lib.bucket_width(longest, config.max_positions)
  tokens = np.full((len(sources), width), pad_id, np.int32)
  types = np.zeros_like(tokens)
  for i, source in enumerate(sources):
    tokens[i, :len(source)] = source
    types[i, :len(source)] = token_types[i] if token_types is not None else 0
  segment_ids = (np.arange(width)[None] < np.array([len(s) for s in sources])[:, None]).astype(np.int32)
  rng = jax.random.key(getattr(decoding, "seed", 0))
  if isinstance(decoding, decoding_lib.SamplingConfig):
    decoding = dataclasses.replace(decoding, seed=0)  # an input, not a reason to recompile
  run = _generator(config, decoding, cls_id, sep_id, pad_id, sep_fraction)
  out, lengths = jax.device_get(run(decode_layout(params), tokens, segment_ids, types, rng))
  return [row[:n].tolist() for row, n in zip(out, lengths)]

