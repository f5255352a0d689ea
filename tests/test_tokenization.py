"""CPM tokenizer (released algorithm, round trip on real text), SentencePiece training, BERT WordPiece vs transformers."""

import functools
import pathlib
import re
import unicodedata

import jieba
import pytest
from sentencepiece import sentencepiece_model_pb2

from _data_helpers import small_tokenizer  # noqa: F401  (session fixture)
from cpm_jax import tokenization
from cpm_jax.data import corpus


@pytest.fixture(scope="module")
def cpm(cpm_vocab_path):
  return tokenization.CPMTokenizer(cpm_vocab_path)


@pytest.fixture(scope="module")
def real_lines():
  """1,000 People's Daily paragraphs and 1,000 reviews (spaces, ASCII, digits, emoticons)."""
  return corpus.peoples_daily_paragraphs()[:1000] + [text for text, _ in corpus.review_documents()[:1000]]


def test_cpm_special_ids_come_from_the_vocab(cpm):
  assert (cpm.unk_id, cpm.sep_id, cpm.pad_id, cpm.mask_id, cpm.eod_id) == (0, 4, 5, 6, 7)
  assert cpm.vocab_size == 30000
  ids = cpm.encode("今天天气")
  # An id past the vocabulary (a padded embedding row a model generated) decodes as <unk> does.
  assert cpm.decode([*ids, 30000, 30123]) == cpm.decode([*ids, cpm.unk_id, cpm.unk_id]) != cpm.decode(ids)


