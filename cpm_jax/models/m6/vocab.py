"""M6's text vocabulary: one token per Chinese character, read from a file of one token per line.

A character vocabulary (as BERT-Chinese and M6 tokenise Chinese) keeps the tiny demo small and exact: captions,
questions and answers are short fixed phrases whose every character is a token, so "两个" is always the same two
ids, the shared metrics (character level) see exactly what the model emits, and the tied output head stays small
(4,096 entries instead of CPM's 30,000, the cost that dominates a CPU step of a tiny model). `build` writes one from
texts: the special tokens, every character of the `required` texts, then the most frequent characters of the rest.
"""

from __future__ import annotations

import collections
import os
from typing import Iterable

SPECIALS = ("<pad>", "<unk>", "<bos>", "<sep>", "<eod>")


class CharVocab:
  """Character tokenizer over a vocabulary file (one token per line; the first five are SPECIALS in order)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"CharVocab: vocabulary file not found: {self.path}")
    with open(self.path, encoding="utf-8") as f:
      tokens = f.read().split("\n")
    if tokens and tokens[-1] == "":
      tokens.pop()
    if tuple(tokens[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f"{self.path}: the first lines must be the special tokens {list(SPECIALS)}, got "
                       f"{tokens[:len(SPECIALS)]}.")
    if len(set(tokens)) != len(tokens):
      twice = sorted(token for token, count in collections.Counter(tokens).items() if count > 1)
      raise ValueError(f"{self.path}: tokens listed twice: {twice[:5]}.")
    self.tokens = tokens
    self._ids = {token: i for i, token in enumerate(tokens)}
    self.pad_id, self.unk_id, self.bos_id, self.sep_id, self.eod_id = range(len(SPECIALS))

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def encode(self, text: str) -> list[int]:
    """One id per character (unknown characters -> <unk>); no special tokens added."""
    return [self._ids.get(char, self.unk_id) for char in text]

  def decode(self, ids: Iterable[int]) -> str:
    """The characters of `ids`; special tokens other than <unk> are dropped, <unk> and ids past the vocabulary (padded
    embedding rows a model generated) show as U+FFFD."""
    return "".join("\ufffd" if i == self.unk_id or i >= len(self.tokens) else self.tokens[i] for i in map(int, ids)
                   if i >= len(SPECIALS) or i == self.unk_id)


def build(required: Iterable[str], others: Iterable[str], path: str | os.PathLike, size: int) -> CharVocab:
  """Writes a vocabulary of at most `size` tokens to `path` (a temporary file renamed when complete): SPECIALS,
  every character of `required` (most frequent first), then the most frequent characters of `others`."""
  def ranked(texts: Iterable[str]) -> list[str]:
    counts = collections.Counter(char for text in texts for char in text if not char.isspace())
    return sorted(counts, key=lambda char: (-counts[char], char))

  tokens = list(dict.fromkeys([*SPECIALS, *ranked(required)]))
  if len(tokens) > size:
    raise ValueError(f"A vocabulary of {size} tokens cannot hold the {len(tokens)} required ones.")
  tokens = list(dict.fromkeys([*tokens, *ranked(others)]))
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write("".join(token + "\n" for token in tokens[:size]))
  os.replace(path + ".tmp", path)
  return CharVocab(path)
