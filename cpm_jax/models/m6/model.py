"""M6 (MultiModality-to-MultiModality Multitask Mega-transformer; 悟道·文汇): one transformer over
[image patches; text tokens], as a pure function of a params pytree.

The image is cut into a grid of patches and each patch becomes one vector (patches.py: linear, conv stem, or
precomputed features), plus a row and a column embedding (2-D patch positions) and the image modality embedding.
Text tokens are word + 1-D position + text modality embeddings. Pre-LN blocks over the whole sequence with a
prefix-LM mask set per example (masks.py: image-to-text, image+text-to-text, text prefix LM, plain causal LM in
one batch); final LayerNorm; the text output head is tied to the word embedding. Loss only on text targets.

Params layout (block params stacked over layers on a leading `layers` axis, as CPM's):
  text/wte [vocab, embed], text/wpe [text positions, embed]
  image/encoder/...   (patches.encoder_specs), image/row [grid, embed], image/col [grid, embed]
  modality [2, embed]  (0 image, 1 text)
  blocks/{ln_1, attn, ln_2, mlp}/...  [L, ...], ln_f/{scale,bias}
Cached decoding (`cached_hidden_states`) takes `transformer.DecodeParams` (cpm_jax.models.m6.decode).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from cpm_jax import layers, objectives, partitioning, training, transformer
from cpm_jax.models.m6 import masks, patches

IMAGE, TEXT = 0, 1  # rows of the modality embedding


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class M6Config(transformer.PipelinedConfig):
  """Sizes and options of an M6 model (gin_configs/models/m6_*.gin)."""

  vocab_size: int = 21128
  num_layers: int = 24
  embed_dim: int = 1024
  num_heads: int = 16
  mlp_dim: int | None = None  # None: 4 x embed_dim
  max_text_positions: int = 512
  image_size: int = 224
  patch_size: int = 32
  channels: int = 3
  patch_encoder: str = "linear"  # one of patches.ENCODERS
  feature_dim: int = 2048  # width of precomputed patch features (patch_encoder "features")
  stem_width: int = 64  # channels of the conv stem (patch_encoder "conv")

  def __post_init__(self):
    super().__post_init__()
    if self.patch_encoder not in patches.ENCODERS:
      raise ValueError(f"M6Config.patch_encoder={self.patch_encoder!r}; expected one of {list(patches.ENCODERS)}.")
    if self.patch_size < 1 or self.image_size % self.patch_size:
      raise ValueError(f"M6Config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.channels

  @property
  def image_input(self) -> str:
    """The batch key of the image side: raw images [batch, size, size, channels], or precomputed patch features
    [batch, patches, feature_dim] for patch_encoder "features"."""
    return "patch_features" if self.patch_encoder == "features" else "images"

  def image_input_shape(self, batch: int) -> tuple[int, ...]:
    if self.patch_encoder == "features":
      return (batch, self.num_patches, self.feature_dim)
    return (batch, self.image_size, self.image_size, self.channels)


def param_specs(config: M6Config) -> dict:
  std = config.init_stddev
  embed = config.embed_dim
  table = lambda rows, axis: layers.ParamSpec((rows, embed), (axis, "embed"), layers.normal(std))  # noqa: E731
  return {
      "text": {"wte": table(config.vocab_size, "vocab"), "wpe": table(config.max_text_positions, "positions")},
      "image": {
          "encoder": patches.encoder_specs(config.patch_encoder, patch_dim=config.patch_dim,
                                           feature_dim=config.feature_dim, stem_width=config.stem_width,
                                           channels=config.channels, embed=embed, stddev=std),
          "row": table(config.grid_size, "positions"),
          "col": table(config.grid_size, "positions"),
      },
      "modality": table(2, "token_types"),
      "blocks": transformer.pre_ln_block_specs(config),
      "ln_f": layers.layer_norm_specs(embed),
  }


# ---- embeddings --------------------------------------------------------------------------------

def embed_image(params: dict, image_inputs: jax.Array, config: M6Config) -> jax.Array:
  """Patch vectors + row + column + image modality embeddings [batch, patches, embed] of images (or patch
  features, as config.image_input says)."""
  dtype = config.compute_dtype
  image = params["image"]
  x = patches.encode(image_inputs, image["encoder"], config.patch_encoder, patch_size=config.patch_size,
                     channels=config.channels, dtype=dtype)
  rows, cols = patches.grid_positions(config.grid_size)
  x = x + (image["row"][rows] + image["col"][cols] + params["modality"][IMAGE]).astype(dtype)
  return partitioning.constrain(x, ("batch", "length", "act_embed"))


def embed_text(params: dict, tokens: jax.Array, positions: jax.Array, config: M6Config) -> jax.Array:
  x = (transformer.gather_rows(params["text"]["wte"], tokens, "vocab")
       + transformer.gather_rows(params["text"]["wpe"], positions, "positions") + params["modality"][TEXT])
  return partitioning.constrain(x.astype(config.compute_dtype), ("batch", "length", "act_embed"))


def logits_from_hidden(params: dict, hidden: jax.Array, config: M6Config) -> jax.Array:
  """Tied text head: hidden @ wte^T, float32 logits [batch, length, vocab]."""
  return transformer.tied_logits(params["text"]["wte"], hidden, config.compute_dtype)


# ---- forward -----------------------------------------------------------------------------------

def hidden_states(params: dict, image_inputs: jax.Array, tokens: jax.Array, config: M6Config, *,
                  has_image: jax.Array, prefix_lengths: jax.Array, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Final-LayerNorm hidden states [batch, patches + text, embed] of params in the training layout.

  image_inputs: images [batch, size, size, channels] or patch features (config.image_input); has_image [batch]:
  0 leaves the patch slots empty. tokens [batch, text]; segment_ids: 1 for text tokens, 0 for padding (default
  all 1); positions: text positions (default 0..). prefix_lengths [batch]: text tokens in the bidirectional
  prefix (masks.py). dropout_rng: enables dropout.
  """
  positions, segment_ids = transformer.default_positions(tokens, positions, segment_ids)
  x = jnp.concatenate([embed_image(params, image_inputs, config), embed_text(params, tokens, positions, config)],
                      axis=1)
  _, mask = masks.mask(has_image, segment_ids, prefix_lengths, config.num_patches)
  x = transformer.pre_ln_stack(params["blocks"], x, config, mask, dropout_rng)
  return layers.layer_norm(x, params["ln_f"], config.layer_norm_eps)


