"""CPM-XL: a CPM-shaped decoder with Transformer-XL's segment-level recurrence (Dai et al. 2019), as 文汇's GPT-XL
replaced GPT's transformer so that generation keeps its topic past the window.

The blocks are CPM's (pre-LN, tanh-GELU, tied head) without learned positions. A row is read segment by segment
(`segment_length` tokens); each layer attends to the current segment and to a memory of the `memory_length` layer
inputs before it (the previous segments' hidden states, with their gradient stopped), with Transformer-XL's relative
positions: score(i, j) = (q_i + u) . k_j + (q_i + v) . W_R R_{i-j}, R the sinusoid of the distance i - j and u, v
the two learned biases (per layer, like `untie_r`). The memory never crosses documents: keys of another segment id
(packed rows) are masked, and positions restart per document. Memory spans the segments of one row: training rows
of seq_len = k x segment_length carry it across their k segments (the packed pipeline keeps a document's tokens in
order within a row; a document longer than a row is cut, and each piece starts a fresh memory).

Params (blocks stacked over layers): embed/wte [vocab, embed]; blocks/ln_1, blocks/attn/{qkv_kernel, qkv_bias,
out_kernel, out_bias} as CPM, blocks/attn/rel_projection [L, embed, heads, head_dim] (W_R), content_bias (u) and
position_bias (v) [L, heads, head_dim]; blocks/ln_2, blocks/mlp; ln_f.
Cached generation (`cached_hidden_states`, cpm_jax.models.cpm.xl_decode) keeps each layer's keys and values of the
last memory_length + segment_length tokens and follows the same segments, so it equals the forward pass.
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import layers, objectives, partitioning, transformer
from cpm_jax.layers import Layout


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class CPMXLConfig(transformer.TransformerConfig):
  """Sizes and options of a CPM-XL model: CPM's (no max_positions: positions are relative) plus the segment and
  memory lengths."""

  vocab_size: int = 30000
  num_layers: int = 12
  embed_dim: int = 768
  num_heads: int = 12
  mlp_dim: int | None = None  # None: 4 x embed_dim
  segment_length: int = 256
  memory_length: int = 256  # 0: every segment on its own

  def __post_init__(self):
    super().__post_init__()
    if self.segment_length < 1 or self.memory_length < 0:
      raise ValueError(f"CPMXLConfig: segment_length={self.segment_length} (expected >= 1), memory_length="
                       f"{self.memory_length} (expected >= 0).")
    if self.attention_impl != "xla":
      raise ValueError(f"CPMXLConfig.attention_impl={self.attention_impl!r}; only 'xla' computes relative scores.")

  @property
  def attention_span(self) -> int:
    """Keys a query can see at most (memory + its segment): the distances the relative encoding covers."""
    return self.memory_length + self.segment_length


def param_specs(config: CPMXLConfig) -> dict:
  std = config.init_stddev
  out_std = std / math.sqrt(2 * config.num_layers)
  heads, head_dim = config.num_heads, config.head_dim
  attn = {
      **layers.attention_specs(config.embed_dim, heads, head_dim, std, out_std),
      "rel_projection": layers.ParamSpec((config.embed_dim, heads, head_dim), ("embed", "heads", "kv"),
                                         layers.normal(std)),
      "content_bias": layers.ParamSpec((heads, head_dim), ("heads", "kv"), layers.zeros),
      "position_bias": layers.ParamSpec((heads, head_dim), ("heads", "kv"), layers.zeros),
  }
  block = {"ln_1": layers.layer_norm_specs(config.embed_dim), "attn": attn,
           "ln_2": layers.layer_norm_specs(config.embed_dim),
           "mlp": layers.mlp_specs(config.embed_dim, config.ffn_dim, std, out_std)}
  return {
      "embed": {"wte": layers.ParamSpec((config.vocab_size, config.embed_dim), ("vocab", "embed"),
                                        layers.normal(std))},
      "blocks": layers.stacked(block, config.num_layers),
      "ln_f": layers.layer_norm_specs(config.embed_dim),
  }


# ---- relative attention ------------------------------------------------------------------------

def sinusoid(distances: int, dim: int) -> np.ndarray:
  """Transformer-XL's relative encoding R [distances, dim]: [sin(d / 10000^(2i/dim)), cos(...)] for d = 0.."""
  inverse = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  angles = np.arange(distances, dtype=np.float64)[:, None] * inverse[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def relative_table(attn: dict, config: CPMXLConfig, dtype) -> jax.Array:
  """W_R R for every distance 0 .. attention_span - 1: [span, heads, head_dim] (a constant of the params)."""
  encoding = jnp.asarray(sinusoid(config.attention_span, config.embed_dim), dtype)
  return jnp.einsum("de,ehk->dhk", encoding, attn["rel_projection"].astype(dtype))


def key_visibility(q_positions: jax.Array, q_segments: jax.Array, k_positions: jax.Array, k_segments: jax.Array,
                   first_visible: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(mask [b, 1, t, s], distances [b, t, s]) of queries over keys: same non-zero segment id, causal, and (if given)
  key position >= first_visible [b, t] (where a query's memory begins). Distances are clipped where masked."""
  distance = q_positions[:, :, None] - k_positions[:, None, :]
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0) & (distance >= 0)
  if first_visible is not None:
    mask &= k_positions[:, None, :] >= first_visible[:, :, None]
  return mask[:, None], jnp.maximum(distance, 0)


def relative_attention(q: jax.Array, k: jax.Array, v: jax.Array, table: jax.Array, content_bias: jax.Array,
                       position_bias: jax.Array, distance: jax.Array, mask: jax.Array) -> jax.Array:
  """Transformer-XL attention of queries [b, t, h, d] over keys / values [b, h, s, d] (heads first: the decode
  cache's [b * h, s, d] reshaped, no copy): content (q + u) . k plus position (q + v) . table[distance], / sqrt(d);
  table [span, h, d] (`relative_table`), distance [b, t, s]."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  content = jnp.einsum("bthd,bhsd->bhts", q + content_bias.astype(q.dtype), k, preferred_element_type=jnp.float32)
  by_distance = jnp.einsum("bthd,phd->bhtp", q + position_bias.astype(q.dtype), table,
                           preferred_element_type=jnp.float32)
  index = jnp.minimum(distance, table.shape[0] - 1)[:, None]
  position = jnp.take_along_axis(by_distance, jnp.broadcast_to(index, content.shape), axis=-1)
  weights = layers.masked_softmax((content + position) * scale, mask)
  return jnp.einsum("bhts,bhsd->bthd", weights.astype(v.dtype), v)


def _attention(x_norm: jax.Array, memory_norm: jax.Array, params: dict, config: CPMXLConfig, distance,
               mask) -> jax.Array:
  """Self-attention of the (normalised) segment over memory + segment, params in the training layout; returns the
  output projection [b, t, e]."""
  dtype = config.compute_dtype
  qkv = layers.project_qkv(jnp.concatenate([memory_norm, x_norm], axis=1), params, dtype)
  q, k, v = qkv[:, memory_norm.shape[1]:, 0], jnp.swapaxes(qkv[:, :, 1], 1, 2), jnp.swapaxes(qkv[:, :, 2], 1, 2)
  out = relative_attention(q, k, v, relative_table(params, config, dtype), params["content_bias"],
                           params["position_bias"], distance, mask)
  return layers.project_out(out, params, dtype)


def _feed_forward(x: jax.Array, attn: jax.Array, params: dict, config: CPMXLConfig, rngs, layout: Layout):
  """The rest of a pre-LN block after attention: residual, ln_2, MLP, residual (with dropout)."""
  rate = config.dropout_rate if rngs[0] is not None else 0.0
  x = x + layers.dropout(attn, rate, rngs[0])
  h = layers.layer_norm(x, params["ln_2"], config.layer_norm_eps)
  h = layers.mlp(h, params["mlp"], config.compute_dtype, approximate_gelu=True, dropout_rate=rate, rng=rngs[1],
                 layout=layout)
  return partitioning.constrain(x + layers.dropout(h, rate, rngs[2]), ("batch", "length", "act_embed"))


def embed(params: dict, tokens: jax.Array, config: CPMXLConfig, layout: Layout = Layout.TRAINING) -> jax.Array:
  x = transformer.table_rows(params["embed"], "wte", tokens, layout)
  return partitioning.constrain(x.astype(config.compute_dtype), ("batch", "length", "act_embed"))


def _segments(a: jax.Array, length: int) -> jax.Array:
  """[b, k * length, ...] -> [k, b, length, ...]."""
  return jnp.swapaxes(a.reshape(a.shape[0], -1, length, *a.shape[2:]), 0, 1)


def hidden_states(params: dict, tokens: jax.Array, config: CPMXLConfig, *, positions=None, segment_ids=None,
                  dropout_rng=None) -> jax.Array:
  """Final-LayerNorm hidden states [batch, length, embed], the row read segment by segment with memory.

  tokens int [batch, length] (padded here to a multiple of segment_length); positions restart per document and
  segment_ids (0 = padding) separate the documents of packed rows, as in CPM. A lax.scan over the segments carries
  each layer's memory (its last memory_length inputs, gradient stopped) with their segment ids and positions.
  """
  length, memory, segment = tokens.shape[1], config.memory_length, config.segment_length
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids)
  pad = -length % segment
  tokens, positions, segment_ids = (jnp.pad(a, ((0, 0), (0, pad))) for a in (tokens, positions, segment_ids))
  x = embed(params, tokens, config)
  if dropout_rng is not None:
    dropout_rng, embed_rng = jax.random.split(dropout_rng)
    x = layers.dropout(x, config.dropout_rate, embed_rng)
  batch, dim = x.shape[0], x.shape[2]
  start = (jnp.zeros((config.num_layers, batch, memory, dim), x.dtype), jnp.zeros((batch, memory), jnp.int32),
           jnp.zeros((batch, memory), jnp.int32))

  def read_segment(carry, inputs):
    mem, mem_segments, mem_positions = carry
    xs, segs, pos, index = inputs
    k_segments = jnp.concatenate([mem_segments, segs], axis=1)
    k_positions = jnp.concatenate([mem_positions, pos], axis=1)
    mask, distance = key_visibility(pos, segs, k_positions, k_segments)  # all of memory + segment
    segment_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)

    def layer(x, layer_inputs):
      block, layer_memory, layer_index = layer_inputs
      rng = None if segment_rng is None else jax.random.fold_in(segment_rng, layer_index)
      rngs = jax.random.split(rng, 3) if rng is not None else (None,) * 3
      eps = config.layer_norm_eps
      h = layers.layer_norm(x, block["ln_1"], eps)
      h_memory = layers.layer_norm(jax.lax.stop_gradient(layer_memory), block["ln_1"], eps)
      attn = _attention(h, h_memory, block["attn"], config, distance, mask)
      return _feed_forward(x, attn, block, config, rngs, Layout.TRAINING), x

    out, layer_inputs = transformer.run_layers(layer, xs, (params["blocks"], mem, jnp.arange(config.num_layers)),
                                               config.num_layers, remat_policy=config.remat_policy,
                                               scan=config.scan_layers)
    # The new memory: the last memory_length of (memory, this segment), per layer and for the ids and positions.
    new_mem = jnp.concatenate([mem, layer_inputs], axis=2)[:, :, segment:]
    return (new_mem, k_segments[:, segment:], k_positions[:, segment:]), out

  inputs = (_segments(x, segment), _segments(segment_ids, segment), _segments(positions, segment),
            jnp.arange(x.shape[1] // segment))
  _, out = jax.lax.scan(read_segment, start, inputs)
  out = jnp.swapaxes(out, 0, 1).reshape(batch, -1, dim)[:, :length]
  return layers.layer_norm(out, params["ln_f"], config.layer_norm_eps)


def logits_from_hidden(params: dict, hidden: jax.Array, config: CPMXLConfig,
                       layout: Layout = Layout.TRAINING) -> jax.Array:
  return transformer.tied_table_logits(params["embed"], "wte", hidden, config.compute_dtype, layout)


def forward(params: dict, tokens: jax.Array, config: CPMXLConfig, **kwargs) -> jax.Array:
  """Logits [batch, length, vocab] (float32); kwargs as `hidden_states`."""
  return logits_from_hidden(params, hidden_states(params, tokens, config, **kwargs), config)


# ---- cached generation -------------------------------------------------------------------------

def cached_hidden_states(params: transformer.DecodeParams, tokens: jax.Array, config: CPMXLConfig, cache: dict, *,
                         positions: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, dict]:
  """Hidden states of tokens [b, t] at document positions `positions` (segment_ids 0: padding, not written), over
  a cache (cpm_jax.models.cpm.xl_decode.init_cache) holding each layer's keys and values of the last attention_span
  positions, slot = position % attention_span. A query at position p sees the keys from the start of its segment
  (p - p % segment_length) back memory_length positions, as the forward pass does. The tokens of one call must lie
  in one segment (one token per step; prefill feeds segment by segment). Returns (hidden states, updated cache)."""
  tree, span = params.tree, config.attention_span
  batch, count = tokens.shape
  slots = jnp.where(segment_ids > 0, positions % span, span)  # padding goes out of range: dropped
  rows = jnp.arange(batch)[:, None]
  k_positions = cache["positions"].at[rows, slots].set(positions, mode="drop")
  k_segments = cache["segment_ids"].at[rows, slots].set(segment_ids, mode="drop")
  first_visible = positions - positions % config.segment_length - config.memory_length
  mask, distance = key_visibility(positions, segment_ids, k_positions, k_segments, first_visible)
  heads, dtype = config.num_heads, config.compute_dtype
  head_rows = (jnp.arange(batch)[:, None] * heads + jnp.arange(heads)[None, :]).reshape(-1, 1)
  head_slots = jnp.repeat(slots, heads, axis=0)
  x = embed(tree, tokens, config, params.layout)

  def body(x, layer_inputs):
    block, keys, values = layer_inputs
    attn = block["attn"]
    h = layers.layer_norm(x, block["ln_1"], config.layer_norm_eps)
    qkv = layers.project_qkv(h, attn, dtype, params.layout)
    new = [layers.cache_layout(qkv[:, :, i]).astype(keys.dtype) for i in (1, 2)]
    keys, values = (c.at[head_rows, head_slots].set(n, mode="drop") for c, n in zip((keys, values), new))
    unmerge = lambda c: c.reshape(batch, heads, span, -1).astype(dtype)  # noqa: E731
    out = relative_attention(qkv[:, :, 0], unmerge(keys), unmerge(values), attn["rel_table"],
                             attn["content_bias"], attn["position_bias"], distance, mask)
    out = _feed_forward(x, layers.project_out(out, attn, dtype, params.layout), block, config, (None,) * 3,
                        params.layout)
    return out, (keys, values)

  x, new_kv = transformer.run_layers(body, x, tuple(zip(tree["blocks"], cache["k"], cache["v"])), config.num_layers,
                                     per_layer=True)
  k, v = zip(*new_kv)
  x = layers.layer_norm(x, tree["ln_f"], config.layer_norm_eps)
  return x, {**cache, "k": k, "v": v, "positions": k_positions, "segment_ids": k_segments}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CPMXLLanguageModel:
  """CPM-XL as the training loop sees a model; batches as CPMLanguageModel's (cpm.LMData), seq_len a multiple of
  segment_length so each row is read as whole segments."""

  config: CPMXLConfig = dataclasses.field(default_factory=CPMXLConfig)
  z_loss: float = 0.0

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    if batch["inputs"].shape[1] % self.config.segment_length:
      raise ValueError(f"Batch rows of {batch['inputs'].shape[1]} tokens are not whole segments of "
                       f"CPMXLConfig.segment_length={self.config.segment_length}; set LMData.seq_len to a multiple.")
    logits = forward(params, batch["inputs"], self.config, positions=batch.get("positions"),
                     segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)
    return objectives.lm_loss(logits, batch["targets"], batch["weights"], self.z_loss)

  def flops_per_token(self, seq_len: int) -> float:
    """6 x matmul params (blocks, tied head) + attention over memory + segment (QK, relative scores, AV)."""
    del seq_len
    c = self.config
    per_layer = 4 * c.embed_dim * c.embed_dim + 2 * c.embed_dim * c.ffn_dim
    matmul_params = c.num_layers * per_layer + c.vocab_size * c.embed_dim
    return 6.0 * matmul_params + 18.0 * c.num_layers * c.embed_dim * c.attention_span

