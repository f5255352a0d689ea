"""PLUG's decoding adapter for the shared loops (cpm_jax.decoding): the encoder runs once (prefill), the decoder
one token per step from [CLS]; `generate` from encoder inputs such as [CLS] answer [SEP] context [SEP].

Decoding runs on `transformer.DecodeParams` made once by `decode_layout` (the decoder's blocks per layer with
[out, in] weights; the encoder keeps the training layout): callers that generate repeatedly convert once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding, layers, partitioning, serving_weights, transformer
from cpm_jax.models.plug import model

# PLUG's release samples no [SEP] (the end) before this fraction of the requested length.
RELEASE_SEP_FRACTION = 0.8
# What int8 serving quantises: the decoder's dense layers (the encoder, run once per input, and the word embedding
# it shares stay as they are).
QUANTIZED = serving_weights.Quantized(blocks=(("decoder", "blocks"),))


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
  kv = [layers.project_qkv(encoder_hidden, block["cross_attn"], config.compute_dtype, params.layout)
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


def _made(program: decoding.DecodeProgram, config: model.PlugConfig, decoding_config: decoding.DecodingConfig,
          sep_id: int, pad_id: int, streamed: bool, mesh):
  """`program` jitted for generation or (`streamed`) made a stream, [SEP] ending a text."""
  options = dict(eod_id=sep_id, pad_id=pad_id, vocab_size=config.vocab_size)
  return program.streamed(decoding_config, mesh=mesh, **options) if streamed else program.compiled(decoding_config,
                                                                                                    **options)


@functools.lru_cache(maxsize=None)
def _compiled(config: model.PlugConfig, decoding_config: decoding.DecodingConfig, sep_id: int, cls_id: int,
              pad_id: int, streamed: bool, mesh):
  """(decode params, sources, segment ids, token types, rng) -> (tokens, lengths), or the stream of tokens, for one
  setting; one per mesh, since the mesh in force when it is traced shapes its sharding constraints."""
  def prefill_sources(params, sources, segment_ids, token_types):
    cache, first = prefill(params, sources, segment_ids, config, decoding_config.max_new_tokens, cls_id=cls_id,
                           source_token_types=token_types)
    return cache, first, None, None  # the decoder's row starts at its [CLS]

  program = decoding.DecodeProgram(prefill_sources, step_fn(config), cache_logical_axes(config))
  return _made(program, config, decoding_config, sep_id, pad_id, streamed, mesh)


def encoder_inputs(sources: Sequence[Sequence[int]], config: model.PlugConfig, pad_id: int,
                   token_types: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens, segment ids, token types) of encoder inputs, right-padded to a power-of-two width."""
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
  return tokens, segment_ids, types


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
  inputs = encoder_inputs(sources, config, pad_id, token_types)
  decoding_config = decoding_config.with_min_length_fraction(RELEASE_SEP_FRACTION)
  run = _compiled(config, decoding_config.unseeded(), sep_id, cls_id, pad_id, False, mesh)
  with partitioning.on_mesh(mesh):
    out, lengths = jax.device_get(run(params, *inputs, jax.random.key(decoding_config.seed)))
  return [row[:n].tolist() for row, n in zip(out, lengths)]


def stream(params: transformer.DecodeParams, sources: Sequence[Sequence[int]], config: model.PlugConfig,
           decoding_config: decoding.SamplingConfig, *, cls_id: int, sep_id: int, pad_id: int = 0,
           token_types: Sequence[Sequence[int]] | None = None,
           mesh: jax.sharding.Mesh | None = None) -> Iterator[np.ndarray]:
  """The tokens of `generate` for one batch as they are produced (`decoding.DecodeProgram.streamed`)."""
  decoding_config = decoding_config.with_min_length_fraction(RELEASE_SEP_FRACTION)
  run = _compiled(config, decoding_config.unseeded(), sep_id, cls_id, pad_id, True, mesh)
  return run(params, *encoder_inputs(sources, config, pad_id, token_types), jax.random.key(decoding_config.seed))


