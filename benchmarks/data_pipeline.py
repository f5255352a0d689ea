"""Tokenizer and data pipeline throughput, and packing efficiency, each against a peer measured in the same run.

  tokenizers   CPMTokenizer.encode (jieba + SentencePiece) vs SentencePiece alone on the same text (the jieba cost);
               our BertTokenizer (Python) vs transformers' BertTokenizer (Rust) on the same text
  pipeline     make_lm_iterator tokens/s (after the first batch) in this process vs --workers worker processes
  packing      non-pad fraction of first-fit packing vs one document per row (padded, long documents cut)

  .venv/bin/python benchmarks/data_pipeline.py --data_dir=/tmp/tfds --cpm_vocab=../shared/vocab/cpm/chinese_vocab.model
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from cpm_jax import tokenization
from cpm_jax.data import pipeline, sources

_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir (the demo corpus is built there).")
_CPM_VOCAB = flags.DEFINE_string("cpm_vocab", "../shared/vocab/cpm/chinese_vocab.model", "CPM SentencePiece model.")
_BERT_VOCAB = flags.DEFINE_string("bert_vocab", "../shared/vocab/plug/vocab.txt", "BERT-Chinese vocab.txt.")
_DOCUMENTS = flags.DEFINE_integer("documents", 2000, "People's Daily paragraphs to use.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes for the pipeline measurement.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["128", "512", "1024"], "Row lengths for the packing comparison.")


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def main(argv: list[str]) -> None:
  del argv
  source = sources.load_split("peoples_daily_1998", "train", os.path.expanduser(_DATA_DIR.value))
  texts = [source[i]["text"].decode() for i in range(min(_DOCUMENTS.value, len(source)))]
  chars = sum(map(len, texts))
  cpm = tokenization.CPMTokenizer(_CPM_VOCAB.value)
  cpm.encode("预热")  # load jieba's dictionary outside the timing
  ids, ours = timed(lambda: [cpm.encode(t) for t in texts])
  tokens = sum(map(len, ids))
  _, plain = timed(lambda: cpm._sp.encode(texts))
  print(f"{len(texts)} paragraphs, {chars} characters, {tokens} CPM tokens")
  print(f"CPMTokenizer.encode      {tokens / ours:10.0f} tokens/s")
  print(f"SentencePiece alone      {tokens / plain:10.0f} tokens/s   (jieba + pre-tokenization cost: "
        f"{ours / plain:.1f}x the SentencePiece time)")

  if os.path.exists(_BERT_VOCAB.value):
    import transformers
    bert, hf = tokenization.BertTokenizer(_BERT_VOCAB.value), transformers.BertTokenizer(_BERT_VOCAB.value)
    bert_ids, ours_bert = timed(lambda: [bert.encode(t)["input_ids"] for t in texts])
    hf_ids, hf_time = timed(lambda: hf(texts)["input_ids"])
    assert bert_ids == hf_ids, "BertTokenizer differs from transformers on the benchmark text"
    bert_tokens = sum(map(len, bert_ids))
    print(f"BertTokenizer (ours)     {bert_tokens / ours_bert:10.0f} tokens/s   transformers (Rust, batched): "
          f"{bert_tokens / hf_time:.0f} tokens/s, ours is {hf_time / ours_bert:.2f}x its speed")

  make = lambda workers: pipeline.make_lm_iterator(
      source, cpm, seq_len=512, global_batch_size=8, num_epochs=1, max_documents=len(texts), process_index=0,
      process_count=1, worker_count=workers)
  for workers in (0, _WORKERS.value):
    iterator, start_up = timed(lambda: make(workers))
    _, first = timed(lambda: next(iterator))
    batches, seconds = timed(lambda: list(iterator))
    print(f"pipeline, {workers} workers  {sum(int(b['weights'].sum()) for b in batches) / seconds:10.0f} tokens/s   "
          f"after the first batch ({start_up + first:.1f} s to it)")

  lengths = np.array([len(i) for i in ids])  # inputs per document: tokens + <eod> - 1
  for seq_len in map(int, _SEQ_LENS.value):
    packed = pipeline.non_pad_fraction(pipeline.make_lm_iterator(
        [{"text": t} for t in texts], _Cached(cpm, texts, ids), seq_len=seq_len, global_batch_size=8, num_epochs=1,
        process_index=0, process_count=1))
    rows = np.ceil(lengths / seq_len).sum()
    print(f"seq_len {seq_len:5d}: first-fit packing {packed:.4f} non-pad vs one document per row "
          f"{lengths.sum() / (rows * seq_len):.4f} ({packed * rows * seq_len / lengths.sum():.1f}x fewer rows)")


class _Cached:
  """The CPM ids computed above, so the packing comparison does not tokenize again."""

  def __init__(self, tokenizer, texts, ids):
    self.eod_id = tokenizer.eod_id
    self._ids = dict(zip(texts, ids))

  def encode(self, text):
    return self._ids[text]


if __name__ == "__main__":
  app.run(main)
