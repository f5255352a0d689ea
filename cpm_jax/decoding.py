"""Prefill + cached incremental decoding on device: sampling and beam search.

The decode loops are generic: they drive any model through a step function

    step_fn(params, tokens [batch, 1], cache) -> (float32 logits [batch, 1, vocab], cache)

over a cache pytree whose leaves carry logical axes (the `batch` axis, or a dimension merging it with minor
ones such as "batch*act_heads", is what beam search reorders and what shards over the mesh's data axes).
Each family's decode module supplies its prefill and step (CPM: the prompt into the cache, one token per step;
PLUG: the encoder once, one decoder token per step). Every loop is a `lax.while_loop` on device: one compiled
program per shape bucket, no Python per token.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import no_repeat_ngram, partitioning

StepFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]
NEG_INF = -1e30  # finite stand-in for -inf in log-space (keeps arithmetic NaN-free)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Greedy or sampled decoding.

  Logits are processed in CPM's order: repetition penalty, then top-k, then top-p (nucleus, on the
  probabilities renormalised over the top-k), then temperature, then a categorical draw. With
  `greedy` the token is the argmax after the repetition penalty. top_k=0 / top_p=1.0 disable them.
  no_repeat_ngram_size=n bans every token that would repeat an n-gram of the row (cpm_jax.no_repeat_ngram);
  suppress_tokens are never produced (transformers' suppress_tokens: their logits are set to -inf first).
  The end token cannot be produced before `min_length` new tokens; None leaves it to the model's release
  protocol (PLUG samples no [SEP] before 80% of max_new_tokens; CPM: 0).
  """

  max_new_tokens: int = 64
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0  # CTRL's: seen tokens' logits divided (if > 0) or multiplied by it
  no_repeat_ngram_size: int = 0
  suppress_tokens: tuple[int, ...] = ()
  min_length: int | None = None
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}; expected >= 1.")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature}; expected > 0 (or greedy=True).")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k}; expected >= 0 (0 disables it).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p}; expected in (0, 1].")
    if self.repetition_penalty <= 0:
      raise ValueError(f"SamplingConfig.repetition_penalty={self.repetition_penalty}; expected > 0.")
    if self.no_repeat_ngram_size < 0:
      raise ValueError(f"SamplingConfig.no_repeat_ngram_size={self.no_repeat_ngram_size}; expected >= 0 (0: off).")
    _check_suppress_tokens(self)
    if self.min_length is not None and not 0 <= self.min_length <= self.max_new_tokens:
      raise ValueError(f"SamplingConfig.min_length={self.min_length}; expected in [0, max_new_tokens="
                       f"{self.max_new_tokens}] (or None).")

  def with_min_length_fraction(self, fraction: float) -> "SamplingConfig":
    """This config with an open min_length (None) filled in by a model's protocol: `fraction` x max_new_tokens
    when sampling, 0 when greedy."""
    if self.min_length is not None:
      return self
    return dataclasses.replace(self, min_length=0 if self.greedy else int(fraction * self.max_new_tokens))

  @property
  def needs_seen_tokens(self) -> bool:
    """Whether `run` needs the prompt's tokens (`seen_tokens`): for the repetition penalty."""
    return self.repetition_penalty != 1.0

  def unseeded(self) -> "SamplingConfig":
    """The config without its seed: what a compiled decoder depends on (the seed is passed as an rng)."""
    return dataclasses.replace(self, seed=0)

  def run(self, step_fn: "StepFn", params: Any, cache: Any, cache_axes: Any, last_tokens: jax.Array, *,
          eod_id: int, pad_id: int, vocab_size: int, rng: jax.Array, seen: jax.Array | None = None,
          history: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(tokens [batch, max_new_tokens], lengths [batch]) by `sample_loop`; history: (tokens, valid) fed before
    last_tokens, for no_repeat_ngram_size."""
    step_fn, cache, _ = no_repeat_ngram.track(self.no_repeat_ngram_size, suppressing_step(self, step_fn), cache,
                                              cache_axes, last_tokens.shape[0], self.max_new_tokens, history,
                                              NEG_INF)
    tokens, lengths, _ = sample_loop(step_fn, params, cache, last_tokens, self, eod_id=eod_id, pad_id=pad_id,
                                     vocab_size=vocab_size, rng=rng, seen=seen)
    return tokens, lengths


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BeamSearchConfig:
  """Beam search scored by log-probability / GNMT length penalty ((5 + length) / 6) ** alpha.

  <eod> is forbidden before `min_length` new tokens. Beams that reach max_new_tokens without <eod>
  compete with the finished ones at that length. no_repeat_ngram_size and suppress_tokens as in SamplingConfig.
  """

  max_new_tokens: int = 64
  beam_size: int = 5
  length_penalty: float = 0.6
  min_length: int = 5
  no_repeat_ngram_size: int = 0
  suppress_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"BeamSearchConfig.max_new_tokens={self.max_new_tokens}; expected >= 1.")
    if self.beam_size < 1:
      raise ValueError(f"BeamSearchConfig.beam_size={self.beam_size}; expected >= 1.")
    if self.length_penalty < 0:
      raise ValueError(f"BeamSearchConfig.length_penalty={self.length_penalty}; expected >= 0.")
    if not 0 <= self.min_length <= self.max_new_tokens:
      raise ValueError(f"BeamSearchConfig.min_length={self.min_length}; expected in [0, max_new_tokens="
                       f"{self.max_new_tokens}].")
    if self.no_repeat_ngram_size < 0:
      raise ValueError(f"BeamSearchConfig.no_repeat_ngram_size={self.no_repeat_ngram_size}; expected >= 0.")
    _check_suppress_tokens(self)

  seed = 0  # beam search draws nothing
  needs_seen_tokens = False

  def with_min_length_fraction(self, fraction: float) -> "BeamSearchConfig":
    del fraction  # min_length is always set
    return self

  def unseeded(self) -> "BeamSearchConfig":
    return self

  def run(self, step_fn: "StepFn", params: Any, cache: Any, cache_axes: Any, last_tokens: jax.Array, *,
          eod_id: int, pad_id: int, vocab_size: int, rng: jax.Array, seen: jax.Array | None = None,
          history: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(best tokens [batch, max_new_tokens], lengths [batch]) by `beam_search_loop`."""
    del vocab_size, rng, seen
    step_fn, cache, cache_axes = no_repeat_ngram.track(self.no_repeat_ngram_size, suppressing_step(self, step_fn),
                                                       cache, cache_axes, last_tokens.shape[0], self.max_new_tokens,
                                                       history, NEG_INF)
    tokens, lengths, _ = beam_search_loop(step_fn, params, cache, cache_axes, last_tokens, self, eod_id=eod_id,
                                          pad_id=pad_id)
    return tokens, lengths


DecodingConfig = SamplingConfig | BeamSearchConfig


# ---- logits processing -------------------------------------------------------------------------

def _check_suppress_tokens(config: "DecodingConfig") -> None:
  """Stores suppress_tokens as a tuple of ints (gin and flags give lists); a negative id is an error."""
  ids = tuple(int(i) for i in config.suppress_tokens)
  object.__setattr__(config, "suppress_tokens", ids)
  if any(i < 0 for i in ids):
    raise ValueError(f"{type(config).__name__}.suppress_tokens={list(ids)}; expected token ids >= 0.")


def suppressing_step(config: "DecodingConfig", step_fn: StepFn) -> StepFn:
  """`step_fn` whose logits are NEG_INF at config.suppress_tokens (an id past the vocabulary is an error);
  `step_fn` itself when there are none."""
  ids = config.suppress_tokens
  if not ids:
    return step_fn

  def step(params, tokens, cache):
    logits, cache = step_fn(params, tokens, cache)
    if max(ids) >= logits.shape[-1]:
      raise ValueError(f"{type(config).__name__}.suppress_tokens={list(ids)}: the model's vocabulary has "
                       f"{logits.shape[-1]} tokens.")
    return logits.at[..., jnp.array(ids)].set(NEG_INF), cache

  return step


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """CTRL's penalty on tokens already in the row (`seen` bool [batch, vocab])."""
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalised, logits)


