"""PLUG behind the LanguageModel interface: generation with its decoder, classification with its [CLS] head or, for
few-shot checkpoints (their metadata records an "input_format"), with that format's head, plus sentence embeddings.

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

from cpm_jax import decoding, serving_weights
from cpm_jax.evaluation import batching
from cpm_jax.evaluation.interface import TOKENIZER_SOURCE, LanguageModel, unsupported
from cpm_jax.models.plug import decode, fewshot_inputs
from cpm_jax.models.plug import model as plug
from cpm_jax.tokenization import BertTokenizer, check_fits


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


class ContextTokenizer(PromptTokenizer):
  """For long-text generation: encode(text) -> the text's ids without [CLS] / [SEP], however long (the protocol
  keeps its last tokens)."""

  def encode(self, text: str) -> list[int]:
    return self.bert.encode(text)["input_ids"][1:-1]


@functools.lru_cache(maxsize=None)
def _classifier(config: plug.PlugConfig):
  def logits(params, tokens, token_types, segment_ids):
    hidden = plug.encode(params, tokens, config, token_types=token_types, segment_ids=segment_ids)
    return plug.classification_logits(params, hidden, config)
  return jax.jit(logits)


@functools.lru_cache(maxsize=None)
def _few_shot_outputs(model: plug.FewShotModel):
  def outputs(params, batch):
    logits, embeddings, _ = model.outputs(params, batch)
    return logits, embeddings
  return jax.jit(outputs)


def few_shot_functions(runner: batching.ModelRunner, config: plug.PlugConfig, tokenizer: BertTokenizer,
                       metadata: dict):
  """(classify, embed) of a few-shot checkpoint: rows in the recorded input format (fewshot_inputs), class logits
  from its head and the mean hidden state of the text span, [n, classes] / [n, embed] float32. Each distinct text is
  run once (kNN asks for the logits and the embeddings of the same texts)."""
  input_format = fewshot_inputs.format_from_record(metadata["input_format"])
  num_classes, seq_len, fields = len(metadata["labels"]), int(metadata["seq_len"]), input_format.fields()
  run = _few_shot_outputs(plug.FewShotModel(config, head=input_format.head))
  done: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

  def row(text):
    if len(text) != len(fields):
      raise ValueError(f"This few-shot model reads the fields {list(fields)}; got {len(text)} texts: {text!r}.")
    return fewshot_inputs.features(dict(zip(fields, text)), input_format=input_format, tokenizer=tokenizer,
                                   seq_len=seq_len, num_classes=num_classes, label=None, rng=None)

  def outputs_batch(texts):
    rows = [row(text) for text in texts]
    batch = {key: jnp.asarray(np.stack([r[key] for r in rows])) for key in rows[0]}
    logits, embeddings = (np.asarray(out, np.float32) for out in run(runner.params, batch))
    return list(zip(logits, embeddings))

  def outputs(texts, which):
    new = list(dict.fromkeys(tuple(t) for t in texts if tuple(t) not in done))
    done.update(zip(new, runner.in_batches(new, outputs_batch, pad=("",) * len(fields), desc="classifying")))
    width = (num_classes, config.embed_dim)[which]
    return np.stack([done[tuple(t)][which] for t in texts]) if texts else np.zeros((0, width), np.float32)

  return (lambda texts: outputs(texts, 0)), (lambda texts: outputs(texts, 1))


def _padded(rows: Sequence[Sequence[int]], max_length: int) -> jax.Array:
  """[rows, power-of-two width] int32, right-padded with 0."""
  width = decoding.bucket_width(max(len(r) for r in rows), max_length)
  out = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return jnp.asarray(out)


def language_model(params: dict, config: plug.PlugConfig, tokenizer: BertTokenizer, metadata: dict, *,
                   batch_size: int = 8, decoding_config: decoding.DecodingConfig | None = None, mesh=None,
                   strict: bool = False, progress: bool = False, weights: str | None = None,
                   long_text: bool = False) -> LanguageModel:
  """PLUG behind the LanguageModel interface.

  generate: the decoder from [CLS] (greedy for 64 tokens unless told otherwise); sampling with an open min_length
  follows PLUG's release (decode.RELEASE_SEP_FRACTION). classify (config.num_classes > 0): [CLS]-head logits of
  one or two text fields per example; the metadata's "labels" name the classes (as ClassificationData.labels did
  in training). A few-shot checkpoint (FewShotData's metadata) classifies and embeds through few_shot_functions.
  weights: "bfloat16" / "int8" serve the decoder's weights converted once (cpm_jax.serving_weights).
  long_text: prompts are texts to continue, by the released long-text protocol (gin `LongText`).
  """
  check_fits(tokenizer.vocab_size, tokenizer.vocab_path, config.vocab_size, TOKENIZER_SOURCE)
  labels = tuple(metadata.get("labels", ()))
  prompts_tokenizer = (ContextTokenizer if long_text else PromptTokenizer)(tokenizer, config.max_positions, strict)
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)
  served_layout = serving_weights.serving_layout(decode.decode_layout, weights, decode.QUANTIZED)
  runner = batching.ModelRunner(params, served_layout, batch_size, mesh, progress)
  ids = dict(cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id, mesh=mesh)

  def check_decoder():
    if config.num_decoder_layers == 0:
      raise ValueError("This PLUG checkpoint has no decoder (num_decoder_layers=0): it cannot generate.")

  def generate_batch(rows):
    if long_text:
      return decode.generate_long(runner.decode_params, rows, config, decoding_config, long_text=decode.LongText(),
                                  **ids)
    return decode.generate(runner.decode_params, rows, config, decoding_config,
                           token_types=[prompts_tokenizer.token_types(p) for p in rows], **ids)

  def generate(prompts):
    check_decoder()
    return runner.in_batches([list(p) for p in prompts], generate_batch, pad=[tokenizer.cls_id, tokenizer.sep_id],
                             desc="generating")

  def stream(prompts):
    check_decoder()
    if long_text:
      return decode.stream_long(runner.decode_params, prompts, config, decoding_config, long_text=decode.LongText(),
                                **ids)
    return decode.stream(runner.decode_params, prompts, config, decoding_config,
                         token_types=[prompts_tokenizer.token_types(p) for p in prompts], **ids)

  classify = embed = None
  if "input_format" in metadata:
    classify, embed = few_shot_functions(runner, config, tokenizer, metadata)
  elif config.num_classes:
    if labels and len(labels) != config.num_classes:
      raise ValueError(f"{len(labels)} labels {list(labels)} for a classifier of {config.num_classes} classes.")
    run = _classifier(config)

    def classify_batch(texts):
      encoded = [tokenizer.encode(t[0], t[1] if len(t) > 1 else None, max_length=config.max_positions)
                 for t in texts]
      columns = [[e["input_ids"] for e in encoded], [e["token_type_ids"] for e in encoded],
                 [[1] * len(e["input_ids"]) for e in encoded]]
      return np.asarray(run(params, *(_padded(rows, config.max_positions) for rows in columns)), np.float32)

    def classify(texts):
      logits = runner.in_batches(list(texts), classify_batch, pad=("",), desc="classifying")
      return np.stack(logits) if logits else np.zeros((0, config.num_classes), np.float32)

  return LanguageModel(prompts_tokenizer, unsupported("score continuations (it is an encoder-decoder)", "PLUG"),
                       generate, classify, labels, continues_prompt=long_text, stream=stream, embed=embed)
