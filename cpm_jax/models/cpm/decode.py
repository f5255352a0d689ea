"""CPM-LM's decoding adapter for the shared loops (cpm_jax.decoding): the decode layout, prefill, one cached step,
and `generate` from token-id prompts.

Decoding runs on `transformer.DecodeParams` made once by `decode_layout` (per-layer blocks, [out, in] weights):
callers that generate repeatedly convert once and pass the result.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding, logging_setup, partitioning, transformer
from cpm_jax.models.cpm import model


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


def step_fn(config: model.CPMConfig) -> decoding.StepFn:
  """One cached CPM step: tokens [batch, 1] at each row's next position."""
  def step(params, tokens, cache):
    position = cache["position"]
    hidden, lm = model.cached_hidden_states(params, tokens, config, cache["lm"], positions=position[:, None],
                                            segment_ids=jnp.ones_like(tokens))
    return model.logits_from_hidden(params.tree, hidden, config), {"lm": lm, "position": position + 1}
  return step


@functools.lru_cache(maxsize=None)
def _decoder(config: model.CPMConfig, decoding_config: decoding.DecodingConfig, eod_id: int, pad_id: int, mesh):
  """Jitted (decode params, prompts, lengths, rng) -> (tokens, lengths) for one model/decoding setting (compiled
  per shape bucket); one per mesh, since the mesh in force when it is traced shapes its sharding constraints."""
  del mesh
  step = step_fn(config)

  def run(params, prompts, lengths, rng):
    cache_length = prompts.shape[1] - 1 + decoding_config.max_new_tokens
    cache, last = prefill(params, prompts, lengths, config, cache_length)
    valid = jnp.arange(prompts.shape[1])[None, :] >= prompts.shape[1] - lengths[:, None]
    seen = decoding.seen_tokens(prompts, valid, config.vocab_size) if decoding_config.needs_seen_tokens else None
    return decoding_config.run(step, params, cache, cache_logical_axes(config), last, eod_id=eod_id,
                               pad_id=pad_id, vocab_size=config.vocab_size, rng=rng, seen=seen,
                               history=(prompts[:, :-1], valid[:, :-1]))

  return jax.jit(run)


def generate(params: transformer.DecodeParams, prompts: Sequence[Sequence[int]], config: model.CPMConfig,
             decoding_config: decoding.DecodingConfig, *, eod_id: int, pad_id: int, batch_size: int | None = None,
             strict: bool = False, mesh: jax.sharding.Mesh | None = None,
             progress: bool = False) -> list[list[int]]:
  """CPM-LM continuations (new token ids, without <eod>) of token-id prompts, from `decode_layout(params)`.

  Prompts go in batches of `batch_size` (default: all at once; the last batch is padded so every batch
  has one shape). With `mesh`, the model's activations and the cache are sharded by the logical-axis rules
  (params should already be placed, e.g. by checkpointing.restore_params with shardings). CPM's protocol lets
  <eod> end a text at any step (min_length None -> 0).
  """
  if not prompts:
    return []
  max_prompt = config.max_positions - decoding_config.max_new_tokens
  batch_size = batch_size or len(prompts)
  rng = jax.random.key(decoding_config.seed)
  run = _decoder(config, decoding_config.with_min_length_fraction(0.0).unseeded(), eod_id, pad_id, mesh)
  results = []
  starts = range(0, len(prompts), batch_size)
  for start in logging_setup.progress(starts, desc="generating", total=len(starts), unit="batches", enabled=progress):
    chunk = list(prompts[start:start + batch_size])
    chunk += [[]] * (batch_size - len(chunk))
    tokens, lengths = decoding.prepare_prompts(chunk, max_prompt, eod_id=eod_id, pad_id=pad_id, strict=strict)
    with partitioning.on_mesh(mesh):
      out, out_lengths = run(params, tokens, lengths, jax.random.fold_in(rng, start))
    out, out_lengths = np.asarray(out), np.asarray(out_lengths)
    results += [out[i, :out_lengths[i]].tolist() for i in range(len(prompts[start:start + batch_size]))]
  return results
