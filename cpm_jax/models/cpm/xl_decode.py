"""CPM-XL's decoding adapter for the shared loops (cpm_jax.decoding): generation carries the memory (each layer's
keys and values of the last memory_length + segment_length positions) instead of a window, so a text can grow
without bound; and the evaluation adapter (scoring by the segment-recurrent forward pass).

Prompts are right-padded so that every row's positions start at 0 and its segments line up with the forward pass's;
prefill feeds them segment by segment.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding, layers, logging_setup, partitioning, serving_weights, tokenization, transformer
from cpm_jax.evaluation import batching, scoring
from cpm_jax.evaluation.interface import TOKENIZER_SOURCE, LanguageModel
from cpm_jax.models.cpm import evaluation as cpm_evaluation
from cpm_jax.models.cpm import xl


# What int8 serving quantises: the blocks' dense layers and the tied word embedding.
QUANTIZED = serving_weights.Quantized(blocks=(("blocks",),), tables=(("embed", "wte"),))


def decode_layout(params: dict, config: xl.CPMXLConfig) -> transformer.DecodeParams:
  """`params` converted for cached decoding (per-layer [out, in] weights, as CPM's), each layer's relative table W_R R
  (`xl.relative_table`) computed once into blocks/attn/rel_table."""
  return _decode_layout(params, config)


@functools.partial(jax.jit, static_argnums=1)
def _decode_layout(params: dict, config: xl.CPMXLConfig) -> transformer.DecodeParams:
  tables = jax.vmap(lambda attn: xl.relative_table(attn, config, config.compute_dtype))(params["blocks"]["attn"])
  blocks = {**params["blocks"], "attn": {**params["blocks"]["attn"], "rel_table": tables}}
  return transformer.to_decode_params({**params, "blocks": blocks}, [("blocks",)])


def init_cache(config: xl.CPMXLConfig, batch: int, dtype=None) -> dict:
  """An empty memory: per layer keys and values of attention_span slots ([batch * heads, span, head_dim]), with each
  slot's position and segment id (0: empty)."""
  span = config.attention_span
  k, v = zip(*(layers.empty_cache(batch, config.num_heads, span, config.head_dim, dtype or config.compute_dtype)
               for _ in range(config.num_layers)))
  return {"k": k, "v": v, "positions": jnp.zeros((batch, span), jnp.int32),
          "segment_ids": jnp.zeros((batch, span), jnp.int32)}


def cache_logical_axes(config: xl.CPMXLConfig) -> dict:
  """Logical axes of the adapter's cache: the memory and each row's next position."""
  kv = (layers.CACHE_AXES,) * config.num_layers
  return {"xl": {"k": kv, "v": kv, "positions": ("batch", "cache_length"), "segment_ids": ("batch", "cache_length")},
          "position": ("batch",)}


def prefill(params: transformer.DecodeParams, prompts: jax.Array, lengths: jax.Array, config: xl.CPMXLConfig
            ) -> tuple[dict, jax.Array]:
  """Right-padded prompts [batch, k * segment_length] (lengths >= 1): all but each row's last token go into the
  memory, a segment at a time; returns (cache, last prompt token [batch]) for the loops."""
  batch, width = prompts.shape
  segment = config.segment_length
  memory = transformer.constrain_cache(init_cache(config, batch), cache_logical_axes(config)["xl"])

  def feed(index, memory):
    tokens = jax.lax.dynamic_slice_in_dim(prompts, index * segment, segment, axis=1)
    positions = index * segment + jnp.broadcast_to(jnp.arange(segment, dtype=jnp.int32), (batch, segment))
    segment_ids = (positions < lengths[:, None] - 1).astype(jnp.int32)
    return xl.cached_hidden_states(params, tokens, config, memory, positions=positions, segment_ids=segment_ids)[1]

  memory = jax.lax.fori_loop(0, width // segment, feed, memory)
  last = jnp.take_along_axis(prompts, (lengths - 1)[:, None], axis=1)[:, 0]
  return {"xl": memory, "position": (lengths - 1).astype(jnp.int32)}, last


def step_fn(config: xl.CPMXLConfig) -> decoding.StepFn:
  """One cached CPM-XL step: tokens [batch, 1] at each row's next position."""
  def step(params, tokens, cache):
    position = cache["position"]
    hidden, memory = xl.cached_hidden_states(params, tokens, config, cache["xl"], positions=position[:, None],
                                             segment_ids=jnp.ones_like(tokens))
    return xl.logits_from_hidden(params.tree, hidden, config, params.layout), {"xl": memory, "position": position + 1}
  return step


@functools.lru_cache(maxsize=None)
def _compiled(config: xl.CPMXLConfig, decoding_config: decoding.DecodingConfig, eod_id: int, pad_id: int,
              streamed: bool, mesh):
  """The decode program of one setting, jitted (or, `streamed`, made a stream); one per mesh."""
  def prefill_prompts(params, prompts, lengths):
    seen = None
    if decoding_config.needs_seen_tokens:
      seen = decoding.seen_tokens(prompts, jnp.arange(prompts.shape[1])[None, :] < lengths[:, None],
                                  config.vocab_size)
    return (*prefill(params, prompts, lengths, config), seen, None)  # n-grams of the generated text only

  program = decoding.DecodeProgram(prefill_prompts, step_fn(config), cache_logical_axes(config))
  options = dict(eod_id=eod_id, pad_id=pad_id, vocab_size=config.vocab_size)
  return program.streamed(decoding_config, mesh=mesh, **options) if streamed else program.compiled(decoding_config,
                                                                                                    **options)


def prepare_prompts(prompts: Sequence[Sequence[int]], config: xl.CPMXLConfig, *, eod_id: int, pad_id: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [batch, width] (width a power of two rounded up to whole segments) and lengths; an empty prompt
  becomes [eod_id]. No prompt is too long: the memory keeps what the model can see."""
  rows = [[int(t) for t in prompt] or [eod_id] for prompt in prompts]
  longest = max(len(row) for row in rows)
  width = -(-decoding.bucket_width(longest, 1 << 30) // config.segment_length) * config.segment_length
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, np.array([len(row) for row in rows], np.int32)


def generate(params: transformer.DecodeParams, prompts: Sequence[Sequence[int]], config: xl.CPMXLConfig,
             decoding_config: decoding.DecodingConfig, *, eod_id: int, pad_id: int, batch_size: int | None = None,
             mesh: jax.sharding.Mesh | None = None, progress: bool = False) -> list[list[int]]:
  """Continuations (new token ids, without <eod>) of token-id prompts of any length, from `decode_layout`; any
  max_new_tokens. Batches as `cpm.generate`."""
  if not prompts:
    return []
  decoding_config = decoding_config.with_min_length_fraction(0.0)
  batch_size = batch_size or len(prompts)
  rng = jax.random.key(decoding_config.seed)
  run = _compiled(config, decoding_config.unseeded(), eod_id, pad_id, False, mesh)
  results = []
  starts = range(0, len(prompts), batch_size)
  for begin in logging_setup.progress(starts, desc="generating", total=len(starts), unit="batches", enabled=progress):
    chunk = list(prompts[begin:begin + batch_size])
    tokens, lengths = prepare_prompts(chunk + [[]] * (batch_size - len(chunk)), config, eod_id=eod_id, pad_id=pad_id)
    with partitioning.on_mesh(mesh):
      out, out_lengths = jax.device_get(run(params, tokens, lengths, jax.random.fold_in(rng, begin)))
    results += [out[i, :out_lengths[i]].tolist() for i in range(len(chunk))]
  return results


def stream(params: transformer.DecodeParams, prompts: Sequence[Sequence[int]], config: xl.CPMXLConfig,
           decoding_config: decoding.SamplingConfig, *, eod_id: int, pad_id: int,
           mesh: jax.sharding.Mesh | None = None) -> Iterator[np.ndarray]:
  """The tokens of `generate` for one batch as they are produced (`decoding.DecodeProgram.streamed`)."""
  decoding_config = decoding_config.with_min_length_fraction(0.0)
  tokens, lengths = prepare_prompts(prompts, config, eod_id=eod_id, pad_id=pad_id)
  run = _compiled(config, decoding_config.unseeded(), eod_id, pad_id, True, mesh)
  return run(params, tokens, lengths, jax.random.key(decoding_config.seed))


# What scoring reads of a request at most (the model itself has no limit; memory grows with the length).
SCORE_SEGMENTS = 16


def language_model(params: dict, config: xl.CPMXLConfig, tokenizer: Any, metadata: dict, *, batch_size: int = 8,
                   decoding_config: decoding.DecodingConfig | None = None, mesh=None, strict: bool = False,
                   progress: bool = False, weights: str | None = None, long_text: bool = False) -> LanguageModel:
  """CPM-XL behind the LanguageModel interface (greedy decoding of 64 tokens unless told otherwise); requests are
  scored over at most SCORE_SEGMENTS segments. weights as CPM's, w8a8 excepted (a ValueError); long_text changes
  nothing (the memory carries any length)."""
  del metadata, long_text
  tokenization.check_fits(tokenizer.vocab_size, tokenizer.model_path, config.vocab_size, TOKENIZER_SOURCE)
  score = cpm_evaluation.score_fn(config, xl.forward)  # by the segment-recurrent forward pass
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)
  if weights not in serving_weights.ROUND_TRIPS:
    raise ValueError(f"--weights={weights}: CPM-XL scores in the training layout, which cannot hold {weights}'s "
                     f"activation quantisation; expected one of {list(serving_weights.ROUND_TRIPS[1:])}.")
  scored = functools.cache(lambda: serving_weights.round_trip(params, weights, QUANTIZED))
  served_layout = serving_weights.serving_layout(lambda p: decode_layout(p, config), weights, QUANTIZED)
  runner = batching.ModelRunner(params, served_layout, batch_size, mesh, progress)

  def score_requests(requests, names=None):
    return scoring.score_requests(score, scored(), requests, max_length=SCORE_SEGMENTS * config.segment_length,
                                  batch_size=batch_size, pad_id=tokenizer.pad_id, strict=strict, progress=progress,
                                  names=names, mesh=mesh)

  ids = dict(eod_id=tokenizer.eod_id, pad_id=tokenizer.pad_id, mesh=mesh)

  def generate_ids(prompts):
    return generate(runner.decode_params, prompts, config, decoding_config, batch_size=batch_size, progress=progress,
                    **ids)

  def stream_ids(prompts):
    return stream(runner.decode_params, prompts, config, decoding_config, **ids)

  return LanguageModel(tokenizer, score_requests, generate_ids, stream=stream_ids)
