"""PLUG objectives on hand-made examples and their statistics; the StructBERT / PALM / task pipelines on real data."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from _data_helpers import demo_data_dir  # noqa: F401  (session fixture)
from cpm_jax.models.plug import objectives
from cpm_jax.data import processes, sources
from cpm_jax.models.plug import data as plug_pipeline
from cpm_jax.tokenization import BertTokenizer


def test_mask_tokens_picks_15_percent_of_candidates_80_10_10():
  rng = np.random.default_rng(0)
  tokens = np.arange(1000, 1200)
  candidates = np.ones(200, bool)
  candidates[:20] = False  # e.g. [CLS] / [SEP]: never chosen
  actions = {"mask": 0, "random": 0, "kept": 0}
  for _ in range(300):
    inputs, targets, weights = objectives.mask_tokens(tokens, rng, candidates=candidates, mask_id=103,
                                                      random_ids=(5000, 6000), rate=0.15)
    chosen = weights > 0
    assert chosen.sum() == 27 and not chosen[:20].any()  # round(0.15 x 180)
    np.testing.assert_array_equal(targets[chosen], tokens[chosen])
    assert (targets[~chosen] == 0).all() and (inputs[~chosen] == tokens[~chosen]).all()
    actions["mask"] += int((inputs[chosen] == 103).sum())
    actions["random"] += int(((inputs[chosen] >= 5000) & (inputs[chosen] < 6000)).sum())
    actions["kept"] += int((inputs[chosen] == tokens[chosen]).sum())
  total = 300 * 27
  assert sum(actions.values()) == total
  assert abs(actions["mask"] / total - 0.8) < 0.02
  assert abs(actions["random"] / total - 0.1) < 0.015 and abs(actions["kept"] / total - 0.1) < 0.015


def test_shuffle_trigrams_hand_made():
  tokens = np.arange(10, 19)  # 9 distinct tokens
  candidates = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1], bool)
  inputs, changed = objectives.shuffle_trigrams(tokens, np.random.default_rng(1), candidates=candidates,
                                                probability=1.0)
  # Trigram 0-2 is shuffled; 3-5 and 4-6 contain the non-candidate 4; 5-7 is shuffled; 8 is left over.
  assert sorted(inputs[0:3]) == [10, 11, 12] and changed[0:3].sum() >= 2
  assert sorted(inputs[5:8]) == [15, 16, 17] and changed[5:8].sum() >= 2
  np.testing.assert_array_equal(inputs[[3, 4, 8]], [13, 14, 18])
  np.testing.assert_array_equal(changed, inputs != tokens)
  unchanged, none = objectives.shuffle_trigrams(tokens, np.random.default_rng(1), candidates=candidates,
                                                probability=0.0)
  np.testing.assert_array_equal(unchanged, tokens)
  assert not none.any()


def test_shuffle_trigrams_rate_follows_probability():
  rng = np.random.default_rng(2)
  tokens = np.arange(3000)
  _, changed = objectives.shuffle_trigrams(tokens, rng, candidates=np.ones(3000, bool), probability=0.1)
  # Each shuffled trigram changes 2 or 3 positions; ~10% of start positions begin one (fewer once trigrams consume 3).
  shuffled_fraction = changed.sum() / 2.6 / 3000
  assert 0.06 < shuffled_fraction < 0.1


def test_sentence_relation_cases_and_label_distribution():
  rng = np.random.default_rng(0)
  labels = []
  for _ in range(3000):
    a, b, label = objectives.sentence_relation(rng, "A", "B", "X")
    assert (a, b) == {objectives.RELATION_NEXT: ("A", "B"), objectives.RELATION_PREVIOUS: ("B", "A"),
                      objectives.RELATION_RANDOM: ("A", "X")}[label]
    labels.append(label)
  assert all(abs(np.mean(np.array(labels) == k) - 1 / 3) < 0.03 for k in range(3))


def test_palm_split():
  assert objectives.palm_split(list(range(10)), 0.8) == (list(range(8)), [8, 9])
  assert objectives.palm_split([1, 2], 0.99) == ([1], [2]) and objectives.palm_split([1, 2], 0.0) == ([1], [2])
  with pytest.raises(ValueError, match="at least 2"):
    objectives.palm_split([1], 0.8)


def _ce(logits, label):
  return float(np.log(np.exp(logits).sum()) - logits[label])


def test_structbert_loss_is_sum_of_means_and_palm_loss_token_weighted():
  rng = np.random.default_rng(0)
  mlm = rng.standard_normal((2, 4, 7))
  targets = np.array([[1, 2, 0, 0], [3, 0, 4, 0]])
  weights = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], np.float32)
  relation = rng.standard_normal((2, 3))
  labels = np.array([2, 0])
  loss, sums = objectives.structbert_loss(jnp.asarray(mlm), targets, weights, jnp.asarray(relation), labels,
                                          np.ones(2, np.float32))
  mlm_mean = np.mean([_ce(mlm[0, 0], 1), _ce(mlm[0, 1], 2), _ce(mlm[1, 0], 3), _ce(mlm[1, 2], 4)])
  relation_mean = np.mean([_ce(relation[0], 2), _ce(relation[1], 0)])
  np.testing.assert_allclose(loss, mlm_mean + relation_mean, rtol=1e-5)  # two MLM targets in each example
  assert float(sums["relation_count"]) == 2 and float(sums["weight_sum"]) == 4
  np.testing.assert_allclose(sums["relation_loss_sum"], 2 * relation_mean, rtol=1e-5)

  dec = rng.standard_normal((2, 3, 7))
  dec_targets, dec_weights = np.array([[5, 6, 0], [1, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, sums = objectives.palm_loss(jnp.asarray(mlm), targets, weights, jnp.asarray(dec), dec_targets, dec_weights)
  dec_ces = [_ce(dec[0, 0], 5), _ce(dec[0, 1], 6), _ce(dec[1, 0], 1)]
  np.testing.assert_allclose(loss, (4 * mlm_mean + sum(dec_ces)) / 7, rtol=1e-5)
  np.testing.assert_allclose(sums["decoder_loss_sum"] / sums["decoder_weight_sum"], np.mean(dec_ces), rtol=1e-5)


# ---- pipelines on real data ------------------------------------------------------------------

def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_structbert_batches_real_corpus(plug_vocab_path, demo_data_dir):  # noqa: F811
  tokenizer = BertTokenizer(plug_vocab_path)
  data = plug_pipeline.StructBertData(vocab_path=str(plug_vocab_path), data_dir=str(demo_data_dir), seq_len=64,
                                      global_batch_size=16, max_examples=400,
                                      noise=plug_pipeline.Noise(trigram_probability=0.1))
  iterator = data.train_iterator(seed=3)
  batches = _batches(iterator, 4)
  state = iterator.get_state()
  following = next(iterator)
  for b in batches:
    assert {k: v.shape for k, v in b.items()} == {
        "inputs": (16, 64), "token_types": (16, 64), "segment_ids": (16, 64), "positions": (16, 64),
        "targets": (16, 64), "weights": (16, 64), "relation_labels": (16,), "relation_weights": (16,)}
    assert (b["inputs"][:, 0] == tokenizer.cls_id).all()
    targeted = b["weights"] > 0
    assert (b["segment_ids"][targeted] == 1).all() and (b["targets"][targeted] > 0).all()
    assert not np.isin(b["targets"][targeted], [tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]).any()
    tokens = b["segment_ids"].sum()
    assert 0.12 < targeted.sum() / tokens < 0.3  # 15% MLM (of non-special tokens) + shuffled trigram positions
  labels = np.concatenate([b["relation_labels"] for b in batches])
  assert set(labels) == {0, 1, 2}
  # Deterministic, and resumable from the iterator state.
  again = _batches(data.train_iterator(seed=3), 4)
  for a, b in zip(batches, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  resumed = data.train_iterator(seed=3)
  resumed.set_state(state)
  for key, value in next(resumed).items():
    np.testing.assert_array_equal(value, following[key])


def test_palm_batches_split_prefix_and_continuation(plug_vocab_path, demo_data_dir):  # noqa: F811
  tokenizer = BertTokenizer(plug_vocab_path)
  data = plug_pipeline.PalmData(vocab_path=str(plug_vocab_path), data_dir=str(demo_data_dir), seq_len=48,
                                target_len=16, source_ratio=0.8, global_batch_size=4, eval_split="train",
                                eval_max_examples=4)
  b = next(data.eval_batches())  # row i is the i-th of 4 paragraphs spaced evenly over the split (splits.spread)
  split = sources.load_examples("peoples_daily_1998", "train", demo_data_dir)
  paragraphs = [split[i * len(split) // 4] for i in range(4)]
  for row, paragraph in enumerate(paragraphs):
    n = int(b["decoder_segment_ids"][row].sum())
    assert b["decoder_inputs"][row, 0] == tokenizer.cls_id and b["decoder_targets"][row, n - 1] == tokenizer.sep_id
    np.testing.assert_array_equal(b["decoder_inputs"][row, 1:n], b["decoder_targets"][row, :n - 1])
    m = int(b["segment_ids"][row].sum())
    restored = np.where(b["weights"][row] > 0, b["targets"][row], b["inputs"][row])[1:m - 1]  # MLM noise undone
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(paragraph["text"]))
    fits = min(len(ids), 46 + 15)  # the first span that fits both sides, 80% of it the source
    split_at = round(0.8 * fits)
    assert restored.tolist() == ids[max(0, split_at - 46):split_at]  # a source past 46 tokens keeps its end
    assert b["decoder_targets"][row, :n - 1].tolist() == ids[split_at:fits]
    assert 0 < (b["weights"][row] > 0).sum() <= 0.2 * m


def test_classification_and_seq2seq_jsonl(plug_vocab_path, tmp_path):
  rows = [{"sentence1": "今天天气很好", "sentence2": "天气不错", "label": "entailment"},
          {"sentence1": "他去了北京", "sentence2": "他在上海", "label": "contradiction"}]
  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
  data = plug_pipeline.ClassificationData(vocab_path=str(plug_vocab_path), dataset=str(tmp_path / "{split}.jsonl"),
                                          text_fields=("sentence1", "sentence2"), label_field="label",
                                          labels=("contradiction", "entailment"), seq_len=16, global_batch_size=2,
                                          eval_split="train")
  b = next(data.eval_batches())
  np.testing.assert_array_equal(b["labels"], [1, 0])
  assert b["token_types"][0].tolist() == [0] * 8 + [1] * 5 + [0] * 3  # [CLS] 6 chars [SEP] | 4 chars [SEP] | pad
  (tmp_path / "bad.jsonl").write_text(json.dumps({"sentence1": "x", "label": "entailment"}))
  with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['sentence2'\]"):
    next(plug_pipeline.ClassificationData(vocab_path=str(plug_vocab_path), dataset=str(tmp_path / "bad.jsonl"),
                                          text_fields=("sentence1", "sentence2")).train_iterator(0))

  qg = [{"answer": "北京", "context": "中国的首都是北京。", "question": "中国的首都是哪里？"}]
  (tmp_path / "qg.jsonl").write_text(json.dumps(qg[0], ensure_ascii=False))
  seq2seq = plug_pipeline.Seq2SeqData(vocab_path=str(plug_vocab_path), dataset=str(tmp_path / "qg.jsonl"),
                                      seq_len=24, target_len=12, global_batch_size=1)
  b = next(seq2seq.eval_batches())
  tokenizer = BertTokenizer(plug_vocab_path)
  assert tokenizer.decode(b["inputs"][0], skip_special_tokens=False).startswith("[CLS]北京[SEP]中国的首都是北京。[SEP]")
  assert tokenizer.decode(b["decoder_targets"][0][b["decoder_weights"][0] > 0]) == "中国的首都是哪里？"
  assert b["weights"].sum() == 0  # no MLM noise when fine-tuning


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _concatenated(shares):
  return [{key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]} for batches in zip(*shares)]


def test_eval_batches_are_the_same_global_batches_on_any_process_count(plug_vocab_path, tmp_path):
  # 5 examples in global batches of 4: the second batch holds one example, so process 1's share of it is empty.
  _write_jsonl(tmp_path / "validation.jsonl", [{"text": f"第{i}条评论很好", "label": str(i % 2)} for i in range(5)])
  make = lambda **share: list(plug_pipeline.ClassificationData(  # noqa: E731
      vocab_path=str(plug_vocab_path), dataset=str(tmp_path / "{split}.jsonl"), seq_len=16, global_batch_size=4,
      **share).eval_batches())
  whole, shares = make(), [make(process_index=p, process_count=2) for p in range(2)]
  assert len(whole) == len(shares[0]) == len(shares[1]) == 2  # no process stops early: none waits in a collective
  for got, want in zip(_concatenated(shares), whole):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  np.testing.assert_array_equal(shares[1][1]["label_weights"], [0, 0])  # an all-padding batch counts nowhere
  np.testing.assert_array_equal(whole[1]["label_weights"], [1, 0, 0, 0])
  np.testing.assert_array_equal(np.concatenate([b["labels"][b["label_weights"] > 0] for b in whole]), [0, 1, 0, 1, 0])


def test_structbert_eval_draws_its_negatives_from_the_eval_split(plug_vocab_path, tmp_path):
  tokenizer = BertTokenizer(plug_vocab_path)
  train_chars, eval_chars = "甲乙丙丁戊己庚辛", "天地人山水风云雨"
  docs = lambda chars, n: [{"text": "".join(chars[(i + j) % 8] * 2 + "。" for j in range(4))}  # noqa: E731
                           for i in range(n)]
  _write_jsonl(tmp_path / "train.jsonl", docs(train_chars, 6))
  _write_jsonl(tmp_path / "validation.jsonl", docs(eval_chars, 12))
  make = lambda **share: plug_pipeline.StructBertData(  # noqa: E731
      vocab_path=str(plug_vocab_path), dataset=str(tmp_path / "{split}.jsonl"), seq_len=32, global_batch_size=4,
      **share)
  ids = lambda chars: set(tokenizer.convert_tokens_to_ids(list(chars + "。")))  # noqa: E731
  special = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id}
  # A batch's tokens with the MLM noise undone.
  tokens = lambda b: set(np.where(b["weights"] > 0, b["targets"], b["inputs"]).ravel()) - special  # noqa: E731
  batches = list(make().eval_batches())
  labels = np.concatenate([b["relation_labels"] for b in batches])
  assert (labels == objectives.RELATION_RANDOM).sum() >= 2  # the case under test occurs
  assert set().union(*map(tokens, batches)) <= ids(eval_chars)
  assert tokens(next(make().train_iterator(seed=0))) <= ids(train_chars)
  # Noise and negatives are drawn per example, whatever the process count.
  for got, want in zip(_concatenated([list(make(process_index=p, process_count=2).eval_batches()) for p in range(2)]),
                       batches):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_plug_train_iterators_resume_exactly_on_any_process_count(plug_vocab_path, demo_data_dir, tmp_path):  # noqa: F811
  """PalmData, Seq2SeqData and ClassificationData continue exactly from a saved iterator state, also when the state
  of a run reading 2 data shards in 1 process is restored by 2 processes reading one each (#15 part 4)."""
  pairs = [{"sentence1": f"今天天气很好{i}", "sentence2": "天气不错", "label": ["entailment", "contradiction"][i % 2]}
           for i in range(8)]
  _write_jsonl(tmp_path / "pairs.jsonl", pairs)
  _write_jsonl(tmp_path / "qg.jsonl", [{"answer": "北京", "context": f"中国的首都是北京{i}。", "question": "首都？"}
                                       for i in range(8)])
  vocab = str(plug_vocab_path)
  datasets = [
      plug_pipeline.PalmData(vocab_path=vocab, data_dir=str(demo_data_dir), seq_len=48, target_len=16,
                             global_batch_size=4, max_examples=40),
      plug_pipeline.Seq2SeqData(vocab_path=vocab, dataset=str(tmp_path / "qg.jsonl"), seq_len=24, target_len=12,
                                global_batch_size=4),
      plug_pipeline.ClassificationData(vocab_path=vocab, dataset=str(tmp_path / "pairs.jsonl"),
                                       text_fields=("sentence1", "sentence2"), labels=("contradiction", "entailment"),
                                       seq_len=24, global_batch_size=4)]
  for data in datasets:
    def sharded(index, count, data=data):
      return processes.ShardedIterator(lambda shard, shards: data.shard(shard, shards).train_iterator(seed=5), 2,
                                       process_index=index, process_count=count)
    whole = sharded(0, 1)
    _batches(whole, 3)
    states = whole.shard_states()
    following = _batches(whole, 2)
    resumed = sharded(0, 1)
    resumed.set_shard_states(states)
    halves = [sharded(index, 2) for index in (0, 1)]
    for half in halves:
      half.set_shard_states(states)
    for expected, again, *shares in zip(following, _batches(resumed, 2), *[_batches(half, 2) for half in halves]):
      for key in expected:
        np.testing.assert_array_equal(again[key], expected[key], err_msg=f"{type(data).__name__} {key}")
        np.testing.assert_array_equal(np.concatenate([share[key] for share in shares]), expected[key],
                                      err_msg=f"{type(data).__name__} {key} on 2 processes")
