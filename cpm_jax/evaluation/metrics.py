"""Text metrics for Chinese, at character level: BLEU-1..4, ROUGE-L, Dist-1/2, EM / F1, accuracy.

Texts are split by `characters`: every CJK character or punctuation mark is a token, runs of ASCII letters and
digits are one token each (so English words and numbers count once), whitespace is dropped.
"""

from __future__ import annotations

import collections
import math
import re
import string
import unicodedata
from typing import Sequence

_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")


def characters(text: str) -> list[str]:
  return _TOKEN.findall(text)


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _references(refs: str | Sequence[str]) -> list[str]:
  return [refs] if isinstance(refs, str) else list(refs)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                max_order: int = 4) -> dict[str, float]:
  """Corpus BLEU-1..max_order (cumulative, uniform weights, no smoothing, as nltk's corpus_bleu).

  Clipped n-gram counts and lengths are summed over the corpus; the brevity penalty uses, per hypothesis,
  the reference length closest to it (the shorter on ties).
  """
  matches, totals = [0] * max_order, [0] * max_order
  hyp_length = ref_length = 0
  for hyp, refs in zip(hypotheses, references, strict=True):
    hyp_tokens = characters(hyp)
    ref_tokens = [characters(r) for r in _references(refs)]
    hyp_length += len(hyp_tokens)
    ref_length += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in ref_tokens)[1]
    for n in range(1, max_order + 1):
      counts = _ngrams(hyp_tokens, n)
      clip = collections.Counter()
      for r in ref_tokens:
        clip |= _ngrams(r, n)
      matches[n - 1] += sum(min(c, clip[g]) for g, c in counts.items())
      totals[n - 1] += max(len(hyp_tokens) - n + 1, 1)  # nltk's floor of one n-gram per hypothesis
  if hyp_length == 0:
    return {f"bleu_{n}": 0.0 for n in range(1, max_order + 1)}
  penalty = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
  scores = {}
  for n in range(1, max_order + 1):
    if min(matches[:n]) == 0:
      scores[f"bleu_{n}"] = 0.0
    else:
      log_precision = sum(math.log(matches[i] / totals[i]) for i in range(n)) / n
      scores[f"bleu_{n}"] = penalty * math.exp(log_precision)
  return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    diagonal = 0
    for j, y in enumerate(b, start=1):
      diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


def rouge_l(hypothesis: str, references: str | Sequence[str], beta: float = 1.2) -> float:
  """ROUGE-L F-measure as in coco-caption: max LCS precision and recall over references, beta = 1.2."""
  hyp = characters(hypothesis)
  precision = recall = 0.0
  for ref in map(characters, _references(references)):
    lcs = _lcs_length(hyp, ref)
    precision = max(precision, lcs / len(hyp) if hyp else 0.0)
    recall = max(recall, lcs / len(ref) if ref else 0.0)
  if precision == 0 or recall == 0:
    return 0.0
  return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def distinct(hypotheses: Sequence[str], n: int) -> float:
  """Dist-n: distinct n-grams / all n-grams over the whole corpus of generations."""
  counts = collections.Counter()
  for hyp in hypotheses:
    counts.update(_ngrams(characters(hyp), n))
  total = sum(counts.values())
  return len(counts) / total if total else 0.0


_PUNCTUATION = set(string.punctuation) | set("，。、；：？！“”‘’（）《》【】—…·～「」『』〈〉")


def _normalize_answer(text: str) -> list[str]:
  """Lower-cased character tokens without punctuation (CMRC-2018 style)."""
  return [t for t in characters(text.lower())
          if t not in _PUNCTUATION and not unicodedata.category(t[0]).startswith("P")]


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
  pred = _normalize_answer(prediction)
  return float(any(pred == _normalize_answer(a) for a in _references(answers)))


def f1(prediction: str, answers: str | Sequence[str]) -> float:
  """Character F1 by longest common subsequence (CMRC-2018's), the best over the answers."""
  pred = _normalize_answer(prediction)
  best = 0.0
  for answer in map(_normalize_answer, _references(answers)):
    lcs = _lcs_length(pred, answer)
    if lcs:
      precision, recall = lcs / len(pred), lcs / len(answer)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]],
                       names: Sequence[str]) -> dict[str, float]:
  """The requested metrics ('bleu', 'rouge_l', 'distinct', 'em', 'f1') averaged over a corpus."""
  known = {"bleu", "rouge_l", "distinct", "em", "f1"}
  unknown = set(names) - known
  if unknown:
    raise ValueError(f"Unknown generation metrics {sorted(unknown)}; expected some of {sorted(known)}.")
  count = max(len(hypotheses), 1)
  results = {}
  if "bleu" in names:
    results.update(corpus_bleu(hypotheses, references))
  if "rouge_l" in names:
    results["rouge_l"] = sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / count
  if "distinct" in names:
    results.update({f"dist_{n}": distinct(hypotheses, n) for n in (1, 2)})
  if "em" in names:
    results["em"] = sum(exact_match(h, r) for h, r in zip(hypotheses, references)) / count
  if "f1" in names:
    results["f1"] = sum(f1(h, r) for h, r in zip(hypotheses, references)) / count
  return results
