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
Cached decoding (`cached_hidden_states`) takes `transformer.DecodeParams` (cpm_jax.models.cpm.decode).
"""

from __future__ import annotations

import dataclasses

import gin
import jax

from cpm_jax import layers, objectives, partitioning, training, transformer
from cpm_jax.layers import Layout


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class CPMConfig(transformer.PipelinedConfig):
  """Sizes and options of a CPM-LM model (released sizes in gin_configs/models/)."""

  vocab_size: int = 30000
  num_layers: int = 12
  embed_dim: int = 768
  num_heads: int = 12
  mlp_dim: int | None = None  # None: 4 x embed_dim
  max_positions: int = 1024
  remat_policy: str = "elementwise"  # one of transformer.REMAT_POLICIES


def param_specs(config: CPMConfig) -> dict:
  std = config.init_stddev
  return {
      "embed": {
          "wte": layers.ParamSpec((config.vocab_size, config.embed_dim), ("vocab", "embed"), layers.normal(std)),
          "wpe": layers.ParamSpec((config.max_positions, config.embed_dim), ("positions", "embed"),
                                  layers.normal(std)),
      },
      "blocks": transformer.pre_ln_block_specs(config),
      "ln_f": layers.layer_norm_specs(config.embed_dim),
  }


# ---- forward -----------------------------------------------------------------------------------

def embed(params: dict, tokens: jax.Array, positions: jax.Array, config: CPMConfig,
          layout: Layout = Layout.TRAINING) -> jax.Array:
  x = (transformer.table_rows(params["embed"], "wte", tokens, layout)
       + transformer.gather_rows(params["embed"]["wpe"], positions, "positions"))
  return partitioning.constrain(x.astype(config.compute_dtype), ("batch", "length", "act_embed"))


def logits_from_hidden(params: dict, hidden: jax.Array, config: CPMConfig,
                       layout: Layout = Layout.TRAINING) -> jax.Array:
  """Tied output head: hidden @ wte^T, float32 logits [batch, length, vocab] (`layout`: how wte is stored)."""
  return transformer.tied_table_logits(params["embed"], "wte", hidden, config.compute_dtype, layout)


def hidden_states(params: dict, tokens: jax.Array, config: CPMConfig, *, positions=None, segment_ids=None,
                  dropout_rng=None) -> jax.Array:
  """Final-LayerNorm hidden states [batch, length, embed] of params in the training layout.

  tokens: int [batch, length]. positions: per-token positions (default 0..); they restart per document in packed
  rows. segment_ids: document id per token, 0 = padding (default all 1). dropout_rng: enables dropout.
  """
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids)
  mask = layers.attention_mask(segment_ids, segment_ids, positions, positions)
  x = transformer.pre_ln_stack(params["blocks"], embed(params, tokens, positions, config), config, mask, dropout_rng)
  return layers.layer_norm(x, params["ln_f"], config.layer_norm_eps)


def cached_hidden_states(params: transformer.DecodeParams, tokens: jax.Array, config: CPMConfig, cache: dict, *,
                         positions=None, segment_ids=None, span: int | None = None) -> tuple[jax.Array, dict]:
  """`hidden_states` of tokens appended at cache["index"] (a `transformer.empty_cache`), attending to everything
  cached before them; params in the decode layout. `span`: attention reads only the cache's first span slots (they
  must hold every filled one). Returns (hidden states, updated cache)."""
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids, cache["index"])
  tree = params.tree
  x = embed(tree, tokens, positions, config, params.layout)
  mask, kv_segments, kv_positions = transformer.cached_self_mask(cache, segment_ids, positions)
  x, cache = transformer.cached_pre_ln_stack(tree["blocks"], x, config, cache, mask[..., :span], kv_segments,
                                             kv_positions, params.layout, span)
  return layers.layer_norm(x, tree["ln_f"], config.layer_norm_eps), cache


def forward(params: dict, tokens: jax.Array, config: CPMConfig, **kwargs) -> jax.Array:
  """Logits [batch, length, vocab] (float32) of params in the training layout; kwargs as `hidden_states`."""
  return logits_from_hidden(params, hidden_states(params, tokens, config, **kwargs), config)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CPMLanguageModel:
  """CPM-LM as the training loop sees a model: param specs, a loss over batches, FLOPs per token.

  Batches are dicts of [batch, length] arrays: inputs, targets, weights, segment_ids, positions
  (the Grain LM pipeline's format).
  """

  config: CPMConfig = dataclasses.field(default_factory=CPMConfig)
  z_loss: float = 0.0
  loss_chunk_length: int | None = 64  # positions per chunk of the fused head + loss (objectives.tied_lm_loss)

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    hidden = hidden_states(params, batch["inputs"], self.config, positions=batch.get("positions"),
                           segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)
    return objectives.tied_lm_loss(hidden, params["embed"]["wte"], batch["targets"], batch["weights"],
                                   dtype=self.config.compute_dtype, z_loss=self.z_loss,
                                   chunk_length=self.loss_chunk_length)

  def with_config(self, config):
    """This model with another config (e.g. other execution fields)."""
    return dataclasses.replace(self, config=config)

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """LMData's batches: inputs, targets, weights, segment_ids, positions, each [batch, seq_len]."""
    del target_len
    tokens = ((seq_len,), "int32")
    return training.abstract_batch(batch_size, {"inputs": tokens, "targets": tokens, "weights": ((seq_len,), "float32"),
                                                "segment_ids": tokens, "positions": tokens})

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (blocks + tied logits head) + attention scores.

    Attention: QK^T and AV are 2 x 2 x seq_len x embed FLOPs per token per layer forward, x3 with
    the backward pass (PaLM's accounting: 12 x layers x embed x seq_len).
    """
    c = self.config
    per_layer = 4 * c.embed_dim * c.embed_dim + 2 * c.embed_dim * c.ffn_dim
    matmul_params = c.num_layers * per_layer + c.vocab_size * c.embed_dim
    return 6.0 * matmul_params + 12.0 * c.num_layers * c.embed_dim * seq_len