def forward(params: dict, image_inputs: jax.Array, tokens: jax.Array, config: M6Config, **kwargs) -> jax.Array:
  """Text logits [batch, text, vocab] (float32) of params in the training layout; kwargs as `hidden_states`."""
  hidden = hidden_states(params, image_inputs, tokens, config, **kwargs)
  return logits_from_hidden(params, hidden[:, config.num_patches:], config)


def cached_hidden_states(params: transformer.DecodeParams, x: jax.Array, config: M6Config, cache: dict, *,
                         segment_ids: jax.Array, order: jax.Array, prefix: bool) -> tuple[jax.Array, dict]:
  """Hidden states of embedded positions x [batch, t, embed] written at cache["index"] (a
  `transformer.empty_cache`), params in the decode layout. Returns (hidden states, updated cache).

  order [batch, t]: each position's place in the sequence (its cache slot), what causality compares.
  prefix=True: the positions are (the rest of) the bidirectional prefix and see each other and everything cached;
  False: causal, as generated tokens are.
  """
  causal, kv_segments, kv_order = transformer.cached_self_mask(cache, segment_ids, order)
  mask = layers.attention_mask(segment_ids, kv_segments, None, None) if prefix else causal
  x, cache = transformer.cached_pre_ln_stack(params.tree["blocks"], x, config, cache, mask, kv_segments, kv_order)
  return layers.layer_norm(x, params.tree["ln_f"], config.layer_norm_eps), cache


@gin.configurable
@dataclasses.dataclass(frozen=True)
class M6Model:
  """M6 as the training loop sees a model: param specs, a loss over multitask batches, FLOPs per text token.

  Batches (cpm_jax.models.m6.data.M6Data) are dicts: the image side (config.image_input), has_image [batch],
  prefix_lengths [batch], and text [batch, text]: inputs, targets, weights (1 on the targets after the prefix),
  segment_ids (1 for tokens, 0 for padding).
  """

  config: M6Config = dataclasses.field(default_factory=M6Config)
  z_loss: float = 0.0

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    image_inputs = batch[self.config.image_input]
    expected = self.config.image_input_shape(image_inputs.shape[0])
    if image_inputs.shape != expected:
      raise ValueError(f"M6 batch {self.config.image_input!r} has shape {image_inputs.shape}; M6Config expects "
                       f"{expected} (M6Data.image_size and M6Config.image_size must agree).")
    logits = forward(params, image_inputs, batch["inputs"], self.config,
                     has_image=batch["has_image"], prefix_lengths=batch["prefix_lengths"],
                     segment_ids=batch.get("segment_ids"), positions=batch.get("positions"), dropout_rng=dropout_rng)
    return objectives.lm_loss(logits, batch["targets"], batch["weights"], self.z_loss)

  def with_config(self, config):
    """This model with another config (e.g. other execution fields)."""
    return dataclasses.replace(self, config=config)

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """M6Data's batches of seq_len text tokens (target_len does not apply)."""
    del target_len
    tokens = ((seq_len,), "int32")
    return training.abstract_batch(batch_size, {
        self.config.image_input: (self.config.image_input_shape(1)[1:], "float32"), "has_image": ((), "int32"),
        "prefix_lengths": ((), "int32"), "inputs": tokens, "targets": tokens, "weights": ((seq_len,), "float32"),
        "segment_ids": tokens})

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per text token of a row of `seq_len` text tokens and config.num_patches patches: 6 x the
    multiply-adds of the blocks (every position), the patch encoder (every patch) and the tied head (text only),
    plus attention scores (12 x layers x embed x positions per position), divided by seq_len."""
    c = self.config
    positions = c.num_patches + seq_len
    per_layer = 4 * c.embed_dim * c.embed_dim + 2 * c.embed_dim * c.ffn_dim
    encoder = {"linear": c.patch_dim * c.embed_dim, "features": c.feature_dim * c.embed_dim,
               "conv": c.patch_size ** 2 * 9 * (c.channels + 2 * c.stem_width) * c.stem_width
               + c.stem_width * c.embed_dim}[c.patch_encoder]
    macs = positions * c.num_layers * per_layer + c.num_patches * encoder + seq_len * c.vocab_size * c.embed_dim
    return (6.0 * macs + 12.0 * c.num_layers * c.embed_dim * positions ** 2) / seq_len
