r"""Trains a CPM-style SentencePiece model (unigram, nmt_nfkc, CPM's special pieces and ids) for CPMTokenizer.

From a TFDS dataset (the demo corpus is built on first use):
  python experiments/train_tokenizer.py --dataset=peoples_daily_1998 --data_dir=/tmp/tfds \
      --output=/tmp/cpm_demo/spm.model --vocab_size=8000
From your own .txt / .jsonl files or folders (read as the text_corpus builder reads them):
  python experiments/train_tokenizer.py --input=/data/corpus --txt_document=line --output=/data/spm.model
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

from absl import app, flags

from cpm_jax import logging_setup, programs, tokenization
from cpm_jax.data import corpus, sources

_OUTPUT = flags.DEFINE_string("output", None, "Path of the SentencePiece model to write.", required=True)
_INPUT = flags.DEFINE_multi_string("input", [], "Text files or folders (.txt / .jsonl) to train on.")
_DATASET = flags.DEFINE_string("dataset", None, "Or a TFDS dataset, e.g. peoples_daily_1998 or text_corpus/NAME.")
_SPLIT = flags.DEFINE_string("split", "train", "--dataset: the split to train on.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "--dataset: TFDS data_dir.")
_TXT_DOCUMENT = flags.DEFINE_enum("txt_document", "block", ["block", "line"], "--input .txt: a document per "
                                  "blank-line-separated block or per line.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "--input .jsonl: the field holding the text.")
_LENIENT = flags.DEFINE_bool("lenient", False, "--input: skip (and count) lines that are not valid UTF-8.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", None, "Train on at most this many documents.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 30000, "Number of pieces (CPM: 30000).")
_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "Fraction of characters the vocab must cover.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show SentencePiece's own training log.")


def documents() -> Iterator[str]:
  if bool(_INPUT.value) == bool(_DATASET.value):
    raise app.UsageError("Give either --input or --dataset.")
  if _DATASET.value:
    source = sources.load_split(_DATASET.value, _SPLIT.value, os.path.expanduser(_DATA_DIR.value))
    return (source[i]["text"].decode("utf-8") for i in range(len(source)))
  return (text for path in _INPUT.value
          for _, text in corpus.read_corpus(path, txt_document=_TXT_DOCUMENT.value, text_field=_TEXT_FIELD.value,
                                            lenient=_LENIENT.value))


def main(argv: list[str]) -> None:
  del argv
  programs.require_existing(multi=[_INPUT])
  texts = logging_setup.progress(itertools.islice(documents(), _MAX_DOCUMENTS.value),
                                 desc="segmenting documents (jieba)", total=_MAX_DOCUMENTS.value, unit="docs")
  tokenizer = tokenization.train_sentencepiece(texts, os.path.expanduser(_OUTPUT.value), vocab_size=_VOCAB_SIZE.value,
                                               character_coverage=_COVERAGE.value, verbose=_VERBOSE.value)
  sample = "中国人民 2024 年\n新的一天。"
  print(f"wrote {tokenizer.model_path}: {tokenizer.vocab_size} pieces; eod={tokenizer.eod_id} pad={tokenizer.pad_id} "
        f"unk={tokenizer.unk_id} sep={tokenizer.sep_id} mask={tokenizer.mask_id}")
  print(f"{sample!r} -> {[tokenizer.id_to_piece(i) for i in tokenizer.encode(sample)]}")


if __name__ == "__main__":
  programs.run(main)