def choose_tokens(logits: jax.Array, config: SamplingConfig, rng: jax.Array) -> jax.Array:
  """Next tokens [batch] from float32 logits [batch, vocab]: top-k, top-p, temperature, draw."""
  if config.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  vocab = logits.shape[-1]
  k = min(config.top_k or vocab, vocab)
  indices = None
  if k < vocab or config.top_p < 1.0:
    logits, indices = jax.lax.top_k(logits, k)  # sorted, largest first
  if config.top_p < 1.0:
    cumulative = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose probability reaches top_p (the first token always stays).
    before = jnp.pad(cumulative[:, :-1], ((0, 0), (1, 0)))
    logits = jnp.where(before > config.top_p, NEG_INF, logits)
  choice = jax.random.categorical(rng, logits / config.temperature, axis=-1)
  if indices is not None:
    choice = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
  return choice.astype(jnp.int32)


def seen_tokens(tokens: jax.Array, valid: jax.Array, vocab: int) -> jax.Array:
  """bool [batch, vocab]: which ids occur at the valid positions of each row."""
  rows = jnp.arange(tokens.shape[0])[:, None]
  return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, tokens].max(valid)


# ---- generic loops -----------------------------------------------------------------------------

def sample_state(last_tokens: jax.Array, config: SamplingConfig, *, pad_id: int, vocab_size: int,
                 seen: jax.Array | None = None) -> tuple:
  """The loop state of `sample_step` before the first step: (step, tokens [batch, max_new_tokens], last tokens,
  done [batch], seen tokens or None)."""
  batch, penalise = last_tokens.shape[0], config.repetition_penalty != 1.0
  if penalise and seen is None:
    seen = seen_tokens(last_tokens[:, None], jnp.ones((batch, 1), bool), vocab_size)
  return (jnp.zeros((), jnp.int32), jnp.full((batch, config.max_new_tokens), pad_id, jnp.int32),
          last_tokens.astype(jnp.int32), jnp.zeros((batch,), bool), seen if penalise else None)


