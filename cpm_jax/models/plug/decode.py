"""PLUG's decoding adapter for the shared loops (cpm_jax.decoding): the encoder runs once (prefill), the decoder
one token per step from [CLS]; `generate` from encoder inputs such as [CLS] answer [SEP] context [SEP].

Decoding runs on `transformer.DecodeParams` made once by `decode_layout` (the decoder's blocks per layer with
[out, in] weights; the encoder keeps the training layout): callers that generate repeatedly convert once.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding, layers, partitioning, transformer
from cpm_jax.models.plug import model

# PLUG's release samples no [SEP] (the end) before this fraction of the requested length.
RELEASE_SEP_FRACTION = 0.8


def decode_layout(params: dict) -> transformer.DecodeParams:
  """`params` (training layout) with the decoder converted for cached decoding (one copy of its blocks)."""
  return transformer.to_decode_params(params, [("decoder", "blocks")])


def init_cache(params: transformer.DecodeParams, config: model.PlugConfig, encoder_hidden: jax.Array,
               encoder_segment_ids: jax.Array, length: int, dtype=None) -> dict:
  """Decoder cache: empty self-attention K/V (`transformer.empty_cache`) and, per layer, the cross-attention K/V
  over the encoder output in the same layout (cross_k, cross_v [batch * heads, src, head_dim]), computed once here
  (every step reuses them)."""
  dtype = dtype or config.compute_dtype
  cache = transformer.empty_cache(encoder_hidden.shape[0], length, config.num_decoder_layers, config.num_heads,
                                  config.head_dim, dtype)
  kv = [layers.project_qkv(encoder_hidden, block["cross_attn"], config.compute_dtype, layers.Layout.DECODE)
        .astype(dtype) for block in params.tree["decoder"]["blocks"]]  # [batch, src, k/v, heads, head_dim] per layer
  return {**cache, "cross_k": tuple(layers.cache_layout(a[:, :, 0]) for a in kv),
          "cross_v": tuple(layers.cache_layout(a[:, :, 1]) for a in kv),
          "encoder_segment_ids": encoder_segment_ids.astype(jnp.int32)}


def cache_logical_axes(config: model.PlugConfig) -> dict:
  """Logical axes of `init_cache`'s tree."""
  axes = transformer.cache_logical_axes(config.num_decoder_layers)
  return {**axes, "cross_k": axes["k"], "cross_v": axes["v"], "encoder_segment_ids": ("batch", "cache_length")}


def prefill(params: transformer.DecodeParams, sources: jax.Array, source_segment_ids: jax.Array,
            config: model.PlugConfig, cache_length: int, *, cls_id: int,
            source_token_types: jax.Array | None = None) -> tuple[dict, jax.Array]:
  """Encodes right-padded sources [batch, src] once; returns (decoder cache holding the cross-attention K/V,
  first decoder tokens = [CLS]) for the decoding loops with `step_fn`."""
  hidden = model.encode(params.tree, sources, config, token_types=source_token_types,
                        segment_ids=source_segment_ids)
  cache = transformer.constrain_cache(init_cache(params, config, hidden, source_segment_ids, cache_length),
                                      cache_logical_axes(config))
  return cache, jnp.full((sources.shape[0],), cls_id, jnp.int32)


def step_fn(config: model.PlugConfig) -> decoding.StepFn:
  """One cached decoder step: tokens [batch, 1] -> (float32 logits [batch, 1, vocab], cache)."""
  def step(params, tokens, cache):
    hidden, cache = model.cached_decode(params, tokens, config, cache)
    return model.decoder_logits(params.tree, hidden, config), cache
  return step


@functools.lru_cache(maxsize=None)
def _generator(config: model.PlugConfig, decoding_config: decoding.DecodingConfig, sep_id: int, cls_id: int,
               pad_id: int, mesh):
  """Jitted (decode params, sources, segment ids, token types, rng) -> (tokens, lengths) for one setting; one per
  mesh, since the mesh in force when it is traced shapes its sharding constraints."""
  del mesh
  step = step_fn(config)

  def run(params, sources, segment_ids, token_types, rng):
    cache, first = prefill(params, sources, segment_ids, config, decoding_config.max_new_tokens, cls_id=cls_id,
                           source_token_types=token_types)
    return decoding_config.run(step, params, cache, cache_logical_axes(config), first, eod_id=sep_id,
                               pad_id=pad_id, vocab_size=config.vocab_size, rng=rng)

  return jax.jit(run)


def generate(params: transformer.DecodeParams, sources: Sequence[Sequence[int]], config: model.PlugConfig,
             decoding_config: decoding.DecodingConfig, *, cls_id: int, sep_id: int, pad_id: int = 0,
             token_types: Sequence[Sequence[int]] | None = None,
             mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
  """Decoder outputs (token ids, without [SEP]) for encoder inputs such as [CLS] answer [SEP] context [SEP], from
  `decode_layout(params)`.

  decoding_config: a decoding.BeamSearchConfig (GNMT length penalty; [SEP] forbidden before min_length) or a
  SamplingConfig (PLUG's: top_k 20, temperature 0.9; an open min_length holds [SEP] back for RELEASE_SEP_FRACTION
  of max_new_tokens, as the release sampled). Sources are
  right-padded to a power-of-two width; the decoder starts from [CLS]. With `mesh`, activations and the cache are
  sharded by the logical-axis rules.
  """
  if not sources:
    return []
  longest = max(len(s) for s in sources)
  if longest > config.max_positions:
    raise ValueError(f"A source has {longest} tokens; the model takes at most max_positions={config.max_positions}.")
  width = decoding.bucket_width(longest, config.max_positions)
  tokens = np.full((len(sources), width), pad_id, np.int32)
  types = np.zeros_like(tokens)
  for i, source in enumerate(sources):
    tokens[i, :len(source)] = source
    types[i, :len(source)] = token_types[i] if token_types is not None else 0
  segment_ids = (np.arange(width)[None] < np.array([len(s) for s in sources])[:, None]).astype(np.int32)
  rng = jax.random.key(decoding_config.seed)
  run = _generator(config, decoding_config.with_min_length_fraction(RELEASE_SEP_FRACTION).unseeded(), sep_id, cls_id,
                   pad_id, mesh)
  with partitioning.on_mesh(mesh):
    out, lengths = jax.device_get(run(params, tokens, segment_ids, types, rng))
  return [row[:n].tolist() for row, n in zip(out, lengths)]
