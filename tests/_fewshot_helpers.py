"""Hand-written few-shot data in FewCLUE's formats (EPRSTMT: sentence + Positive / Negative; BUSTM: sentence1,
sentence2, 0 / 1), a vocab.txt of just their characters, and a tiny encoder config over it."""

import json

import pytest

from cpm_jax.models import plug

POSITIVE = ["物流很快，包装很好", "质量不错，很满意", "音质很好，值得购买", "客服态度好，推荐", "手机很漂亮，好用",
            "性价比高，喜欢", "电池耐用，不错", "送货快，东西好", "做工精致，满意", "耳机舒服，好评",
            "屏幕清晰，很棒", "价格便宜，好用", "正品，很好", "外观好看，满意"]
NEGATIVE = ["质量太差，失望", "物流很慢，差评", "用了几天就坏了", "客服态度差，不推荐", "电池不耐用，后悔",
            "声音太小，不好", "包装破了，很差", "假货，别买", "屏幕有问题，失望", "充不进电，太差",
            "价格贵，不值", "做工粗糙，差", "耳机疼，不舒服", "信号差，后悔"]
PAIRS = [("今天天气怎么样", "今天天气好吗", 1), ("你叫什么名字", "你的名字是什么", 1), ("我想听音乐", "放首歌", 1),
         ("你几岁了", "今天天气好吗", 0), ("我想听音乐", "你叫什么名字", 0), ("明天下雨吗", "放首歌", 0)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
  return path


def reviews(texts, label, start=0):
  return [{"id": start + i, "sentence": text, "label": label} for i, text in enumerate(texts)]


@pytest.fixture(scope="session")
def fewshot_dir(tmp_path_factory):
  """EPRSTMT-format files: train (a pool to sample from), FewCLUE's presampled train_{0,1} / dev_{0,1},
  unlabeled, test_public; BUSTM-format pairs in bustm_train.json."""
  root = tmp_path_factory.mktemp("fewclue")
  pool = reviews(POSITIVE[:10], "Positive") + reviews(NEGATIVE[:10], "Negative", 10)
  write_jsonl(root / "train.json", pool)
  write_jsonl(root / "test_public.json", reviews(POSITIVE[10:], "Positive", 100) + reviews(NEGATIVE[10:], "Negative",
                                                                                            104))
  for seed in (0, 1):
    write_jsonl(root / f"train_{seed}.json", [pool[seed], pool[10 + seed]])
    write_jsonl(root / f"dev_{seed}.json", [pool[2 + seed], pool[12 + seed]])
  write_jsonl(root / "unlabeled.json", [{"id": i, "sentence": e["sentence"]} for i, e in enumerate(pool[4:10])])
  write_jsonl(root / "bustm_train.json", [{"id": i, "sentence1": a, "sentence2": b, "label": str(y)}
                                          for i, (a, b, y) in enumerate(PAIRS)])
  return root


@pytest.fixture(scope="session")
def fewshot_vocab(tmp_path_factory):
  """A vocab.txt of the specials, every character above, the label words and UniMC's 是 / 非 (a multiple of 8)."""
  texts = POSITIVE + NEGATIVE + [a + b for a, b, _ in PAIRS] + ["感觉很好差评是非这条评论", "。"]
  chars = sorted({c for text in texts for c in text})
  tokens = SPECIALS + chars
  tokens += [f"[unused{i}]" for i in range(-len(tokens) % 8)]
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return path


TINY = dict(num_encoder_layers=1, num_decoder_layers=0, embed_dim=16, num_heads=8, mlp_dim=32, max_positions=32,
            type_vocab_size=2, num_relations=0, num_classes=0, dropout_rate=0.0, init_stddev=0.05)


def tiny_config(vocab_size, **overrides):
  """A 1-layer encoder (every size divisible by 8, so any 8-device mesh applies)."""
  return plug.PlugConfig(**{**TINY, "vocab_size": vocab_size, **overrides})
