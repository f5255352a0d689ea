"""What tasks need from a model: a tokenizer, request scoring, generation and (classifiers) classification."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from cpm_jax.evaluation.scoring import Request


@dataclasses.dataclass
class LanguageModel:
  """A tokenizer (encode/decode/eod_id/pad_id) and what the model can do, as tasks use it.

  score(requests, names) -> (total log-likelihoods, scored-token counts); generate(prompt ids) -> new ids;
  classify(texts: one tuple of text fields per example) -> class logits [n, classes], or None for a model
  without a classification head; embed(texts) -> sentence embeddings [n, dim] (few-shot kNN), or None. A model that
  cannot score or generate raises a ValueError saying so.
  continues_prompt: whether generations continue the prompt's text (CPM) or answer it (PLUG's decoder).
  describe(images: one stored uint8 image [h, w, c] per prompt, prompt ids) -> new ids about each image (image-text
  models such as M6; None for text-only models).
  """

  tokenizer: Any
  score: Callable[[Sequence[Request], Sequence[str] | None], tuple[np.ndarray, np.ndarray]]
  generate: Callable[[Sequence[Sequence[int]]], list[list[int]]]
  classify: Callable[[Sequence[Sequence[str]]], np.ndarray] | None = None
  labels: Sequence[str] = ()  # what classify's classes mean (as the checkpoint records them)
  continues_prompt: bool = True
  describe: Callable[[Sequence[np.ndarray], Sequence[Sequence[int]]], list[list[int]]] | None = None
  embed: Callable[[Sequence[Sequence[str]]], np.ndarray] | None = None

  def generate_text(self, prompts: Sequence[str]) -> list[str]:
    """Decoded continuations of text prompts."""
    return [self.tokenizer.decode(ids) for ids in self.generate([self.tokenizer.encode(p) for p in prompts])]

  def describe_text(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
    """Decoded generations about each image from its text prompt ("" captions it); image-text models only."""
    if self.describe is None:
      raise ValueError("This model reads no images (describe is None): generating from an image needs an "
                       "image-text model such as M6.")
    return [self.tokenizer.decode(ids) for ids in self.describe(images, [self.tokenizer.encode(p) for p in prompts])]


def unsupported(what: str, model: str) -> Callable:
  """A LanguageModel entry for something `model` cannot do: raises a clear error when a task calls it."""
  def fail(*args, **kwargs):
    raise ValueError(f"{model} cannot {what}; use a task that does not need it.")
  return fail