def sample_step(step_fn: StepFn, params: Any, cache: Any, state: tuple, config: SamplingConfig, *, eod_id: int,
                pad_id: int, rng: jax.Array) -> tuple[Any, tuple]:
  """One token of greedy / sampled decoding: (cache, state) -> (cache, state), state from `sample_state`.

  The body of `sample_loop`'s on-device loop, and what a host loop (`stream_steps`) runs jitted, one call a token.
  config.min_length must be set (`with_min_length_fraction`): <eod> is forbidden before that many new tokens.
  """
  if config.min_length is None:
    raise ValueError("sample_step: SamplingConfig.min_length is None; fill it in with with_min_length_fraction.")
  step, out, last, done, seen = state
  penalise = config.repetition_penalty != 1.0
  logits, cache = step_fn(params, last[:, None], cache)
  logits = logits[:, -1].astype(jnp.float32)
  if penalise:
    logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
  if config.min_length:
    logits = logits.at[:, eod_id].set(jnp.where(step < config.min_length, NEG_INF, logits[:, eod_id]))
  token = choose_tokens(logits, config, jax.random.fold_in(rng, step))
  token = jnp.where(done, pad_id, token)
  if penalise:
    seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
  out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
  return cache, (step + 1, out, token, done | (token == eod_id), seen)