# ---- long texts: the released generate_plug.py protocol ------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class LongText:
  """PLUG's long-text generation as released (FORMATS.md, "PLUG long-text generation"): the encoder reads the last
  `context_length` tokens of the context between [CLS] and [SEP]; every `chunk_length` generated tokens the chunk
  is appended to the context (its last `kept_length` tokens kept), the context is re-encoded and the decoder
  restarts from [CLS]; with an open SamplingConfig.min_length, [SEP] ends the text only once `sep_fraction` of
  the requested length (max_new_tokens, over all chunks) has been generated."""

  context_length: int = 510
  kept_length: int = 512
  chunk_length: int = 128
  sep_fraction: float = RELEASE_SEP_FRACTION

  def __post_init__(self):
    if min(self.context_length, self.kept_length, self.chunk_length) < 1:
      raise ValueError(f"LongText: context_length={self.context_length}, kept_length={self.kept_length} and "
                       f"chunk_length={self.chunk_length} must all be >= 1.")
    if not 0.0 <= self.sep_fraction <= 1.0:
      raise ValueError(f"LongText.sep_fraction={self.sep_fraction}; expected in [0, 1].")

  @property
  def read_length(self) -> int:
    """Context tokens the encoder reads."""
    return min(self.context_length, self.kept_length)


