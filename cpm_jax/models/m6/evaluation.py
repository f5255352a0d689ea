"""M6 behind the evaluation interface (cpm_jax.evaluation.interface.LanguageModel): text about images
(`describe`: captions, answers to questions) and text from a prompt alone (`generate`: text-to-text), both through
the shared decoding loops. Prompts are the text prefix's middle: generation starts after "<bos> prompt <sep>".
M6 scores no continuations here: tasks that need `score` fail with a clear error.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from cpm_jax import decoding
from cpm_jax.data import images
from cpm_jax.evaluation.interface import LanguageModel, unsupported
from cpm_jax.models.m6 import decode, model
from cpm_jax.models.m6.vocab import CharVocab, check_fits


def language_model(params: dict, config: model.M6Config, tokenizer: CharVocab, metadata: dict, *,
                   batch_size: int = 8, decoding_config: decoding.DecodingConfig | None = None, mesh=None,
                   strict: bool = False, progress: bool = False) -> LanguageModel:
  """M6 behind the LanguageModel interface (greedy decoding of 64 tokens unless told otherwise).

  describe(images, prompts): one stored uint8 image per prompt, resized as in training
  (cpm_jax.data.images.model_input); a model of patch_encoder "features" takes no images here (its features come
  from the user's extractor: call decode.generate with image_inputs).
  """
  del metadata  # M6 records nothing that changes how it is evaluated
  check_fits(tokenizer, config.vocab_size, "M6 tokenizer")
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)
  decode_params = functools.cache(lambda: decode.decode_layout(params))  # one copy for every generate call
  run = functools.partial(decode.generate, config=config, decoding_config=decoding_config, vocab=tokenizer,
                          batch_size=batch_size, strict=strict, mesh=mesh, progress=progress)

  def generate(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    return run(decode_params(), prompts)

  def describe(stored: Sequence[np.ndarray], prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if config.patch_encoder == "features":
      raise ValueError("This M6 reads precomputed patch features (patch_encoder 'features'), not images; call "
                       "cpm_jax.models.m6.generate with image_inputs from your feature extractor.")
    inputs = np.stack([images.model_input(image, config.image_size) for image in stored])
    return run(decode_params(), prompts, image_inputs=inputs)

  return LanguageModel(tokenizer, unsupported("score continuations", "M6"), generate, continues_prompt=False,
                       describe=describe)
