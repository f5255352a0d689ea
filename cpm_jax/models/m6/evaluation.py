"""M6 behind the evaluation interface (cpm_jax.evaluation.interface.LanguageModel): text about images
(`describe`: captions, answers to questions) and text from a prompt alone (`generate`: text-to-text), both through
the shared decoding loops; prompts are the text prefix's middle: generation starts after "<bos> prompt <sep>".
`score` reads text as M6's plain causal LM task does ("<bos> context continuation", no image, no prefix), so
lm_score and label-prompt tasks run on M6 too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import jax
import jax.numpy as jnp

from cpm_jax import decoding, tokenization
from cpm_jax.data import images
from cpm_jax.evaluation import batching, scoring
from cpm_jax.evaluation.interface import TOKENIZER_SOURCE, LanguageModel
from cpm_jax.models.m6 import decode, model
from cpm_jax.models.m6.vocab import CharVocab


def score_fn(config: model.M6Config) -> scoring.ScoreFn:
  """Jitted (params, batch) -> scoring.continuation_log_likelihood of text-only causal-LM rows."""
  def score(params, batch):
    rows = batch["inputs"].shape[0]
    logits = model.forward(params, jnp.zeros(config.image_input_shape(rows), config.compute_dtype), batch["inputs"],
                           config, has_image=jnp.zeros(rows, jnp.int32), prefix_lengths=jnp.zeros(rows, jnp.int32),
                           segment_ids=batch["segment_ids"], positions=batch["positions"])
    return scoring.continuation_log_likelihood(logits, batch["targets"], batch["weights"])
  return jax.jit(score)


def language_model(params: dict, config: model.M6Config, tokenizer: CharVocab, metadata: dict, *,
                   batch_size: int = 8, decoding_config: decoding.DecodingConfig | None = None, mesh=None,
                   strict: bool = False, progress: bool = False, weights: str | None = None,
                   long_text: bool = False) -> LanguageModel:
  """M6 behind the LanguageModel interface (greedy decoding of 64 tokens unless told otherwise). It serves its
  stored weights within its positions: `weights` and `long_text` must be left unset.

  describe(images, prompts): one stored uint8 image per prompt, resized as in training
  (cpm_jax.data.images.model_input); a model of patch_encoder "features" takes no images here (its features come
  from the user's extractor: call decode.generate with image_inputs).
  """
  del metadata  # M6 records nothing that changes how it is evaluated
  if weights is not None or long_text:
    raise ValueError(f"--weights={weights} / --long_text={long_text}: an M6 model serves its stored weights within "
                     "its positions.")
  tokenization.check_fits(tokenizer.vocab_size, tokenizer.path, config.vocab_size, TOKENIZER_SOURCE)
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)
  runner = batching.ModelRunner(params, decode.decode_layout, batch_size, mesh, progress)
  score = score_fn(config)

  def score_requests(requests, names=None):
    requests = [([tokenizer.bos_id, *context], continuation) for context, continuation in requests]
    return scoring.score_requests(score, params, requests, max_length=config.max_text_positions,
                                  batch_size=batch_size, pad_id=tokenizer.pad_id, strict=strict, progress=progress,
                                  names=names, mesh=mesh)

  def run(prompts: Sequence[Sequence[int]], image_inputs: np.ndarray | None = None) -> list[list[int]]:
    # decode.generate batches itself, with a seed per batch
    return decode.generate(runner.decode_params, prompts, config, decoding_config, tokenizer,
                           image_inputs=image_inputs, batch_size=batch_size, strict=strict, mesh=mesh,
                           progress=progress)

  def generate(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    return run(prompts)

  def describe(stored: Sequence[np.ndarray], prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if config.patch_encoder == "features":
      raise ValueError("This M6 reads precomputed patch features (patch_encoder 'features'), not images; call "
                       "cpm_jax.models.m6.generate with image_inputs from your feature extractor.")
    inputs = np.stack([images.model_input(image, config.image_size) for image in stored])
    return run(prompts, inputs)

  return LanguageModel(tokenizer, score_requests, generate, continues_prompt=False, describe=describe)
