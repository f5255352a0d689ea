"""Tokenizers: CPM's jieba + SentencePiece tokenizer, BERT-Chinese WordPiece for PLUG, and SentencePiece training.

CPM (the released algorithm): segment with `jieba.cut(text, cut_all=False)`; in every segment map ' ' -> U+2582 and
'\\n' -> U+2583; join the segments with one ASCII space; SentencePiece-encode. Decode: SentencePiece-decode, delete
every ASCII space (they were jieba boundaries), map U+2582 -> ' ' and U+2583 -> '\\n'.

The CPM vocab normalises with `nmt_nfkc`, so decode(encode(text)) is unicodedata.normalize('NFKC', text) (full-width
ASCII becomes ASCII: '，' -> ',', '１' -> '1', '（' -> '('; '…' -> '...') with these exceptions: '～' (U+FF5E) is
kept; whitespace other than ' ' and '\n' (tab, U+3000) is dropped; U+2582/U+2583 in the text come back as ' ' and
'\n'; and a run of characters outside the vocab comes back as one or more '⁇'.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence

import jieba
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

jieba.setLogLevel(logging.INFO)  # jieba reports loading its dictionary at DEBUG level, on stderr

_TO_SP = str.maketrans(" \n", "\u2582\u2583")
_FROM_SP = str.maketrans("\u2582\u2583", " \n")

# CPM's special pieces; their ids (<unk>=0, <s>=1, </s>=2, U+2583=3, <sep>=4, <pad>=5, <mask>=6, <eod>=7) are read
# from the model file, and train_sentencepiece reproduces them.
CPM_REQUIRED_PIECES = ("<unk>", "<eod>", "<pad>", "<sep>", "<mask>", "\u2582", "\u2583")


def _piece_ids(path: str, piece_to_id, unk_id: int, pieces: Iterable[str], unk_piece: str) -> dict[str, int]:
  ids = {piece: piece_to_id(piece) for piece in pieces}
  missing = [piece for piece, i in ids.items() if i == unk_id and piece != unk_piece]
  if missing:
    raise ValueError(f"{path}: vocab lacks the required pieces {missing!r}.")
  return ids


def check_fits(tokens: int, path: str, vocab_size: int, where: str) -> None:
  """A ValueError naming `where` and the vocabulary file `path` when its `tokens` are more than a model's
  `vocab_size` embedding rows (a larger id would be clamped silently on device)."""
  if tokens > vocab_size:
    raise ValueError(f"{where}: {path} has {tokens} tokens, more than the model's vocab_size {vocab_size} (ids past "
                     f"{vocab_size - 1} have no embedding row); use the vocabulary the model was trained with.")


class CPMTokenizer:
  """CPM-1's tokenizer (jieba + SentencePiece) over any SentencePiece model with CPM's special pieces."""

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = str(model_path)
    if not os.path.isfile(self.model_path):
      raise FileNotFoundError(f"CPMTokenizer: SentencePiece model file not found: {self.model_path}")
    self._load(pathlib.Path(self.model_path).read_bytes())

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise ValueError(f"CPMTokenizer: {self.model_path} is not a SentencePiece model: {e}") from e
    ids = _piece_ids(self.model_path, self._sp.piece_to_id, self._sp.unk_id(), CPM_REQUIRED_PIECES,
                     self._sp.id_to_piece(self._sp.unk_id()))
    self.unk_id, self.eod_id, self.pad_id = ids["<unk>"], ids["<eod>"], ids["<pad>"]
    self.sep_id, self.mask_id = ids["<sep>"], ids["<mask>"]

  def __getstate__(self) -> dict:  # picklable for Grain worker processes
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state: dict) -> None:
    self.model_path = state["model_path"]
    self._load(state["proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @staticmethod
  def pre_tokenize(text: str) -> str:
    """The string CPM hands to SentencePiece: jieba segments, spaces/newlines mapped, joined by one space."""
    return " ".join(segment.translate(_TO_SP) for segment in jieba.cut(text, cut_all=False))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no <eod> appended)."""
    return self._sp.encode(self.pre_tokenize(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode([self.pre_tokenize(text) for text in texts])

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; an id past the vocabulary (a padded embedding row a model generated) reads as <unk>."""
    size = self.vocab_size
    return self._sp.decode([int(i) if int(i) < size else self.unk_id for i in ids]).replace(" ", "").translate(
        _FROM_SP)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def train_sentencepiece(texts: Iterable[str], output_path: str | os.PathLike, *, vocab_size: int = 30000,
                        character_coverage: float = 0.9995, num_threads: int = os.cpu_count() or 1,
                        verbose: bool = False) -> CPMTokenizer:
  """Trains a unigram SentencePiece model with CPM's conventions and writes it to `output_path`.

  Every line of every text is pre-tokenized as CPMTokenizer.encode does (so the model learns on jieba-segmented
  input, as the released vocab did). The special pieces get CPM's ids: <unk>=0, <s>=1, </s>=2, U+2583=3, <sep>=4,
  <pad>=5, <mask>=6, <eod>=7, then U+2582; <sep> and <mask> are control pieces as in the released vocab. The model
  is written to a temporary file and renamed when complete.
  """

  def sentences():
    for text in texts:
      for line in text.split("\n"):
        if line.strip():
          yield CPMTokenizer.pre_tokenize(line)

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type="unigram",
      normalization_rule_name="nmt_nfkc", character_coverage=character_coverage, max_sentencepiece_length=16,
      max_sentence_length=4192, unk_id=0, bos_id=1, eos_id=2, pad_id=5,
      user_defined_symbols=["\u2583", "<sep>", "<mask>", "<eod>", "\u2582"], hard_vocab_limit=False,
      num_threads=num_threads, minloglevel=0 if verbose else 1)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model.getvalue())
  for piece in proto.pieces:
    if piece.piece in ("<sep>", "<mask>"):
      piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
  output_path = pathlib.Path(output_path)
  output_path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=output_path.parent, prefix=output_path.name, suffix=".tmp",
                                   delete=False) as f:
    f.write(proto.SerializeToString())
  os.replace(f.name, output_path)
  return CPMTokenizer(output_path)


# ---------------------------------------------------------------------------------------------------------------
# BERT-Chinese WordPiece (PLUG)

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp: int) -> bool:
  return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_control(ch: str) -> bool:
  return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _truncate_longest_first(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
  """HF tokenizers' 'longest_first': the shorter part keeps its length if the longer can take the rest, else the
  parts get budget // 2 (shorter) and the remainder (longer)."""
  if b is None:
    return a[:budget], None
  if len(a) + len(b) <= budget:
    return a, b
  short = min(len(a), len(b))
  keep_short = short if short <= budget - short else budget // 2
  keep = (keep_short, budget - keep_short) if len(a) <= len(b) else (budget - keep_short, keep_short)
  return a[:keep[0]], b[:keep[1]]


def write_character_vocab(texts: Iterable[str], output_path: str | os.PathLike, min_count: int = 1) -> pathlib.Path:
  """Writes a BERT vocab.txt of BERT's special tokens then every character of `texts` seen `min_count` times, most
  frequent first (a character other than CJK also as a "##" continuation, as BERT-Chinese's vocab has them): a
  stand-in for bert-base-chinese's vocab where it cannot be downloaded. Written to a temporary file, then renamed."""
  counts: dict[str, int] = {}
  for text in texts:
    for ch in unicodedata.normalize("NFD", text).lower():
      if not (ch.isspace() or _is_control(ch) or unicodedata.category(ch) == "Mn"):
        counts[ch] = counts.get(ch, 0) + 1
  tokens = list(_BERT_SPECIALS)
  for ch, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
    if count >= min_count:
      tokens += [ch] if _is_cjk(ord(ch)) or _is_punctuation(ch) else [ch, f"##{ch}"]
  output_path = pathlib.Path(output_path)
  output_path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=output_path.parent, prefix=output_path.name,
                                   suffix=".tmp", delete=False) as f:
    f.write("".join(f"{token}\n" for token in tokens))
  os.replace(f.name, output_path)
  return output_path


class BertTokenizer:
  """BERT's tokenizer over a vocab.txt: basic tokenization (clean, one token per CJK character, lower case and strip
  accents, split punctuation) then greedy longest-match WordPiece; special tokens in the text are kept whole."""

  max_chars_per_word = 100

  def __init__(self, vocab_path: str | os.PathLike, do_lower_case: bool = True):
    self.vocab_path = str(vocab_path)
    if not os.path.isfile(self.vocab_path):
      raise FileNotFoundError(f"BertTokenizer: vocab file not found: {self.vocab_path}")
    with open(self.vocab_path, encoding="utf-8") as f:
      self.id_to_token = [line.rstrip("\n") for line in f]
    self.vocab = {token: i for i, token in enumerate(self.id_to_token)}
    self.do_lower_case = do_lower_case
    ids = _piece_ids(self.vocab_path, lambda t: self.vocab.get(t, -1), -1, _BERT_SPECIALS, "")
    self.pad_id, self.unk_id, self.cls_id = ids["[PAD]"], ids["[UNK]"], ids["[CLS]"]
    self.sep_id, self.mask_id = ids["[SEP]"], ids["[MASK]"]

  @property
  def vocab_size(self) -> int:
    return len(self.id_to_token)

  def _basic_tokens(self, text: str) -> list[str]:
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      chars.append(f" {ch} " if _is_cjk(cp) else " " if ch.isspace() else ch)
    tokens = []
    for word in "".join(chars).split():
      if self.do_lower_case:
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn").lower()
      current = []
      for ch in word:
        if _is_punctuation(ch):
          tokens.extend(["".join(current)] if current else [])
          tokens.append(ch)
          current = []
        else:
          current.append(ch)
      tokens.extend(["".join(current)] if current else [])
    return tokens

  def _wordpiece(self, word: str) -> list[str]:
    if len(word) > self.max_chars_per_word:
      return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          break
        end -= 1
      if end == start:
        return ["[UNK]"]
      pieces.append(piece)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    tokens = []
    for i, part in enumerate(self._split_specials(text)):
      if i % 2:
        tokens.append(part)
      else:
        tokens.extend(p for word in self._basic_tokens(part) for p in self._wordpiece(word))
    return tokens

  @staticmethod
  def _split_specials(text: str) -> list[str]:
    """[text, special, text, special, ..., text]."""
    parts, start, i = [], 0, 0
    while i < len(text):
      special = next((s for s in _BERT_SPECIALS if text.startswith(s, i)), None) if text[i] == "[" else None
      if special:
        parts += [text[start:i], special]
        i = start = i + len(special)
      else:
        i += 1
    return parts + [text[start:]]

  def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
    return [self.vocab.get(t, self.unk_id) for t in tokens]

  def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    """The tokens of `ids`; an id past the vocabulary (a padded embedding row a model generated) is [UNK]."""
    unknown = self.id_to_token[self.unk_id]
    return [self.id_to_token[int(i)] if int(i) < len(self.id_to_token) else unknown for i in ids]

  def encode(self, text: str, text_pair: str | None = None, max_length: int | None = None) -> dict[str, list[int]]:
    """[CLS] a [SEP] (b [SEP]) with token types 0 (a) and 1 (b); `max_length` truncates the longer part first."""
    a = self.convert_tokens_to_ids(self.tokenize(text))
    b = self.convert_tokens_to_ids(self.tokenize(text_pair)) if text_pair is not None else None
    if max_length is not None:
      budget = max_length - (3 if b is not None else 2)
      if budget < 0:
        raise ValueError(f"BertTokenizer.encode: max_length={max_length} leaves no room for the special tokens.")
      a, b = _truncate_longest_first(a, b, budget)
    input_ids = [self.cls_id, *a, self.sep_id]
    token_type_ids = [0] * len(input_ids)
    if b is not None:
      input_ids += [*b, self.sep_id]
      token_type_ids += [1] * (len(b) + 1)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids}

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Joins tokens: '##' pieces attach to the previous token; a space only between two ASCII alphanumerics."""
    skip = {self.pad_id, self.cls_id, self.sep_id} if skip_special_tokens else set()
    text = ""
    for token in self.convert_ids_to_tokens(i for i in ids if int(i) not in skip):
      if token.startswith("##"):
        text += token[2:]
      elif text and text[-1].isascii() and text[-1].isalnum() and token[0].isascii() and token[0].isalnum():
        text += " " + token
      else:
        text += token
    return text
