"""PLUG: a StructBERT encoder + PALM decoder (and plain post-LN BERT), as pure functions of a params pytree.

Encoder: word + position + token-type embeddings -> LayerNorm; blocks pre-LN (PLUG: LN -> attention ->
residual; LN -> FFN -> residual; a final LN) or post-LN (BERT / StructBERT: attention -> residual -> LN;
FFN -> residual -> LN) by `encoder_pre_ln`. Decoder (PALM): the same embedding module (token type 0),
pre-LN blocks of causal self-attention, cross-attention over the final encoder output and FFN, a final LN,
logits tied to the word embedding without bias. erf-GELU everywhere.

Params layout (block params stacked over layers on a leading `layers` axis; attention as in CPM; cached
decoding takes the decoder blocks per layer, see cpm_jax.models.plug.decode):
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

import gin
import jax
import jax.numpy as jnp

from cpm_jax import layers, objectives, partitioning, pipeline_parallel, training, transformer
from cpm_jax.layers import Layout
from cpm_jax.models.plug import objectives as plug_objectives

ACT = ("batch", "length", "act_embed")


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class PlugConfig(transformer.PipelinedConfig):
  """Sizes and options of a PLUG / StructBERT / PALM model (defaults: PLUG 27B as released)."""

  vocab_size: int = 21504  # BERT-Chinese 21128 padded to a multiple of 8 x 128
  num_encoder_layers: int = 24
  num_decoder_layers: int = 6  # 0: encoder only (StructBERT, BERT)
  embed_dim: int = 8192
  num_heads: int = 128
  mlp_dim: int | None = 32768  # None: 4 x embed_dim
  max_positions: int = 2048
  type_vocab_size: int = 3
  encoder_pre_ln: bool = True  # False: post-LN BERT / StructBERT
  num_relations: int = 3  # sentence-relation head classes (0: no head)
  num_classes: int = 0  # classification head classes (0: no head)
  init_stddev: float = 0.00707

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
  mlp = layers.mlp_specs(e, config.ffn_dim, std, std)
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


def _blocks_axes(config: PlugConfig, stack: str) -> dict:
  """Logical axes of the stacked blocks of `stack` ("encoder" or "decoder")."""
  return layers.logical_axes(param_specs(config)[stack]["blocks"])


# ---- shared pieces -----------------------------------------------------------------------------

def _split(rng, n):
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def _rate(config: PlugConfig, rng) -> float:
  return config.dropout_rate if rng is not None else 0.0


def embed(params: dict, tokens: jax.Array, token_types: jax.Array, positions: jax.Array, config: PlugConfig,
          rng: jax.Array | None = None) -> jax.Array:
  """word + position + token type -> LayerNorm -> dropout, [batch, length, embed]."""
  e = params["embed"]
  x = (transformer.gather_rows(e["wte"], tokens, "vocab") + transformer.gather_rows(e["wpe"], positions, "positions")
       + transformer.gather_rows(e["wtt"], token_types, "token_types")).astype(config.compute_dtype)
  x = layers.layer_norm(x, e["ln"], config.layer_norm_eps)
  return partitioning.constrain(layers.dropout(x, _rate(config, rng), rng), ACT)


def _ffn(x, params, config: PlugConfig, rngs, layout: Layout = Layout.TRAINING):
  h = layers.mlp(x, params, config.compute_dtype, approximate_gelu=False, dropout_rate=_rate(config, rngs[0]),
                 rng=rngs[0], layout=layout)
  return layers.dropout(h, _rate(config, rngs[1]), rngs[1])


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


def block_mask(block_ids: jax.Array) -> jax.Array:
  """[batch, 1, q, kv]: a token of block k > 0 sees block k and block 0 only; block 0 (shared) sees every token
  (UniMC: each option sees itself and the shared text, never another option)."""
  q, kv = block_ids[:, :, None], block_ids[:, None, :]
  return ((q == 0) | (kv == 0) | (q == kv))[:, None]


def encode(params: dict, tokens: jax.Array, config: PlugConfig, *, token_types=None, positions=None,
           segment_ids=None, block_ids=None, dropout_rng=None) -> jax.Array:
  """Final encoder hidden states [batch, length, embed].

  token_types default 0; positions default 0.. (restart per document in packed rows); segment_ids:
  document id per token, 0 = padding (default all 1). Attention is bidirectional within a segment, and with
  block_ids (see block_mask) also restricted between blocks.
  """
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids)
  token_types = jnp.zeros_like(tokens) if token_types is None else token_types
  rngs = _split(dropout_rng, 2)
  x = embed(params, tokens, token_types, positions, config, rngs[0])
  mask = layers.attention_mask(segment_ids, segment_ids, None, None)
  if block_ids is not None:
    mask &= block_mask(block_ids)

  def layer(x, mask, layer_params, rng):
    return _encoder_block(x, layer_params, config, mask, rng)

  x = pipeline_parallel.run_stack(layer, x, mask, params["encoder"]["blocks"], _blocks_axes(config, "encoder"), config,
                                  rngs[1], "PLUG encoder")
  if config.encoder_pre_ln:
    x = layers.layer_norm(x, params["encoder"]["ln_f"], config.layer_norm_eps)
  return x


# ---- heads -------------------------------------------------------------------------------------

def _mlm_transform(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """The MLM head's dense -> GELU -> LN, [batch, length, embed]."""
  dtype, p = config.compute_dtype, params["mlm"]
  h = jnp.einsum("bte,ef->btf", hidden.astype(dtype), p["dense_kernel"].astype(dtype)) + p["dense_bias"].astype(dtype)
  return layers.layer_norm(layers.gelu(h, approximate=False), p["ln"], config.layer_norm_eps)


