"""CPM-LM's decoding adapter for the shared loops (cpm_jax.decoding): the decode layout, prefill, one cached step,
and `generate` from token-id prompts.

Decoding runs on `transformer.DecodeParams` made once by `decode_layout` (per-layer blocks, [out, in] weights):
callers that generate repeatedly convert once and pass the result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding, logging_setup, partitioning, serving_weights, transformer
from cpm_jax.models.cpm import model


# What int8 serving quantises: the blocks' dense layers and the tied word embedding (embedding rows, head channels).
QUANTIZED = serving_weights.Quantized(blocks=(("blocks",),), tables=(("embed", "wte"),))


def decode_layout(params: dict) -> transformer.DecodeParams:
  """`params` (training layout) converted for cached decoding, at the cost of one copy of the block weights.

  Cached decoding under jit then reads every layer's weights in place (with stacked blocks XLA copies each layer's
  slice on every step), as matrix-vector products over weights whose contracted dim is minor (faster on XLA:CPU).
  """
  return transformer.to_decode_params(params, [("blocks",)])


def init_cache(config: model.CPMConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty decode cache of `length` slots (`transformer.empty_cache`) in the compute dtype by default."""
  return transformer.empty_cache(batch, length, config.num_layers, config.num_heads, config.head_dim,
                                 dtype or config.compute_dtype)