@pytest.fixture(scope="module")
def hf_cpm(cpm_vocab_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("rjieba")  # what transformers' CpmTokenizer segments with (jieba-rs)
  return transformers.CpmTokenizer(str(cpm_vocab_path))


def _transformers_ids(hf_cpm, text: str) -> list[int]:
  """transformers' CPM port: segment (hf_cpm.jieba, jieba-rs with its HMM for unknown words, as jieba.cut(text,
  cut_all=False) does), map ' ' / '\\n' per segment (hf_cpm.translator), join by spaces, then its SentencePiece
  tokenization. transformers 5 no longer runs the segmentation itself (CpmTokenizer.tokenize only does
  SentencePiece, CpmTokenizerFast's hook is never called), so it is composed here from the port's own parts."""
  segments = [segment.translate(hf_cpm.translator) for segment in hf_cpm.jieba.cut(text, True)]
  return hf_cpm.convert_tokens_to_ids(hf_cpm.tokenize(" ".join(segments)))


def test_cpm_encode_matches_transformers_cpm_tokenizer(cpm, hf_cpm, real_lines):
  """The released algorithm (FORMATS.md), checked against transformers' port on 2,000 real lines."""
  texts = real_lines + ["今天 天气很好\n明天下雨。 GPT-2 有1.5B参数", "  两个空格\n\n两个换行 ",
                        "全角空格\u3000和制表符\t消失"]
  same, segmented_apart, tilde = 0, 0, 0
  for text in texts:
    if cpm.encode(text) == _transformers_ids(hf_cpm, text):
      same += 1
    elif list(jieba.cut(text, cut_all=False)) != hf_cpm.jieba.cut(text, True):
      segmented_apart += 1  # jieba and jieba-rs cut this text differently: the segmenters, not the tokenizers
    else:
      assert "～" in text, text  # the port's NFKD maps U+FF5E to '~', which the CPM vocab keeps as '～'
      tilde += 1
  assert same >= 0.98 * len(texts) and segmented_apart + tilde < 0.02 * len(texts), (same, segmented_apart, tilde)
  ids = cpm.encode("你好 世界\n")
  assert ids == _transformers_ids(hf_cpm, "你好 世界\n")
  assert ids.count(10) == 1 and ids[-1] == 3  # U+2582 is id 10, U+2583 is id 3; no <eod> appended
  assert cpm.encode_batch(texts[:20]) == [cpm.encode(t) for t in texts[:20]]
  assert hf_cpm.decode(cpm.encode("中文 English\n第二行")) == cpm.decode(cpm.encode("中文 English\n第二行"))


def _expected_round_trip(text: str, in_vocab) -> re.Pattern:
  """NFKC, except '～' kept and whitespace other than ' '/'\\n' dropped; out-of-vocab runs -> one or more '⁇'."""
  chars = ["～" if c == "～" else unicodedata.normalize("NFKC", c) for c in text if not c.isspace() or c in " \n"]
  pattern, run = "", 0
  for c in "".join(chars) + "\0":
    if c != "\0" and c not in " \n" and not in_vocab(c):
      run += 1
      continue
    pattern += f"⁇{{1,{run}}}" if run else ""
    pattern += re.escape(c) if c != "\0" else ""
    run = 0
  return re.compile(pattern)


def test_cpm_round_trip_on_real_lines(cpm, real_lines):
  in_vocab = functools.lru_cache(None)(lambda c: cpm.unk_id not in cpm.encode(c))
  multi_line = "\n".join(real_lines[1000:1100])  # reviews: spaces, ASCII words, digits, now also newlines
  assert " " in multi_line and re.search("[a-zA-Z0-9]", multi_line)
  normalised = oov = 0
  for text in real_lines + [multi_line]:
    decoded = cpm.decode(cpm.encode(text))
    assert _expected_round_trip(text, in_vocab).fullmatch(decoded), (text, decoded)
    normalised += unicodedata.normalize("NFKC", text) != text
    oov += "⁇" in decoded
  assert normalised > 500  # most lines hold full-width punctuation or digits, which NFKC turns into ASCII
  assert oov < 0.05 * len(real_lines)


@pytest.mark.parametrize("text,decoded", [
    ("中文 English 123\n第二行。", "中文 English 123\n第二行。"),  # spaces, newlines, ASCII, digits: exact
    ("全角，：；！？（）１２３ＡＢＣ", "全角,:;!?()123ABC"),  # full-width ASCII -> ASCII (NFKC)
    ("省略号…温度℃ ①", "省略号...温度°C 1"),
    ("波浪～号、句号。书名《》引号“”", "波浪～号、句号。书名《》引号“”"),  # kept as is
    ("全角空格\u3000和制表符\t消失", "全角空格和制表符消失"),  # whitespace other than ' ' and '\n' is dropped
])
def test_cpm_normalisation_is_documented(cpm, text, decoded):
  assert cpm.decode(cpm.encode(text)) == decoded


def test_cpm_tokenizer_errors(tmp_path, plug_vocab_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenization.CPMTokenizer(tmp_path / "nope.model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenization.CPMTokenizer(plug_vocab_path)


def test_train_sentencepiece_uses_cpm_conventions(small_tokenizer, tmp_path):  # noqa: F811
  tok = small_tokenizer
  assert [tok.id_to_piece(i) for i in range(9)] == [
      "<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2582"]
  assert (tok.unk_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.eod_id, tok.vocab_size) == (0, 4, 5, 6, 7, 2000)
  text = "迈向充满希望的新世纪 中国\n人民"
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([tok.sep_id, tok.mask_id, tok.pad_id]) == ""  # control pieces, as in the released vocab
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(pathlib.Path(tok.model_path).read_bytes())
  proto.pieces[tok.eod_id].piece = "<end>"
  (tmp_path / "no_eod.model").write_bytes(proto.SerializeToString())
  with pytest.raises(ValueError, match=r"no_eod.model: vocab lacks the required pieces \['<eod>'\]"):
    tokenization.CPMTokenizer(tmp_path / "no_eod.model")


# ---------------------------------------------------------------------------------------------------------------
# BERT-Chinese WordPiece (PLUG)

@pytest.fixture(scope="module")
def berts(plug_vocab_path):
  transformers = pytest.importorskip("transformers")
  return tokenization.BertTokenizer(plug_vocab_path), transformers.BertTokenizer(str(plug_vocab_path))


def test_bert_special_ids(berts):
  ours, _ = berts
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 100, 101, 102, 103)
  assert ours.vocab_size == 21128


def test_bert_matches_transformers_on_real_text(berts, real_lines):
  ours, theirs = berts
  extra = ["Héllo WÖRLD, naïve café! unaffable 3.14 ｛全角｝ \u3000 tab\there [MASK]替换[SEP]", "x" * 120, "\x00\ufffd"]
  for text in real_lines + extra:
    assert ours.encode(text)["input_ids"] == theirs(text)["input_ids"], text


def test_bert_pairs_and_truncation_match_transformers(berts, real_lines):
  ours, theirs = berts
  for a, b in zip(real_lines[:40], real_lines[1000:1040]):
    for max_length in (None, 16, 33, 64):
      kwargs = {"max_length": max_length, "truncation": True} if max_length else {}
      expected = theirs(a, b, **kwargs)
      got = ours.encode(a, b, max_length=max_length)
      assert got["input_ids"] == expected["input_ids"] and got["token_type_ids"] == expected["token_type_ids"]
  assert ours.encode("一二三", max_length=4)["input_ids"] == theirs("一二三", max_length=4, truncation=True)["input_ids"]


def test_bert_tokens_and_decode(berts):
  ours, _ = berts
  assert ours.tokenize("我爱unaffable!") == ["我", "爱", "u", "##na", "##ff", "##able", "!"]
  assert ours.convert_tokens_to_ids(["[CLS]", "我", "不在词表里的词"]) == [101, 2769, 100]
  ids = ours.encode("我爱北京, hello world 2024")["input_ids"]
  assert ours.decode(ids) == "我爱北京,hello world 2024"
  assert ours.decode(ids, skip_special_tokens=False).startswith("[CLS]我爱")
  past = [2769, 21128, 30000]  # ids past the vocabulary (padded embedding rows a model generated)
  assert ours.convert_ids_to_tokens(past) == ["我", "[UNK]", "[UNK]"] and ours.decode(past) == "我[UNK][UNK]"


def test_character_vocab_covers_its_texts_and_matches_transformers(real_lines, tmp_path):
  transformers = pytest.importorskip("transformers")
  path = tokenization.write_character_vocab(real_lines, tmp_path / "vocab.txt")
  ours, theirs = tokenization.BertTokenizer(path), transformers.BertTokenizer(str(path))
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 1, 2, 3, 4)
  assert len(set(ours.id_to_token)) == ours.vocab_size > 3000
  for text in real_lines + ["Héllo WORLD 1998 年，３．１４！"]:
    ids = ours.encode(text)["input_ids"]
    assert ours.unk_id not in ids, text  # every character of the texts has a token
    assert ids == theirs(text)["input_ids"], text
  assert ours.tokenize("ab 19") == ["a", "##b", "1", "##9"]
  rare = tokenization.write_character_vocab(["甲甲乙"], tmp_path / "rare.txt", min_count=2)
  assert rare.read_text(encoding="utf-8").split("\n")[5:] == ["甲", ""]
