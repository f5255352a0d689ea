"""CPM-LM behind the evaluation interface (cpm_jax.evaluation.interface.LanguageModel): scoring continuations by
log-likelihood and generating continuations."""

from __future__ import annotations

import functools
from typing import Any

import jax

from cpm_jax import decoding, serving_weights, tokenization
from cpm_jax.evaluation import batching, scoring
from cpm_jax.evaluation.interface import TOKENIZER_SOURCE, LanguageModel
from cpm_jax.models.cpm import decode, model


def score_fn(config: model.CPMConfig, forward=model.forward) -> scoring.ScoreFn:
  """Jitted (params, batch) -> scoring.continuation_log_likelihood for CPM-LM (or another forward pass of CPM's
  signature, e.g. CPM-XL's)."""
  def score(params, batch):
    logits = forward(params, batch["inputs"], config, positions=batch["positions"], segment_ids=batch["segment_ids"])
    return scoring.continuation_log_likelihood(logits, batch["targets"], batch["weights"])
  return jax.jit(score)


def served_score_fn(config: model.CPMConfig) -> scoring.ScoreFn:
  """`score_fn` over params in a served decode layout (`decode.served_logits`)."""
  def score(params, batch):
    logits = decode.served_logits(params, batch["inputs"], config, positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
    return scoring.continuation_log_likelihood(logits, batch["targets"], batch["weights"])
  return jax.jit(score)


def language_model(params: dict, config: model.CPMConfig, tokenizer: Any, metadata: dict, *, batch_size: int = 8,
                   decoding_config: decoding.DecodingConfig | None = None, mesh=None, strict: bool = False,
                   progress: bool = False, weights: str | None = None, long_text: bool = False) -> LanguageModel:
  """CPM-LM behind the LanguageModel interface (greedy decoding of 64 tokens unless told otherwise).

  weights: "bfloat16" / "int8" / "w8a8" serve the params converted once (cpm_jax.serving_weights; scoring uses the
  same numbers: `serving_weights.round_trip`'s, or for w8a8 the served decode path's). long_text: generation goes
  on past the model's positions by a sliding window (gin `SlidingWindow`).
  """
  del metadata  # CPM records nothing that changes how it is evaluated
  tokenization.check_fits(tokenizer.vocab_size, tokenizer.model_path, config.vocab_size, TOKENIZER_SOURCE)
  served_layout = serving_weights.serving_layout(decode.decode_layout, weights, decode.QUANTIZED)
  runner = batching.ModelRunner(params, served_layout, batch_size, mesh, progress)
  if weights in serving_weights.ROUND_TRIPS:
    score = score_fn(config)
    scored = functools.cache(lambda: serving_weights.round_trip(params, weights, decode.QUANTIZED))
  else:
    score, scored = served_score_fn(config), lambda: runner.decode_params
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)
  window = decode.SlidingWindow() if long_text else None

  def score_requests(requests, names=None):
    return scoring.score_requests(score, scored(), requests, max_length=config.max_positions,
                                  batch_size=batch_size, pad_id=tokenizer.pad_id, strict=strict, progress=progress,
                                  names=names, mesh=mesh)

  def generate(prompts):  # decode.generate batches itself, with a seed per batch
    return decode.generate(runner.decode_params, prompts, config, decoding_config, eod_id=tokenizer.eod_id,
                           pad_id=tokenizer.pad_id, batch_size=batch_size, strict=strict, mesh=mesh,
                           progress=progress, window=window)

  def stream(prompts):
    return decode.stream(runner.decode_params, prompts, config, decoding_config, eod_id=tokenizer.eod_id,
                         pad_id=tokenizer.pad_id, strict=strict, mesh=mesh, window=window)

  return LanguageModel(tokenizer, score_requests, generate, stream=stream)
