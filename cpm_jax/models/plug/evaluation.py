"""PLUG behind the LanguageModel interface: generation with its decoder, classification with its [CLS] head.

Prompts are encoder inputs: "a[SEP]b" is encoded as [CLS] a [SEP] b [SEP] with token types 0 / 1, as
`plug.data.Seq2SeqData` builds fine-tuning sources (e.g. a task template '{answer}[SEP]{context}').
PLUG scores no continuations: tasks that need `score` fail with a clear error.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cpm_jax import decoding, partitioning
from cpm_jax.evaluation.interface import LanguageModel, unsupported
from cpm_jax.models.plug import decode
from cpm_jax.models.plug import model as plug
from cpm_jax.tokenization import BertTokenizer


class PromptTokenizer:
  """BertTokenizer as tasks use a tokenizer: encode(prompt) -> encoder ids, decode(ids) -> text, eod_id = [SEP].

  Prompts longer than `max_length` keep their start ([CLS] a [SEP] ...) with a warning, or fail if `strict`.
  """

  def __init__(self, bert: BertTokenizer, max_length: int, strict: bool = False):
    self.bert, self.max_length, self.strict = bert, max_length, strict
    self.eod_id, self.pad_id = bert.sep_id, bert.pad_id

  def encode(self, text: str) -> list[int]:
    first, sep, rest = text.partition("[SEP]")
    pair = rest if sep else None
    ids = self.bert.encode(first, pair)["input_ids"]
    if len(ids) > self.max_length:
      if self.strict:
        raise ValueError(f"A prompt has {len(ids)} tokens; the model takes {self.max_length} (strict mode): "
                         f"{text[:50]!r}...")
      logging.warning("A prompt of %d tokens is cut to the model's %d positions: %r...", len(ids), self.max_length,
                      text[:50])
      ids = self.bert.encode(first, pair, max_length=self.max_length)["input_ids"]
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.bert.decode(ids)

  def token_types(self, ids: Sequence[int]) -> list[int]:
    """0 up to and including the first [SEP], 1 after it (BERT's sentence A / B)."""
    first_sep = ids.index(self.eod_id) if self.eod_id in ids else len(ids)
    return [0 if i <= first_sep else 1 for i in range(len(ids))]


@functools.lru_cache(maxsize=None)
def _classifier(config: plug.PlugConfig):
  def logits(params, tokens, token_types, segment_ids):
    hidden = plug.encode(params, tokens, config, token_types=token_types, segment_ids=segment_ids)
    return plug.classification_logits(params, hidden, config)
  return jax.jit(logits)


def _padded(rows: Sequence[Sequence[int]], batch_size: int, max_length: int) -> np.ndarray:
  """[batch_size, power-of-two width] int32, right-padded with 0 (rows beyond len(rows) are all 0)."""
  width = decoding.bucket_width(max(len(r) for r in rows), max_length)
  out = np.zeros((batch_size, width), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def language_model(params: dict, config: plug.PlugConfig, tokenizer: BertTokenizer, metadata: dict, *,
                   batch_size: int = 8, decoding_config: decoding.DecodingConfig | None = None, mesh=None,
                   strict: bool = False, progress: bool = False) -> LanguageModel:
  """PLUG behind the LanguageModel interface.

  generate: the decoder from [CLS] (greedy for 64 tokens unless told otherwise); sampling with an open min_length
  follows PLUG's release (decode.RELEASE_SEP_FRACTION). classify (config.num_classes > 0): [CLS]-head logits of
  one or two text fields per example; the metadata's "labels" name the classes (as ClassificationData.labels did
  in training).
  """
  labels = tuple(metadata.get("labels", ()))
  prompts_tokenizer = PromptTokenizer(tokenizer, config.max_positions, strict)
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)
  decode_params = functools.cache(lambda: decode.decode_layout(params))  # one copy for every generate call

  def generate(prompts):
    if config.num_decoder_layers == 0:
      raise ValueError("This PLUG checkpoint has no decoder (num_decoder_layers=0): it cannot generate.")
    outputs = []
    for start in tqdm.trange(0, len(prompts), batch_size, disable=not progress, desc="generating", unit="batch"):
      chunk = [list(p) for p in prompts[start:start + batch_size]]
      rows = chunk + [[tokenizer.cls_id, tokenizer.sep_id]] * (batch_size - len(chunk))  # one compiled batch size
      generated = decode.generate(decode_params(), rows, config, decoding_config, cls_id=tokenizer.cls_id,
                                  sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id,
                                  token_types=[prompts_tokenizer.token_types(p) for p in rows], mesh=mesh)
      outputs += generated[:len(chunk)]
    return outputs

  classify = None
  if config.num_classes:
    if labels and len(labels) != config.num_classes:
      raise ValueError(f"{len(labels)} labels {list(labels)} for a classifier of {config.num_classes} classes.")
    run = _classifier(config)

    def classify(texts):
      logits = []
      for start in tqdm.trange(0, len(texts), batch_size, disable=not progress, desc="classifying", unit="batch"):
        chunk = texts[start:start + batch_size]
        encoded = [tokenizer.encode(t[0], t[1] if len(t) > 1 else None, max_length=config.max_positions)
                   for t in chunk]
        tokens = _padded([e["input_ids"] for e in encoded], batch_size, config.max_positions)
        types = _padded([e["token_type_ids"] for e in encoded], batch_size, config.max_positions)
        segments = _padded([[1] * len(e["input_ids"]) for e in encoded], batch_size, config.max_positions)
        with partitioning.on_mesh(mesh):
          out = run(params, jnp.asarray(tokens), jnp.asarray(types), jnp.asarray(segments))
        logits.append(np.asarray(out, np.float32)[:len(chunk)])
      return np.concatenate(logits) if logits else np.zeros((0, config.num_classes), np.float32)

  return LanguageModel(prompts_tokenizer, unsupported("score continuations (it is an encoder-decoder)", "PLUG"),
                       generate, classify, labels, continues_prompt=False)