def sample_loop(step_fn: StepFn, params: Any, cache: Any, last_tokens: jax.Array, config: SamplingConfig,
                *, eod_id: int, pad_id: int, vocab_size: int, rng: jax.Array,
                seen: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
  """Greedy / sampled decoding on device until every row has produced <eod> or max_new_tokens.

  last_tokens [batch]: the token each row feeds first (the last prompt token, whose predecessors are
  already in `cache`). seen: bool [batch, vocab] of prompt tokens, needed for a repetition penalty.
  Returns tokens [batch, max_new_tokens] (pad_id after a row's <eod>), lengths [batch] (new tokens
  before <eod>) and the final cache.
  """
  def cond(carry):
    step, _, _, done, _ = carry[1]
    return (step < config.max_new_tokens) & ~done.all()

  def body(carry):
    return sample_step(step_fn, params, *carry, config, eod_id=eod_id, pad_id=pad_id, rng=rng)

  state = sample_state(last_tokens, config, pad_id=pad_id, vocab_size=vocab_size, seen=seen)
  cache, (_, out, _, _, _) = jax.lax.while_loop(cond, body, (cache, state))
  return out, _lengths(out, eod_id), cache


def stream_steps(step: Callable[[Any, tuple], tuple[Any, tuple]], cache: Any, state: tuple,
                 max_new_tokens: int) -> Iterator[np.ndarray]:
  """A host loop over a jitted `step(cache, state) -> (cache, state)` (a closure of `sample_step`, its cache
  donated): yields each step's tokens [batch] as numpy (pad_id in rows that have ended) until every row has ended
  or max_new_tokens. Step t + 1 is dispatched before step t's tokens are read, so the device never waits for the
  host; closing the generator stops it.
  """
  pending = None
  for _ in range(max_new_tokens):
    cache, state = step(cache, state)
    if pending is not None:
      tokens, done = jax.device_get(pending)
      yield tokens
      if done.all():
        return
    pending = state[2], state[3]
  if pending is not None:
    yield jax.device_get(pending[0])


def _lengths(tokens: jax.Array, eod_id: int) -> jax.Array:
  """New tokens before the first <eod> of each row (all of them if there is none)."""
  stop = tokens == eod_id
  return jnp.where(stop.any(-1), jnp.argmax(stop, -1), tokens.shape[-1]).astype(jnp.int32)


def map_batch(fn: Callable[[jax.Array, int], jax.Array], cache: Any, cache_axes: Any, batch: int) -> Any:
  """Applies fn(leaf, batch_axis) to every cache leaf with a `batch` logical axis, of size `batch`.

  A dimension that merges batch with minor axes ("batch*act_heads", [batch * heads]) is split for fn and
  merged again.
  """
  def apply(axes, leaf):
    for axis, name in enumerate(axes):
      if name == "batch":
        return fn(leaf, axis)
      if name is not None and name.startswith("batch*"):
        out = fn(leaf.reshape(*leaf.shape[:axis], batch, -1, *leaf.shape[axis + 1:]), axis)
        return out.reshape(*out.shape[:axis], -1, *out.shape[axis + 2:])
    return leaf
  return jax.tree.map(apply, cache_axes, cache, is_leaf=partitioning.is_logical_axes)


def _gnmt_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


def beam_search_loop(step_fn: StepFn, params: Any, cache: Any, cache_axes: Any, last_tokens: jax.Array,
                     config: BeamSearchConfig, *, eod_id: int, pad_id: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search over `step_fn`; cache and last_tokens hold one row per example (beams are made here).

  Returns the best hypothesis per example: tokens [batch, max_new_tokens] (<eod> then pad_id),
  lengths [batch] (new tokens before <eod>) and scores [batch] (log-prob / length penalty).
  """
  batch, beams, steps = last_tokens.shape[0], config.beam_size, config.max_new_tokens
  cache = map_batch(lambda x, axis: jnp.repeat(x, beams, axis=axis), cache, cache_axes, batch)
  last = jnp.repeat(last_tokens.astype(jnp.int32), beams)
  live_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch, 1))
  live = jnp.full((batch, beams, steps), pad_id, jnp.int32)
  finished = jnp.full((batch, beams, steps), pad_id, jnp.int32)
  finished_scores = jnp.full((batch, beams), NEG_INF, jnp.float32)
  final_penalty = _gnmt_penalty(steps, config.length_penalty)

  def cond(state):
    step, _, live_logp, _, finished_scores, _, _ = state
    # Scores only fall with length, so a live beam can at best reach its log-prob / the largest penalty.
    hopeless = finished_scores.min(-1) > live_logp.max(-1) / final_penalty
    return (step < steps) & ~hopeless.all()

  def body(state):
    step, live, live_logp, finished, finished_scores, last, cache = state
    logits, cache = step_fn(params, last[:, None], cache)
    logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    vocab = logp.shape[-1]
    logp = jnp.where((step < config.min_length) & (jnp.arange(vocab) == eod_id), NEG_INF, logp)
    candidates = (live_logp[:, :, None] + logp.reshape(batch, beams, vocab)).reshape(batch, beams * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * beams)
    top_beam, top_token = top_index // vocab, top_index % vocab
    top_seqs = jnp.take_along_axis(live, top_beam[:, :, None], axis=1)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, top_token[:, :, None], step, axis=2)
    ended = top_token == eod_id

    # Finished: merge the new <eod> hypotheses into the kept ones.
    ended_real = ended & (top_logp > NEG_INF / 2)  # not an expansion of an empty initial beam
    new_scores = jnp.where(ended_real, top_logp / _gnmt_penalty(step + 1, config.length_penalty), NEG_INF)
    pool_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    finished_scores, keep = jax.lax.top_k(pool_scores, beams)
    finished = jnp.take_along_axis(jnp.concatenate([finished, top_seqs], axis=1), keep[:, :, None], axis=1)

    # Live: the best candidates that did not end.
    live_logp, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logp), beams)
    live = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
    source = jnp.take_along_axis(top_beam, keep, axis=1) + jnp.arange(batch)[:, None] * beams
    cache = map_batch(lambda x, axis: jnp.take(x, source.reshape(-1), axis=axis), cache, cache_axes, batch * beams)
    last = jnp.take_along_axis(top_token, keep, axis=1).reshape(-1)
    return step + 1, live, live_logp, finished, finished_scores, last, cache

  state = (jnp.zeros((), jnp.int32), live, live_logp, finished, finished_scores, last, cache)
  step, live, live_logp, finished, finished_scores, _, _ = jax.lax.while_loop(cond, body, state)
  # Live beams still running at the end compete at their current length.
  live_scores = jnp.where(live_logp > NEG_INF / 2, live_logp / _gnmt_penalty(step, config.length_penalty),
                          NEG_INF)
  scores = jnp.concatenate([finished_scores, live_scores], axis=1)
  best = jnp.argmax(scores, axis=1)
  tokens = jnp.take_along_axis(jnp.concatenate([finished, live], axis=1), best[:, None, None], axis=1)[:, 0]
  return tokens, _lengths(tokens, eod_id), jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


# ---- a family's decoding, compiled ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeProgram:
  """What a family decodes with: `prefill(params, *inputs) -> (cache, first tokens [batch], seen tokens or None,
  history or None)` (history: the (tokens, valid) fed before the first token, for no_repeat_ngram_size), the step
  function the loops call, and the cache's logical axes. `compiled` and `streamed` make the two ways to
  run it; families build one per setting (and cache it) in their decode.py."""

  prefill: Callable[..., tuple[Any, jax.Array, jax.Array | None]]
  step: StepFn
  cache_axes: Any

  def compiled(self, config: DecodingConfig, *, eod_id: int, pad_id: int, vocab_size: int) -> Callable:
    """Jitted (params, *inputs, rng) -> (tokens [batch, max_new_tokens], lengths [batch]): prefill and the whole
    loop on device, one program per input shape."""
    def run(params, *inputs_and_rng):
      *inputs, rng = inputs_and_rng
      cache, first, seen, history = self.prefill(params, *inputs)
      return config.run(self.step, params, cache, self.cache_axes, first, eod_id=eod_id, pad_id=pad_id,
                        vocab_size=vocab_size, rng=rng, seen=seen, history=history)
    return jax.jit(run)

  def streamed(self, config: SamplingConfig, *, eod_id: int, pad_id: int, vocab_size: int,
               mesh: jax.sharding.Mesh | None = None) -> Callable[..., Iterator[np.ndarray]]:
    """(params, *inputs, rng) -> each step's tokens [batch] as they are produced (`stream_steps`: a host loop over
    one jitted `sample_step` that donates the cache), under `mesh`'s sharding rules."""
    size = config.no_repeat_ngram_size

    def begin(params, *inputs):
      cache, first, seen, history = self.prefill(params, *inputs)
      cache, _ = no_repeat_ngram.with_history(size, cache, self.cache_axes, first.shape[0], config.max_new_tokens,
                                              history)
      return cache, sample_state(first, config, pad_id=pad_id, vocab_size=vocab_size, seen=seen)

    begin = jax.jit(begin)
    banning = no_repeat_ngram.banning_step(size, suppressing_step(config, self.step), NEG_INF)
    step = jax.jit(lambda params, cache, state, rng: sample_step(banning, params, cache, state, config,
                                                                 eod_id=eod_id, pad_id=pad_id, rng=rng),
                   donate_argnums=1)

    def stream(params, *inputs_and_rng):
      *inputs, rng = inputs_and_rng

      def one_step(cache, state):
        with partitioning.on_mesh(mesh):
          return step(params, cache, state, rng)

      with partitioning.on_mesh(mesh):
        cache, state = begin(params, *inputs)
      return stream_steps(one_step, cache, state, config.max_new_tokens)
    return stream


# ---- stopping on the host: stop strings, sentences, time ----------------------------------------

CLOSING_MARKS = "”’」』）)]】》\"'"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StopCriteria:
  """Ends a text before max_new_tokens (besides <eod>, which the loops stop on themselves): at the first of
  `stop_strings` (kept, like transformers' stop_strings), after `max_sentences` sentences (a run of
  `sentence_ends` and the closing quotes or brackets after it), or after `max_seconds` of decoding. They need the
  text, so they run on the host, between the steps of a streamed generation (`TextStreams`)."""

  stop_strings: tuple[str, ...] = ()
  max_sentences: int | None = None
  max_seconds: float | None = None
  sentence_ends: str = "。！？!?…"

  def __post_init__(self):
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
    if any(not s for s in self.stop_strings):
      raise ValueError("StopCriteria.stop_strings holds an empty string; every stop string needs a character.")
    if self.max_sentences is not None and self.max_sentences < 1:
      raise ValueError(f"StopCriteria.max_sentences={self.max_sentences}; expected >= 1 (or None).")
    if self.max_seconds is not None and self.max_seconds <= 0:
      raise ValueError(f"StopCriteria.max_seconds={self.max_seconds}; expected > 0 (or None).")

  @property
  def active(self) -> bool:
    """Whether any criterion is set (else the on-device loops, which stop on <eod>, need no host)."""
    return bool(self.stop_strings) or self.max_sentences is not None or self.max_seconds is not None

  def text_end(self, text: str) -> int | None:
    """The length of `text` to keep if a stop string or the sentence count ends it, else None. A sentence counts
    as ended only once a character other than an end mark or a closing mark follows (a closing quote may still
    come)."""
    ends = [i + len(s) for s in self.stop_strings if (i := text.find(s)) >= 0]
    if self.max_sentences is not None:
      count, i = 0, 0
      while i < len(text):
        if text[i] in self.sentence_ends:
          while i < len(text) and text[i] in self.sentence_ends:
            i += 1
          while i < len(text) and text[i] in CLOSING_MARKS:
            i += 1
          if i == len(text):
            break  # what follows is not known yet
          count += 1
          if count == self.max_sentences:
            ends.append(i)
            break
        else:
          i += 1
    return min(ends) if ends else None


class TextStreams:
  """The texts of a streamed batch, token by token: `add(tokens)` takes one step's tokens [batch] and returns the
  new text of each row; a row ends at <eod> or by `stop` (its text cut there). `texts` are the final texts;
  `finished` says when every row has ended (or max_seconds has passed since the first step)."""

  def __init__(self, batch: int, decode: Callable[[Sequence[int]], str], stop: StopCriteria, *, eod_id: int,
               clock: Callable[[], float] = time.monotonic):
    self._decode, self._stop, self._eod_id, self._clock = decode, stop, eod_id, clock
    self._ids: list[list[int]] = [[] for _ in range(batch)]
    self._ended = [False] * batch
    self.texts = [""] * batch
    self._started: float | None = None
    self._timed_out = False

  @property
  def finished(self) -> bool:
    return self._timed_out or all(self._ended)

  def tokens(self) -> list[list[int]]:
    """Each row's ids so far (without <eod>)."""
    return [list(ids) for ids in self._ids]

  def add(self, tokens: Sequence[int]) -> list[str]:
    if self._started is None:
      self._started = self._clock()
    pieces = []
    for row, token in enumerate(tokens):
      piece = ""
      if not self._ended[row]:
        if int(token) == self._eod_id:
          self._ended[row] = True
        else:
          self._ids[row].append(int(token))
          text = self._decode(self._ids[row])
          end = self._stop.text_end(text)
          if end is not None:
            text, self._ended[row] = text[:end], True
          if text.startswith(self.texts[row]):
            piece = text[len(self.texts[row]):]
          self.texts[row] = text
      pieces.append(piece)
    if self._stop.max_seconds is not None and self._clock() - self._started >= self._stop.max_seconds:
      self._timed_out = True
    return pieces


# ---- host side: prompts in, token lists out ------------------------------------------------------

def bucket_width(length: int, maximum: int, minimum: int = 8) -> int:
  """The power-of-two width (at least `minimum`, at most `maximum`) that holds `length` tokens: padding inputs
  to it keeps the compiled shapes few."""
  return min(max(minimum, 1 << (max(int(length), 1) - 1).bit_length()), maximum)


def prepare_prompts(prompts: Sequence[Sequence[int]], max_prompt_length: int, *, eod_id: int, pad_id: int,
                    strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into [batch, width] (width a power-of-two bucket) and their lengths.

  An empty prompt becomes [eod_id] (generation then starts a fresh document). A prompt longer than
  max_prompt_length keeps its last max_prompt_length tokens with a warning, or raises when strict.
  """
  if max_prompt_length < 1:
    raise ValueError(f"No room for a prompt: max_prompt_length={max_prompt_length}; lower max_new_tokens or "
                     "generate past the model's window (cpm.SlidingWindow, generate.py --long_text).")
  rows = []
  for i, prompt in enumerate(prompts):
    prompt = [int(t) for t in prompt] or [eod_id]
    if len(prompt) > max_prompt_length:
      message = f"Prompt {i} has {len(prompt)} tokens but only {max_prompt_length} fit"
      if strict:
        raise ValueError(message + "; shorten it, lower max_new_tokens or generate past the window.")
      logging.warning("%s; keeping its last %d tokens.", message, max_prompt_length)
      prompt = prompt[-max_prompt_length:]
    rows.append(prompt)
  longest = max(len(row) for row in rows)
  width = bucket_width(longest, max(longest, max_prompt_length))
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):] = row
  return tokens, np.array([len(row) for row in rows], np.int32)