def served_logits(params: transformer.DecodeParams, tokens: jax.Array, config: model.CPMConfig, *,
                  positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Logits [batch, length, vocab] (float32) of whole rows through the decode layout as served: each row prefilled
  into an empty cache. What scores weights only the decode path computes (w8a8's activation quantisation)."""
  cache = init_cache(config, *tokens.shape)
  hidden, _ = model.cached_hidden_states(params, tokens, config, cache, positions=positions, segment_ids=segment_ids)
  return model.logits_from_hidden(params.tree, hidden, config, params.layout)


def cache_logical_axes(config: model.CPMConfig) -> dict:
  """Logical axes of the adapter's cache: the LM cache and each row's next position."""
  return {"lm": transformer.cache_logical_axes(config.num_layers), "position": ("batch",)}


def prefill(params: transformer.DecodeParams, prompts: jax.Array, lengths: jax.Array, config: model.CPMConfig,
            cache_length: int) -> tuple[dict, jax.Array]:
  """Runs left-padded prompts [batch, width] (lengths [batch] >= 1) through the model.

  All but the last column go into a fresh KV cache of `cache_length` slots (padding gets segment id 0
  and is never attended); returns (cache, last prompt token [batch]) for the decoding loops, whose first step
  feeds that last token.
  """
  batch, width = prompts.shape
  start = width - lengths[:, None]
  columns = jnp.arange(width)[None, :]
  segment_ids = (columns >= start).astype(jnp.int32)
  positions = jnp.maximum(columns - start, 0).astype(jnp.int32)
  lm = transformer.constrain_cache(init_cache(config, batch, cache_length),
                                   transformer.cache_logical_axes(config.num_layers))
  if width > 1:
    _, lm = model.cached_hidden_states(params, prompts[:, :-1], config, lm, positions=positions[:, :-1],
                                       segment_ids=segment_ids[:, :-1])
  return {"lm": lm, "position": positions[:, -1]}, prompts[:, -1]


def step_fn(config: model.CPMConfig, spans: Sequence[int] | None = None) -> decoding.StepFn:
  """One cached CPM step: tokens [batch, 1] at each row's next position.

  spans (increasing, the last the cache's length): a length-bucketed step, whose attention reads only the
  smallest span holding every filled slot (a lax.switch over one step per span), not the whole cache.
  """
  def step_over(span, params, tokens, cache):
    position = cache["position"]
    hidden, lm = model.cached_hidden_states(params, tokens, config, cache["lm"], positions=position[:, None],
                                            segment_ids=jnp.ones_like(tokens), span=span)
    return model.logits_from_hidden(params.tree, hidden, config, params.layout), {"lm": lm, "position": position + 1}

  if not spans:
    return functools.partial(step_over, None)

  def bucketed(params, tokens, cache):
    bucket = jnp.searchsorted(jnp.asarray(spans), cache["lm"]["index"] + 1)  # the first span holding this slot
    return jax.lax.switch(bucket, [functools.partial(step_over, span) for span in spans], params, tokens, cache)
  return bucketed


def attention_spans(length: int, smallest: int = 64) -> tuple[int, ...]:
  """The spans of a length-bucketed step over a cache of `length` slots: powers of two from `smallest`, then
  length."""
  spans = []
  while smallest < length:
    spans.append(smallest)
    smallest *= 2
  return (*spans, length)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SlidingWindow:
  """Generation past CPM's positions. The model reads at most `length` tokens (None: max_positions); when the
  cache is full, every row keeps its last `length - stride` tokens, re-prefilled at positions 0.. (re-based), and
  generation goes on. So the cache is refilled once every `stride` tokens (None: length // 4), not on every token,
  and each prediction sees between length - stride + 1 and length tokens of context (the rows of a batch move
  together: a row with a shorter prompt keeps what it has)."""

  length: int | None = None
  stride: int | None = None

  def resolve(self, config: model.CPMConfig) -> tuple[int, int]:
    """(length, stride), checked against the model's positions."""
    length = self.length or config.max_positions
    stride = self.stride or max(length // 4, 1)
    if not 2 <= length <= config.max_positions:
      raise ValueError(f"SlidingWindow.length={length}; expected in [2, max_positions={config.max_positions}].")
    if not 1 <= stride < length:
      raise ValueError(f"SlidingWindow.stride={stride}; expected in [1, length={length}).")
    return length, stride


def _move_window(params: transformer.DecodeParams, cache: dict, config: model.CPMConfig, length: int,
                 stride: int) -> dict:
  """The cache after its window moved by `stride`: each row's last `length - stride` cached tokens, recomputed at
  positions 0.. in a fresh cache (left padding stays padding)."""
  kept, segment_ids = cache["history"][:, stride:], cache["lm"]["segment_ids"][:, stride:]
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
  fresh = transformer.constrain_cache(init_cache(config, kept.shape[0], length),
                                      transformer.cache_logical_axes(config.num_layers))
  _, lm = model.cached_hidden_states(params, kept, config, fresh, positions=positions, segment_ids=segment_ids)
  history = jnp.pad(kept, ((0, 0), (0, stride)))
  return {"lm": lm, "position": segment_ids.sum(1).astype(jnp.int32), "history": history,
          "moves": cache["moves"] + 1}


def windowed_step_fn(config: model.CPMConfig, length: int, stride: int,
                     spans: Sequence[int] | None = None) -> decoding.StepFn:
  """`step_fn` (with `spans`) over a cache of `length` slots that also records the token in each slot ("history")
  and, when the cache is full, moves the window by `stride` first (`_move_window`, counted in "moves")."""
  step = step_fn(config, spans)

  def windowed(params, tokens, cache):
    cache = jax.lax.cond(cache["lm"]["index"] == length,
                         lambda c: _move_window(params, c, config, length, stride), lambda c: c, cache)
    history = jax.lax.dynamic_update_slice_in_dim(cache["history"], tokens.astype(jnp.int32),
                                                  cache["lm"]["index"], axis=1)
    logits, inner = step(params, tokens, {"lm": cache["lm"], "position": cache["position"]})
    return logits, {**inner, "history": history, "moves": cache["moves"]}
  return windowed


def windowed_cache_logical_axes(config: model.CPMConfig) -> dict:
  """Logical axes of `windowed_step_fn`'s cache."""
  return {**cache_logical_axes(config), "history": ("batch", "cache_length"), "moves": ()}


def decode_program(config: model.CPMConfig, max_new_tokens: int, window: tuple[int, int] | None, windowed: bool,
                   with_seen: bool, spans: tuple[int, ...] | None = None) -> decoding.DecodeProgram:
  """The decode program for left-padded prompts (prefill inputs: prompts, lengths): a cache holding prompt + new
  tokens, or (`windowed`: they overflow the resolved `window`) `length` slots and a step that moves the window.
  spans: a length-bucketed step (`step_fn`; `attention_spans` of the cache's length)."""
  def prefill_all(params, prompts, lengths):
    valid = jnp.arange(prompts.shape[1])[None, :] >= prompts.shape[1] - lengths[:, None]
    seen = decoding.seen_tokens(prompts, valid, config.vocab_size) if with_seen else None
    fed = (prompts[:, :-1], valid[:, :-1])  # the row before the loop's first token, for the n-gram ban
    if not windowed:
      return (*prefill(params, prompts, lengths, config, prompts.shape[1] - 1 + max_new_tokens), seen, fed)
    length = window[0]
    cache, last = prefill(params, prompts, lengths, config, length)
    history = jnp.pad(prompts[:, :-1].astype(jnp.int32), ((0, 0), (0, length - prompts.shape[1] + 1)))
    return {**cache, "history": history, "moves": jnp.zeros((), jnp.int32)}, last, seen, fed

  if windowed:
    return decoding.DecodeProgram(prefill_all, windowed_step_fn(config, *window, spans),
                                  windowed_cache_logical_axes(config))
  return decoding.DecodeProgram(prefill_all, step_fn(config, spans), cache_logical_axes(config))


@functools.lru_cache(maxsize=None)
def _compiled(config: model.CPMConfig, decoding_config: decoding.DecodingConfig, eod_id: int, pad_id: int,
              window: tuple[int, int] | None, windowed: bool, spans: tuple[int, ...] | None, streamed: bool, mesh):
  """The program of one setting, jitted for `generate` or (`streamed`) made a stream; one per mesh, since the mesh
  in force when it is traced shapes its sharding constraints."""
  program = decode_program(config, decoding_config.max_new_tokens, window, windowed,
                           decoding_config.needs_seen_tokens, spans)
  options = dict(eod_id=eod_id, pad_id=pad_id, vocab_size=config.vocab_size)
  return program.streamed(decoding_config, mesh=mesh, **options) if streamed else program.compiled(decoding_config,
                                                                                                    **options)


def _prepared(prompts: Sequence[Sequence[int]], config: model.CPMConfig, decoding_config: decoding.DecodingConfig,
              window: SlidingWindow | None, bucketed: bool, eod_id: int, pad_id: int, strict: bool
              ) -> tuple[np.ndarray, np.ndarray, tuple]:
  """(left-padded prompts, lengths, the program's setting: the resolved window, whether this batch overflows it,
  the attention spans if `bucketed`). Without a window the prompt and the new tokens must fit the positions (longer
  prompts keep their last tokens); with one, a prompt keeps at most `length` tokens."""
  resolved = window.resolve(config) if window is not None else None
  max_prompt = config.max_positions - decoding_config.max_new_tokens if resolved is None else resolved[0]
  tokens, lengths = decoding.prepare_prompts(prompts, max_prompt, eod_id=eod_id, pad_id=pad_id, strict=strict)
  needed = tokens.shape[1] - 1 + decoding_config.max_new_tokens
  windowed = resolved is not None and needed > resolved[0]
  spans = attention_spans(resolved[0] if windowed else needed) if bucketed else None
  return tokens, lengths, (resolved, windowed, spans)


def generate(params: transformer.DecodeParams, prompts: Sequence[Sequence[int]], config: model.CPMConfig,
             decoding_config: decoding.DecodingConfig, *, eod_id: int, pad_id: int, batch_size: int | None = None,
             strict: bool = False, mesh: jax.sharding.Mesh | None = None, progress: bool = False,
             window: SlidingWindow | None = None, bucketed: bool = False) -> list[list[int]]:
  """CPM-LM continuations (new token ids, without <eod>) of token-id prompts, from `decode_layout(params)`.

  Prompts go in batches of `batch_size` (default: all at once; the last batch is padded so every batch
  has one shape). With `mesh`, the model's activations and the cache are sharded by the logical-axis rules
  (params should already be placed, e.g. by checkpointing.restore_params with shardings). CPM's protocol lets
  <eod> end a text at any step (min_length None -> 0). Without `window`, prompt + new tokens must fit the model's
  positions (longer prompts keep their last tokens); with one, generation goes on past them (`SlidingWindow`).
  bucketed: attention reads only the filled part of the cache, in power-of-two spans (`step_fn`).
  """
  if not prompts:
    return []
  decoding_config = decoding_config.with_min_length_fraction(0.0)
  batch_size = batch_size or len(prompts)
  rng = jax.random.key(decoding_config.seed)
  results = []
  starts = range(0, len(prompts), batch_size)
  for begin in logging_setup.progress(starts, desc="generating", total=len(starts), unit="batches", enabled=progress):
    chunk = list(prompts[begin:begin + batch_size])
    chunk += [[]] * (batch_size - len(chunk))
    tokens, lengths, setting = _prepared(chunk, config, decoding_config, window, bucketed, eod_id, pad_id, strict)
    run = _compiled(config, decoding_config.unseeded(), eod_id, pad_id, *setting, False, mesh)
    with partitioning.on_mesh(mesh):
      out, out_lengths = run(params, tokens, lengths, jax.random.fold_in(rng, begin))
    out, out_lengths = np.asarray(out), np.asarray(out_lengths)
    results += [out[i, :out_lengths[i]].tolist() for i in range(len(prompts[begin:begin + batch_size]))]
  return results


def stream(params: transformer.DecodeParams, prompts: Sequence[Sequence[int]], config: model.CPMConfig,
           decoding_config: decoding.SamplingConfig, *, eod_id: int, pad_id: int, strict: bool = False,
           mesh: jax.sharding.Mesh | None = None, window: SlidingWindow | None = None,
           bucketed: bool = False) -> Iterator[np.ndarray]:
  """The tokens of `generate` for one batch of prompts as they are produced: each step's tokens [batch] (<eod>,
  then pad_id, in rows that have ended), by a host loop over one jitted step (`decoding.DecodeProgram.streamed`)."""
  decoding_config = decoding_config.with_min_length_fraction(0.0)
  tokens, lengths, setting = _prepared(prompts, config, decoding_config, window, bucketed, eod_id, pad_id, strict)
  run = _compiled(config, decoding_config.unseeded(), eod_id, pad_id, *setting, True, mesh)
  return run(params, tokens, lengths, jax.random.key(decoding_config.seed))
