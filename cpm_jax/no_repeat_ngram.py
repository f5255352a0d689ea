"""No-repeat n-gram blocking for the decoding loops (cpm_jax.decoding), as transformers' no_repeat_ngram_size.

A token that would complete an n-gram the row already holds gets no probability; the row is every token the model
has been fed (for CPM the prompt, then the generated tokens; for an encoder-decoder the decoder's tokens from its
start token), which is transformers' `input_ids` for NoRepeatNGramLogitsProcessor.

The loops are not changed: `track` wraps a family's step function so that its cache also carries that history and
the logits it returns have the banned tokens at a large negative value. Sampling then draws as transformers does
(the processor runs on the logits); beam search takes the log-softmax after the ban, so a beam's log-probabilities
are renormalised over the allowed tokens (transformers bans after its log-softmax and does not renormalise).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def banned_tokens(tokens: jax.Array, valid: jax.Array, end: jax.Array | int, size: int, vocab: int) -> jax.Array:
  """bool [batch, vocab]: the tokens that would complete an n-gram (n = `size`) already in each row.

  tokens, valid [batch, width]: a row's sequence is its valid tokens in columns before `end` (left padding
  invalid); its last size - 1 tokens are the prefix an earlier n-gram must share.
  """
  batch, width = tokens.shape
  banned = jnp.zeros((batch, vocab), bool)
  if size > width:
    return banned
  windows = width - size + 1  # n-grams starting at columns 0 .. windows - 1
  prefix = jax.lax.dynamic_slice_in_dim(tokens, end - (size - 1), size - 1, axis=1)
  prefix_valid = jax.lax.dynamic_slice_in_dim(valid, end - (size - 1), size - 1, axis=1).all(1, keepdims=True)
  match = prefix_valid & (end - (size - 1) >= 0) & (jnp.arange(windows) + size - 1 < end)[None, :]
  for k in range(size):
    match &= valid[:, k:k + windows]
  for k in range(size - 1):
    match &= tokens[:, k:k + windows] == prefix[:, k:k + 1]
  return banned.at[jnp.arange(batch)[:, None], tokens[:, size - 1:size - 1 + windows]].max(match)


def track(size: int, step_fn: Callable, cache: Any, cache_axes: Any, batch: int, max_new_tokens: int,
          history: tuple[jax.Array, jax.Array] | None, banned_logit: float) -> tuple[Callable, Any, Any]:
  """(step_fn, cache, cache_axes) that also ban repeated n-grams of `size` tokens; unchanged when size is 0.

  history: (tokens, valid) [batch, width] the model was fed before the loop's first token (CPM: the prompt but
  its last token), or None when the loop's first token starts the row. The loops may feed max_new_tokens tokens.
  """
  return (banning_step(size, step_fn, banned_logit),
          *with_history(size, cache, cache_axes, batch, max_new_tokens, history))


def with_history(size: int, cache: Any, cache_axes: Any, batch: int, max_new_tokens: int,
                 history: tuple[jax.Array, jax.Array] | None) -> tuple[Any, Any]:
  """(cache, cache_axes) of `banning_step`: the family's cache and the row's tokens so far (see `track`)."""
  if not size:
    return cache, cache_axes
  if history is None:
    history = (jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), bool))
  fed, fed_valid = history
  state = {"inner": cache, "end": jnp.asarray(fed.shape[1], jnp.int32),
           "tokens": jnp.pad(fed.astype(jnp.int32), ((0, 0), (0, max_new_tokens))),
           "valid": jnp.pad(fed_valid.astype(bool), ((0, 0), (0, max_new_tokens)))}
  return state, {"inner": cache_axes, "end": (), "tokens": ("batch", None), "valid": ("batch", None)}


def banning_step(size: int, step_fn: Callable, banned_logit: float) -> Callable:
  """`step_fn` over `with_history`'s cache, its logits with the tokens that would repeat an n-gram set to
  banned_logit; `step_fn` itself when size is 0."""
  if not size:
    return step_fn

  def step(params, tokens, state):
    end = state["end"]
    history = jax.lax.dynamic_update_slice_in_dim(state["tokens"], tokens.astype(jnp.int32), end, axis=1)
    valid = jax.lax.dynamic_update_slice_in_dim(state["valid"], jnp.ones(tokens.shape, bool), end, axis=1)
    logits, inner = step_fn(params, tokens, state["inner"])
    banned = banned_tokens(history, valid, end + 1, size, logits.shape[-1])
    logits = jnp.where(banned[:, None, :], banned_logit, logits)
    return logits, {"inner": inner, "end": end + 1, "tokens": history, "valid": valid}

  return step