def mlm_logits(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """MLM head: dense -> GELU -> LN -> tied word embedding + bias; float32 [batch, length, vocab]."""
  return decoder_logits(params, _mlm_transform(params, hidden, config), config) + params["mlm"]["bias"].astype(
      jnp.float32)


def mlm_scores(params: dict, states: jax.Array, token_ids: jax.Array, config: PlugConfig) -> jax.Array:
  """The MLM head's logit of token_ids[b, c] from states[b, c] (e.g. PET's label words at the [MASK], UniMC's 是 at
  each option's [MASK]) without the full-vocab product: float32 [batch, classes]."""
  h = _mlm_transform(params, states, config)
  words = transformer.gather_rows(params["embed"]["wte"], token_ids, "vocab").astype(config.compute_dtype)
  scores = jnp.einsum("bce,bce->bc", h, words, preferred_element_type=jnp.float32)
  return scores + params["mlm"]["bias"][token_ids].astype(jnp.float32)


def at_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden [batch, length, embed] at positions [batch, k] -> [batch, k, embed] (a one-hot product: no gather)."""
  return jnp.einsum("bkl,ble->bke", jax.nn.one_hot(positions, hidden.shape[1], dtype=hidden.dtype), hidden)


def sentence_embedding(hidden: jax.Array, text_mask: jax.Array) -> jax.Array:
  """The mean final hidden state over the text span (text_mask [batch, length] > 0), float32 [batch, embed]."""
  mask = text_mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def _dense(x, params, dtype):
  return jnp.einsum("be,ec->bc", x.astype(dtype), params["kernel"].astype(dtype)) + params["bias"].astype(dtype)


def pooled(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """BERT pooler: tanh(dense(first token's state)), [batch, embed]."""
  return jnp.tanh(_dense(hidden[:, 0], params["pooler"], config.compute_dtype))


def relation_logits(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """Sentence-relation logits [batch, num_relations] (float32) from the pooled [CLS] state."""
  return _dense(pooled(params, hidden, config), params["relation"], config.compute_dtype).astype(jnp.float32)


def classify_pooled(params: dict, pooled_state: jax.Array, config: PlugConfig,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
  """The classifier on a pooled state [batch, embed]: dropout -> linear; float32 [batch, num_classes]."""
  x = layers.dropout(pooled_state, _rate(config, dropout_rng), dropout_rng)
  return _dense(x, params["classifier"], config.compute_dtype).astype(jnp.float32)


def classification_logits(params: dict, hidden: jax.Array, config: PlugConfig,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """Classifier on the pooled [CLS] state -> dropout -> linear; float32 [batch, num_classes]."""
  return classify_pooled(params, pooled(params, hidden, config), config, dropout_rng)


# ---- decoder -----------------------------------------------------------------------------------

def _decoder_block(x, params, config: PlugConfig, self_mask, cross_mask, rng, encoder_hidden, layer_cache,
                   cache_index, layout: Layout = Layout.TRAINING):
  """One pre-LN decoder block. Without `layer_cache` the cross-attention K/V are projected from encoder_hidden
  [b, s, e]; with it (this layer's (k, v, cross_k, cross_v) in `layers.cache_layout`, params in Layout.DECODE) the
  new self-attention K/V are written at cache_index and the cached cross K/V are read. Returns (x, updated (k, v)
  or None)."""
  dtype, eps = config.compute_dtype, config.layer_norm_eps
  rngs = _split(rng, 4)
  kv = None if layer_cache is None else layer_cache[:2]
  h = layers.layer_norm(x, params["ln_1"], eps)
  out, kv = layers.self_attention(h, params["self_attn"], self_mask, dtype, config.attention_impl, layout, kv,
                                  cache_index)
  x = x + layers.dropout(out, _rate(config, rngs[0]), rngs[0])

  p = params["cross_attn"]
  h = layers.layer_norm(x, params["ln_2"], eps)
  q = layers.project_q(h, p, dtype, layout)
  if layer_cache is None:
    memory = layers.project_qkv(encoder_hidden, p, dtype, layout)
    out = layers.dot_product_attention(q, memory[:, :, 0], memory[:, :, 1], cross_mask, config.attention_impl)
  else:
    keys, values = (a.astype(dtype) for a in layer_cache[2:])
    out = layers.cached_attention(q, keys, values, cross_mask, config.attention_impl)
  x = x + layers.dropout(layers.project_out(out, p, dtype, layout), _rate(config, rngs[1]), rngs[1])

  x = x + _ffn(layers.layer_norm(x, params["ln_3"], eps), params["mlp"], config, rngs[2:], layout)
  return partitioning.constrain(x, ACT), kv


def _check_decoder(config: PlugConfig) -> None:
  if config.num_decoder_layers == 0:
    raise ValueError("PlugConfig.num_decoder_layers is 0: this model has no decoder.")


def decode(params: dict, tokens: jax.Array, config: PlugConfig, *, encoder_hidden: jax.Array,
           encoder_segment_ids=None, positions=None, segment_ids=None, dropout_rng=None) -> jax.Array:
  """Decoder hidden states [batch, length, embed] (after the final LN) of params in the training layout.

  Decoder segment k attends encoder segment k of `encoder_hidden` (encoder_segment_ids default all 1), causally
  within its own segment.
  """
  _check_decoder(config)
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids)
  rngs = _split(dropout_rng, 2)
  x = embed(params, tokens, jnp.zeros_like(tokens), positions, config, rngs[0])
  if encoder_segment_ids is None:
    encoder_segment_ids = jnp.ones(encoder_hidden.shape[:2], jnp.int32)
  self_mask = layers.attention_mask(segment_ids, segment_ids, positions, positions)
  cross_mask = layers.attention_mask(segment_ids, encoder_segment_ids, None, None)

  def layer(x, side, layer_params, rng):
    self_mask, cross_mask, encoder_hidden = side
    return _decoder_block(x, layer_params, config, self_mask, cross_mask, rng, encoder_hidden, None, None)[0]

  x = pipeline_parallel.run_stack(layer, x, (self_mask, cross_mask, encoder_hidden), params["decoder"]["blocks"],
                                  _blocks_axes(config, "decoder"), config, rngs[1], "PLUG decoder")
  return layers.layer_norm(x, params["decoder"]["ln_f"], config.layer_norm_eps)


def cached_decode(params: transformer.DecodeParams, tokens: jax.Array, config: PlugConfig, cache: dict, *,
                  positions=None, segment_ids=None) -> tuple[jax.Array, dict]:
  """`decode` of tokens appended at cache["index"] of a cache from cpm_jax.models.plug.decode.init_cache (holding
  the cross-attention K/V over the encoder output); params in the decode layout. Returns (hidden, cache)."""
  _check_decoder(config)
  tree = params.tree
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids, cache["index"])
  x = embed(tree, tokens, jnp.zeros_like(tokens), positions, config)
  self_mask, kv_segments, kv_positions = transformer.cached_self_mask(cache, segment_ids, positions)
  cross_mask = layers.attention_mask(segment_ids, cache["encoder_segment_ids"], None, None)

  def body(x, layer):
    layer_params, layer_cache = layer
    return _decoder_block(x, layer_params, config, self_mask, cross_mask, None, None, layer_cache, cache["index"],
                          params.layout)

  layer_caches = tuple(zip(cache["k"], cache["v"], cache["cross_k"], cache["cross_v"]))
  x, new_kv = transformer.run_layers(body, x, tuple(zip(tree["decoder"]["blocks"], layer_caches)),
                                     config.num_decoder_layers, per_layer=True)
  x = layers.layer_norm(x, tree["decoder"]["ln_f"], config.layer_norm_eps)
  return x, transformer.updated_cache(cache, new_kv, kv_segments, kv_positions, tokens.shape[1])


def decoder_logits(params: dict, hidden: jax.Array, config: PlugConfig) -> jax.Array:
  """Tied decoder output: hidden @ wte^T (no bias), float32 [batch, length, vocab]."""
  return transformer.tied_logits(params["embed"]["wte"], hidden, config.compute_dtype)


# ---- models as the training loop sees them -----------------------------------------------------

def _encoder_inputs(params: dict, batch: dict, config: PlugConfig, dropout_rng) -> jax.Array:
  return encode(params, batch["inputs"], config, token_types=batch.get("token_types"),
                positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                block_ids=batch.get("block_ids"), dropout_rng=dropout_rng)


def _encoder_batch(seq_len: int) -> dict:
  """The encoder fields of PLUG's batches (cpm_jax.models.plug.data), per example."""
  tokens = ((seq_len,), "int32")
  return {"inputs": tokens, "token_types": tokens, "segment_ids": tokens, "positions": tokens}


def _masked_lm_batch(seq_len: int) -> dict:
  return {"targets": ((seq_len,), "int32"), "weights": ((seq_len,), "float32")}


def _matmul_params(config: PlugConfig) -> tuple[int, int]:
  """(encoder, decoder) matmul parameters per token, output heads included."""
  e, f = config.embed_dim, config.ffn_dim
  encoder = config.num_encoder_layers * (4 * e * e + 2 * e * f) + e * e + config.vocab_size * e
  decoder = config.num_decoder_layers * (8 * e * e + 2 * e * f) + config.vocab_size * e
  return encoder, decoder


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StructBertModel:
  """Stage 1: the encoder trained on MLM (with word-structural targets) + sentence relation.

  Batches from cpm_jax.models.plug.data.StructBertData.
  """

  config: PlugConfig = dataclasses.field(default_factory=PlugConfig)

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    rngs = _split(dropout_rng, 1)
    hidden = _encoder_inputs(params, batch, self.config, rngs[0])
    return plug_objectives.structbert_loss(mlm_logits(params, hidden, self.config), batch["targets"], batch["weights"],
                                      relation_logits(params, hidden, self.config), batch["relation_labels"],
                                      batch["relation_weights"])

  def with_config(self, config):
    """This model with another config (e.g. other execution fields)."""
    return dataclasses.replace(self, config=config)

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """StructBertData's batches."""
    del target_len
    return training.abstract_batch(batch_size, {**_encoder_batch(seq_len), **_masked_lm_batch(seq_len),
                                                "relation_labels": ((), "int32"), "relation_weights": ((), "float32")})

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
    decoded = decode(params, batch["decoder_inputs"], self.config, encoder_hidden=hidden,
                        encoder_segment_ids=batch.get("segment_ids"), positions=batch.get("decoder_positions"),
                        segment_ids=batch.get("decoder_segment_ids"), dropout_rng=rngs[1])
    return plug_objectives.palm_loss(mlm_logits(params, hidden, self.config), batch["targets"], batch["weights"],
                                decoder_logits(params, decoded, self.config), batch["decoder_targets"],
                                batch["decoder_weights"])

  def with_config(self, config):
    """This model with another config (e.g. other execution fields)."""
    return dataclasses.replace(self, config=config)

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """PalmData / Seq2SeqData's batches: the encoder's seq_len positions and the decoder's target_len (default
    seq_len / 4, PALM's 80/20 split)."""
    target = ((target_len or max(seq_len // 4, 1),), "int32")
    return training.abstract_batch(batch_size, {
        **_encoder_batch(seq_len), **_masked_lm_batch(seq_len), "decoder_inputs": target, "decoder_targets": target,
        "decoder_weights": (target[0], "float32"), "decoder_segment_ids": target, "decoder_positions": target})

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

  def with_config(self, config):
    """This model with another config (e.g. other execution fields)."""
    return dataclasses.replace(self, config=config)

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """ClassificationData's batches."""
    del target_len
    return training.abstract_batch(batch_size, {**_encoder_batch(seq_len), "labels": ((), "int32"),
                                                "label_weights": ((), "float32")})

  def flops_per_token(self, seq_len: int) -> float:
    return _encoder_flops_per_token(self.config, seq_len)


def _encoder_flops_per_token(config: PlugConfig, seq_len: int) -> float:
  """6 x encoder block matmul params + attention, per token (the classifiers' heads are negligible)."""
  c = config
  return 6.0 * c.num_encoder_layers * (4 * c.embed_dim ** 2 + 2 * c.embed_dim * c.ffn_dim) + \
      12.0 * c.num_encoder_layers * c.embed_dim * seq_len


FEW_SHOT_HEADS = ("cls", "mlm")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FewShotModel:
  """Few-shot NLU fine-tuning with the techniques of the FewCLUE winners, each a switch (off by default).

  Batches from cpm_jax.models.plug.fewshot_inputs.FewShotData. head "cls": the pooled [CLS] classifier
  (config.num_classes > 0); head "mlm": class c is the MLM head's logit of score_ids[c] at score_positions[c] (PET's
  label words at the [MASK], UniMC's 是 at each option's [MASK]), cross-entropy over the classes. Per example:
    label_weight x cross-entropy
    + mlm_weight x mean MLM cross-entropy at mlm_positions (UniMC: 是 / 非 at the options, masked text tokens)
    + contrastive_weight x supervised contrastive loss of the sentence embeddings (temperature by config)
    + distillation_weight x teacher_weight x T^2 KL(teacher_T || model_T)   (temperature T by config)
  mixup_alpha > 0: the classifier's input (pooled state / the [MASK] states) of each labelled example is mixed with a
  random partner's, lambda ~ Beta(alpha, alpha) folded to >= 1/2, the cross-entropy mixed alike. rdrop_weight > 0:
  two dropout passes; their mean plus rdrop_weight x symmetric KL between their class distributions (GTS: 5).
  Mixup and both R-Drop passes need the train step's dropout rng; without it (evaluation) they are off.
  """

  config: PlugConfig = dataclasses.field(default_factory=PlugConfig)
  head: str = "cls"
  mlm_weight: float = 0.0
  rdrop_weight: float = 0.0
  mixup_alpha: float = 0.0
  contrastive_weight: float = 0.0
  contrastive_temperature: float = 0.1
  distillation_weight: float = 0.0
  distillation_temperature: float = 1.0

  def __post_init__(self):
    if self.head not in FEW_SHOT_HEADS:
      raise ValueError(f"FewShotModel.head={self.head!r}; expected one of {FEW_SHOT_HEADS}.")
    if self.head == "cls" and not self.config.num_classes:
      raise ValueError("FewShotModel.head='cls' needs PlugConfig.num_classes > 0.")

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def with_config(self, config):
    """This model with another config (model_fit: e.g. the vocab size from the data)."""
    return dataclasses.replace(self, config=config)

  def outputs(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None,
              mixup: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(class logits [batch, classes], sentence embeddings [batch, embed], final hidden states); `mixup` (partner,
    lambda) mixes the classifier inputs."""
    rngs = _split(dropout_rng, 2)
    hidden = _encoder_inputs(params, batch, self.config, rngs[0])

    def mixed(x):
      if mixup is None:
        return x
      partner, lam = mixup
      lam = lam.reshape(lam.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
      return lam * x + (1 - lam) * x[partner]

    if self.head == "cls":
      logits = classify_pooled(params, mixed(pooled(params, hidden, self.config)), self.config, rngs[1])
    else:
      states = mixed(at_positions(hidden, batch["score_positions"]))
      logits = mlm_scores(params, states, batch["score_ids"], self.config)
    return logits, sentence_embedding(hidden, batch["text_mask"]), hidden

  def _mlm_loss(self, params: dict, hidden: jax.Array, batch: dict) -> jax.Array:
    logits = mlm_logits(params, at_positions(hidden, batch["mlm_positions"]), self.config)
    per_token = objectives.cross_entropy(logits, batch["mlm_targets"])
    weights = batch["mlm_weights"].astype(jnp.float32)
    return (per_token * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1.0)

  def _pass(self, params: dict, batch: dict, rng, mixup) -> tuple[jax.Array, jax.Array]:
    """(per-example loss terms [batch], class logits) of one forward pass."""
    logits, embedding, hidden = self.outputs(params, batch, rng, mixup)
    labels, weights = batch["labels"], batch["label_weights"].astype(jnp.float32)
    cross_entropy = objectives.cross_entropy(logits, labels)
    if mixup is not None:
      partner, lam = mixup
      cross_entropy = lam * cross_entropy + (1 - lam) * objectives.cross_entropy(logits, labels[partner])
    terms = weights * cross_entropy
    if self.mlm_weight:
      terms += self.mlm_weight * self._mlm_loss(params, hidden, batch)
    if self.contrastive_weight:
      terms += self.contrastive_weight * objectives.supervised_contrastive(embedding, labels, weights,
                                                                           self.contrastive_temperature)
    if self.distillation_weight:
      terms += self.distillation_weight * batch["teacher_weights"] * objectives.distillation_kl(
          logits, batch["teacher_logits"], self.distillation_temperature)
    return terms, logits

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    rngs = _split(dropout_rng, 3)
    labelled = batch["label_weights"].astype(jnp.float32)
    weights = jnp.maximum(labelled, batch["teacher_weights"].astype(jnp.float32))
    mixup = None
    if self.mixup_alpha and dropout_rng is not None:
      mixup = objectives.mixup_pairs(rngs[2], labelled, self.mixup_alpha)
    terms, logits = self._pass(params, batch, rngs[0], mixup)
    if self.rdrop_weight:
      second_terms, second_logits = self._pass(params, batch, rngs[1], mixup)
      terms = 0.5 * (terms + second_terms) + self.rdrop_weight * weights * objectives.symmetric_kl(
          logits, second_logits)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32) * labelled
    sums = {"loss_sum": terms.sum(), "z_loss_sum": jnp.zeros((), jnp.float32), "weight_sum": weights.sum(),
            "correct_sum": correct.sum()}
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

  def flops_per_token(self, seq_len: int) -> float:
    """The encoder's, twice with R-Drop."""
    return (2.0 if self.rdrop_weight else 1.0) * _encoder_flops_per_token(self.config, seq_len)