def _encode_context(params: transformer.DecodeParams, context: jax.Array, valid: jax.Array, config: model.PlugConfig,
                    long_text: LongText, *, cls_id: int, sep_id: int) -> dict:
  """A fresh decoder cache over [CLS] + the context's last `read_length` tokens + [SEP] (context left-padded, `valid`
  marking its tokens; positions count only valid tokens, so the padding changes nothing)."""
  batch, read = context.shape[0], long_text.read_length
  tokens = jnp.concatenate([jnp.full((batch, 1), cls_id, jnp.int32), context[:, -read:],
                            jnp.full((batch, 1), sep_id, jnp.int32)], axis=1)
  segment_ids = jnp.concatenate([jnp.ones((batch, 1), jnp.int32), valid[:, -read:].astype(jnp.int32),
                                 jnp.ones((batch, 1), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
  hidden = model.encode(params.tree, tokens, config, positions=positions, segment_ids=segment_ids)
  return transformer.constrain_cache(init_cache(params, config, hidden, segment_ids, long_text.chunk_length),
                                     cache_logical_axes(config))


def long_text_prefill(params: transformer.DecodeParams, context: jax.Array, valid: jax.Array,
                      config: model.PlugConfig, long_text: LongText, *, cls_id: int, sep_id: int
                      ) -> tuple[dict, jax.Array]:
  """(cache of `long_text_step_fn`, first decoder tokens = [CLS]) for left-padded contexts [batch, kept_length]."""
  cache = {"decoder": _encode_context(params, context, valid, config, long_text, cls_id=cls_id, sep_id=sep_id),
           "context": context.astype(jnp.int32), "valid": valid.astype(bool),
           "chunk": jnp.zeros((context.shape[0], long_text.chunk_length), jnp.int32),
           "fed": jnp.zeros((), jnp.int32), "reencodes": jnp.zeros((), jnp.int32)}
  return cache, jnp.full((context.shape[0],), cls_id, jnp.int32)


def long_text_step_fn(config: model.PlugConfig, long_text: LongText, *, cls_id: int, sep_id: int
                      ) -> decoding.StepFn:
  """`step_fn` over `long_text_prefill`'s cache: records each generated token of the chunk; once `chunk_length`
  tokens were fed ([CLS] and the chunk's first chunk_length - 1), the token given (the chunk's last) completes the
  chunk, which is appended to the context; the context is re-encoded and the decoder fed [CLS] again."""
  step = step_fn(config)
  chunk_length = long_text.chunk_length

  def reencode(params, cache, tokens):
    chunk = jax.lax.dynamic_update_slice_in_dim(cache["chunk"], tokens.astype(jnp.int32), chunk_length - 1, axis=1)
    context = jnp.concatenate([cache["context"], chunk], axis=1)[:, -long_text.kept_length:]
    valid = jnp.concatenate([cache["valid"], jnp.ones_like(chunk, bool)], axis=1)[:, -long_text.kept_length:]
    decoder = _encode_context(params, context, valid, config, long_text, cls_id=cls_id, sep_id=sep_id)
    return {**cache, "decoder": decoder, "context": context, "valid": valid, "fed": jnp.zeros((), jnp.int32),
            "reencodes": cache["reencodes"] + 1}

  def long_step(params, tokens, cache):
    full = cache["fed"] == chunk_length
    cache = jax.lax.cond(full, lambda c: reencode(params, c, tokens), lambda c: c, cache)
    tokens = jnp.where(full, cls_id, tokens)
    chunk = jax.lax.dynamic_update_slice_in_dim(cache["chunk"], tokens.astype(jnp.int32),
                                                jnp.maximum(cache["fed"] - 1, 0), axis=1)
    chunk = jnp.where(cache["fed"] > 0, chunk, cache["chunk"])
    logits, decoder = step(params, tokens, cache["decoder"])
    return logits, {**cache, "decoder": decoder, "chunk": chunk, "fed": cache["fed"] + 1}
  return long_step


def long_text_cache_logical_axes(config: model.PlugConfig) -> dict:
  """Logical axes of `long_text_prefill`'s cache."""
  return {"decoder": cache_logical_axes(config), "context": ("batch", "cache_length"),
          "valid": ("batch", "cache_length"), "chunk": ("batch", "cache_length"), "fed": (), "reencodes": ()}


@functools.lru_cache(maxsize=None)
def _long_text_compiled(config: model.PlugConfig, decoding_config: decoding.DecodingConfig, long_text: LongText,
                        cls_id: int, sep_id: int, pad_id: int, streamed: bool, mesh):
  """(decode params, contexts, valid, rng) -> (tokens, lengths) of `generate_long`, or its stream; one per mesh."""
  def prefill_contexts(params, context, valid):
    return (*long_text_prefill(params, context, valid, config, long_text, cls_id=cls_id, sep_id=sep_id), None, None)

  program = decoding.DecodeProgram(prefill_contexts, long_text_step_fn(config, long_text, cls_id=cls_id,
                                                                       sep_id=sep_id),
                                   long_text_cache_logical_axes(config))
  return _made(program, config, decoding_config, sep_id, pad_id, streamed, mesh)


def long_text_contexts(contexts: Sequence[Sequence[int]], long_text: LongText) -> tuple[np.ndarray, np.ndarray]:
  """Token-id contexts (text without [CLS] / [SEP]) as the protocol keeps them: each row's last kept_length tokens,
  left-padded; returns (tokens, valid)."""
  tokens = np.zeros((len(contexts), long_text.kept_length), np.int32)
  valid = np.zeros(tokens.shape, bool)
  for row, context in enumerate(contexts):
    kept = list(context)[-long_text.kept_length:]
    if kept:
      tokens[row, -len(kept):], valid[row, -len(kept):] = kept, True
  return tokens, valid


def _long_text_run(contexts: Sequence[Sequence[int]], config: model.PlugConfig,
                   decoding_config: decoding.DecodingConfig, long_text: LongText, cls_id: int, sep_id: int,
                   pad_id: int, streamed: bool, mesh):
  """(the compiled program, its inputs and rng) of `generate_long` / `stream_long`."""
  if long_text.read_length + 2 > config.max_positions:
    raise ValueError(f"LongText reads {long_text.read_length} context tokens + [CLS] and [SEP], more than "
                     f"max_positions={config.max_positions}; lower LongText.context_length.")
  if long_text.chunk_length > config.max_positions:
    raise ValueError(f"LongText.chunk_length={long_text.chunk_length} exceeds max_positions={config.max_positions}.")
  decoding_config = decoding_config.with_min_length_fraction(long_text.sep_fraction)
  run = _long_text_compiled(config, decoding_config.unseeded(), long_text, cls_id, sep_id, pad_id, streamed, mesh)
  return run, (*long_text_contexts(contexts, long_text), jax.random.key(decoding_config.seed))


def generate_long(params: transformer.DecodeParams, contexts: Sequence[Sequence[int]], config: model.PlugConfig,
                  decoding_config: decoding.DecodingConfig, *, cls_id: int, sep_id: int, pad_id: int = 0,
                  long_text: LongText = LongText(), mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
  """Continuations (token ids, without [SEP]) of token-id texts by PLUG's long-text protocol (`LongText`): any
  number of new tokens, in chunks of chunk_length decoded from a re-encoded context; one on-device loop for all."""
  if not contexts:
    return []
  run, inputs = _long_text_run(contexts, config, decoding_config, long_text, cls_id, sep_id, pad_id, False, mesh)
  with partitioning.on_mesh(mesh):
    out, lengths = jax.device_get(run(params, *inputs))
  return [row[:n].tolist() for row, n in zip(out, lengths)]


def stream_long(params: transformer.DecodeParams, contexts: Sequence[Sequence[int]], config: model.PlugConfig,
                decoding_config: decoding.SamplingConfig, *, cls_id: int, sep_id: int, pad_id: int = 0,
                long_text: LongText = LongText(), mesh: jax.sharding.Mesh | None = None) -> Iterator[np.ndarray]:
  """The tokens of `generate_long` for one batch as they are produced."""
  run, inputs = _long_text_run(contexts, config, decoding_config, long_text, cls_id, sep_id, pad_id, True, mesh)
  return run(params, *inputs)
