"""Character-level Chinese metrics: BLEU against nltk's corpus_bleu, ROUGE-L / Dist / EM / F1 by hand."""

import random
import warnings

import pytest
from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

from cpm_jax.evaluation import metrics

CHARS = "的一是在不了有和人这中大为上个国我以要他"


def random_text(rng, low, high):
  return "".join(rng.choice(CHARS) for _ in range(rng.randint(low, high)))


def test_characters_split_cjk_and_keep_ascii_runs():
  assert metrics.characters("我爱 Beijing 2008年！") == ["我", "爱", "Beijing", "2008", "年", "！"]


@pytest.mark.parametrize("seed", range(5))
def test_bleu_matches_nltk_corpus_bleu(seed):
  rng = random.Random(seed)
  hyps = [random_text(rng, 1, 12) for _ in range(20)]
  refs = [[random_text(rng, 3, 12) for _ in range(rng.randint(1, 3))] for _ in range(20)]
  ours = metrics.corpus_bleu(hyps, refs)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for n in range(1, 5):
      expected = nltk_corpus_bleu([[list(r) for r in rs] for rs in refs], [list(h) for h in hyps],
                                  weights=tuple([1.0 / n] * n))
      assert ours[f"bleu_{n}"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_bleu_edge_cases():
  assert metrics.corpus_bleu(["今天天气很好"], [["今天天气很好"]]) == {f"bleu_{n}": 1.0 for n in range(1, 5)}
  assert metrics.corpus_bleu([""], ["今天"])["bleu_1"] == 0.0
  # Brevity penalty: half the reference length.
  assert metrics.corpus_bleu(["今天"], ["今天天气"])["bleu_1"] == pytest.approx(2.718281828 ** (1 - 2))


def test_rouge_l_by_hand():
  # LCS("今天天气好", "今天的天气很好") = 今天天气好 (5): P = 5/5, R = 5/7.
  p, r, beta = 1.0, 5 / 7, 1.2
  assert metrics.rouge_l("今天天气好", "今天的天气很好") == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p))
  assert metrics.rouge_l("完全不同", ["今天的天气"]) == 0.0
  assert metrics.rouge_l("今天天气好", ["无关", "今天天气好"]) == pytest.approx(1.0)


def test_distinct_by_hand():
  hyps = ["好好好", "好的"]
  assert metrics.distinct(hyps, 1) == pytest.approx(2 / 5)  # {好, 的} of 5 characters
  assert metrics.distinct(hyps, 2) == pytest.approx(2 / 3)  # {好好, 好的} of 3 bigrams
  assert metrics.distinct([""], 2) == 0.0


def test_exact_match_and_f1():
  assert metrics.exact_match("北京。", ["北京", "上海"]) == 1.0
  assert metrics.exact_match("北京市", "北京") == 0.0
  # LCS 2 of prediction 3 and answer 2: P = 2/3, R = 1.
  assert metrics.f1("北京市", "北京") == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
  assert metrics.f1("上海", ["北京", "上海！"]) == 1.0
  assert metrics.f1("", "北京") == 0.0


def test_generation_metrics_names():
  results = metrics.generation_metrics(["今天天气好"], [["今天天气好"]], ["bleu", "rouge_l", "distinct", "em", "f1"])
  assert set(results) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "dist_1", "dist_2", "em", "f1"}
  with pytest.raises(ValueError, match="Unknown generation metrics \\['meteor'\\]"):
    metrics.generation_metrics([], [], ["meteor"])
