"""The FewCLUE protocol (seeded K-per-class samples, disjoint splits, FewCLUE's own files) and the few-shot rows
(the [CLS], PET and UniMC formats) built from hand-written EPRSTMT / BUSTM jsonl, and what the rows declare of the
model config."""

import collections

import numpy as np
import pytest

from _fewshot_helpers import fewshot_dir, fewshot_vocab, tiny_config  # noqa: F401  (session fixtures)
from cpm_jax import model_fit
from cpm_jax.data.fewshot import FewShotTask
from cpm_jax.evaluation.tasks import WHERE
from cpm_jax.gin_setup import ConfigError
from cpm_jax.models import plug
from cpm_jax.models.plug import data as plug_data
from cpm_jax.models.plug import fewshot_inputs
from cpm_jax.tokenization import BertTokenizer

LABELS = ("Negative", "Positive")


def _task(fewshot_dir, **options):  # noqa: F811
  return FewShotTask(dataset=f"{fewshot_dir}/{{split}}.json", labels=LABELS, test_split="test_public", **options)


def _ids(examples):
  return [e["id"] for e in examples]


def test_sampler_is_seeded_k_per_class_and_disjoint(fewshot_dir):  # noqa: F811
  task = _task(fewshot_dir, shots_per_class=3)
  first, other = task.splits(0), task.splits(1)
  again = FewShotTask.splits.__wrapped__(task, 0)  # drawn again, not the cached sample
  assert _ids(first.train) == _ids(again.train) and _ids(first.dev) == _ids(again.dev)
  assert _ids(first.train) != _ids(other.train)
  for part in (first.train, first.dev):
    assert collections.Counter(e["label"] for e in part) == {"Positive": 3, "Negative": 3}
  train, dev, pool = set(_ids(first.train)), set(_ids(first.dev)), set(_ids(first.unlabeled))
  assert not train & dev and not train & pool and not dev & pool
  assert train | dev | pool == set(range(20))  # the rest of the pool is the unlabelled pool
  assert all("label" not in e for e in first.unlabeled)
  assert _ids(first.test) == list(range(100, 104)) + list(range(104, 108))
  assert first.train[0][WHERE].endswith("train.json:" + str(_ids(first.train)[0] + 1))

  limited = _task(fewshot_dir, shots_per_class=3, unlabeled_max_examples=5, test_max_examples=4).splits(0)
  assert len(limited.unlabeled) == 5 and set(_ids(limited.unlabeled)) <= pool
  supervised = _task(fewshot_dir, shots_per_class=None).splits(0)
  assert len(supervised.train) == 18 and len(supervised.dev) == 2 and not supervised.unlabeled
  with pytest.raises(ValueError, match="shots_per_class=6 needs 12"):
    _task(fewshot_dir, shots_per_class=6).splits(0)
  with pytest.raises(ValueError, match=r"train.json:1: label 'Positive' .* not one of FewShotTask.labels"):
    FewShotTask(dataset=f"{fewshot_dir}/{{split}}.json", labels=("0", "1"), test_split="test_public").splits(0)


def test_fewclue_presampled_files(fewshot_dir):  # noqa: F811
  task = _task(fewshot_dir, presampled_train="train_{seed}", presampled_dev="dev_{seed}", unlabeled_split="unlabeled")
  for seed in (0, 1):
    splits = task.splits(seed)
    assert _ids(splits.train) == [seed, 10 + seed] and _ids(splits.dev) == [2 + seed, 12 + seed]
    assert len(splits.unlabeled) == 6 and len(splits.test) == 8
  with pytest.raises(ValueError, match="presampled_dev and unlabeled_split"):
    _task(fewshot_dir, presampled_train="train_{seed}").splits(0)


@pytest.fixture(scope="module")
def tokenizer(fewshot_vocab):  # noqa: F811
  return BertTokenizer(fewshot_vocab)


def _row(input_format, example, tokenizer, label=1, rng=None, seq_len=32):
  return fewshot_inputs.features(example, input_format=input_format, tokenizer=tokenizer, seq_len=seq_len,
                                 num_classes=2, label=label, rng=rng)


def test_cls_rows_equal_the_classification_pipeline_for_pairs(tokenizer):
  example = {"sentence1": "今天天气怎么样", "sentence2": "今天天气好吗", "label": "1"}
  row = _row(fewshot_inputs.ClsFormat(templates=("{sentence1}", "{sentence2}")), example, tokenizer)
  reference = plug_data.classification_example(example, tokenizer=tokenizer, seq_len=32,
                                               text_fields=("sentence1", "sentence2"), label_field="label",
                                               label_ids={"0": 0, "1": 1})
  for key in ("inputs", "token_types", "segment_ids", "positions", "labels", "label_weights"):
    np.testing.assert_array_equal(row[key], reference[key], err_msg=key)
  assert row["text_mask"].sum() == len("今天天气怎么样") + len("今天天气好吗")


def test_prompt_rows_score_the_label_words_at_the_mask(tokenizer):
  prompt = fewshot_inputs.PromptFormat(template="感觉很[MASK]。{sentence}", label_words=("差", "好"))
  row = _row(prompt, {"sentence": "质量不错，很满意" * 6}, tokenizer, seq_len=16)  # cut to fit, the [MASK] kept
  tokens = tokenizer.convert_ids_to_tokens(row["inputs"])
  assert tokens[:6] == ["[CLS]", "感", "觉", "很", "[MASK]", "。"] and tokens[-1] == "[SEP]"
  assert row["score_positions"].tolist() == [4, 4]
  assert row["score_ids"].tolist() == tokenizer.convert_tokens_to_ids(["差", "好"])
  assert row["text_mask"].tolist() == [0] * 6 + [1] * 9 + [0]
  with pytest.raises(ValueError, match="exactly one \\[MASK\\]"):
    _row(fewshot_inputs.PromptFormat(template="{sentence}"), {"sentence": "好"}, tokenizer)
  with pytest.raises(ValueError, match="lacks"):
    _row(prompt, {"text": "好"}, tokenizer)


def test_unimc_rows_layout_masks_and_targets(tokenizer):
  unimc = fewshot_inputs.UniMCFormat(options=("差评", "好评"), question="这条评论", text_template="{sentence}")
  text = "物流很快，包装很好"
  row = _row(unimc, {"sentence": text}, tokenizer, label=1)
  n = 1 + 3 + 3 + 1 + 4 + 1 + len(text) + 1
  tokens = tokenizer.convert_ids_to_tokens(row["inputs"][:n])
  assert tokens[:12] == ["[CLS]", "[MASK]", "差", "评", "[MASK]", "好", "评", "[SEP]", "这", "条", "评", "论"]
  assert row["token_types"][:n].tolist() == [0] + [1] * 6 + [0] * (n - 7)
  assert row["block_ids"][:n].tolist() == [0, 1, 1, 1, 2, 2, 2] + [0] * (n - 7)
  assert row["positions"][:n].tolist() == [0, 1, 2, 3, 1, 2, 3] + list(range(4, 4 + n - 7))  # options restart at 1
  assert row["text_mask"][:n].tolist() == [0] * 13 + [1] * len(text) + [0]
  assert row["score_positions"].tolist() == [1, 4]
  yes, no = tokenizer.convert_tokens_to_ids(["是", "非"])
  assert row["score_ids"].tolist() == [yes, yes]
  assert row["mlm_positions"][:2].tolist() == [1, 4] and row["mlm_targets"][:2].tolist() == [no, yes]
  assert row["mlm_weights"].sum() == 2  # no rng: no text noise
  unlabelled = _row(unimc, {"sentence": text}, tokenizer, label=None)
  assert unlabelled["mlm_weights"].sum() == 0 and unlabelled["label_weights"] == 0

  # Text noise: the mask rate is drawn from {0, .1, .2, .3} with p = .3, .3, .25, .15; targets only in the text.
  long_text = "质量不错很满意" * 4  # 28 text tokens: rates give 0, 3, 6, 8 targets
  counts = collections.Counter()
  for seed in range(400):
    noised = _row(unimc, {"sentence": long_text}, tokenizer, label=0, rng=np.random.default_rng(seed), seq_len=64)
    chosen = noised["mlm_positions"][2:][noised["mlm_weights"][2:] > 0]
    assert noised["text_mask"][chosen].all()
    counts[len(chosen)] += 1
  assert set(counts) == {0, 3, 6, 8}
  np.testing.assert_allclose([counts[k] / 400 for k in (0, 3, 6, 8)], [0.3, 0.3, 0.25, 0.15], atol=0.07)
  capped = fewshot_inputs.UniMCFormat(options=("差评", "好评"), text_template="{sentence}",
                                      masking=fewshot_inputs.TextMasking(rates=(0.3,), probabilities=(1.0,),
                                                                         max_predictions=4))
  noised = _row(capped, {"sentence": long_text}, tokenizer, label=0, rng=np.random.default_rng(0), seq_len=64)
  assert noised["mlm_weights"].shape == (6,) and noised["mlm_weights"].sum() == 6
  assert fewshot_inputs.format_from_record(capped.record()) == capped


def test_rows_declare_what_they_need_of_the_model_config(fewshot_dir, fewshot_vocab):  # noqa: F811
  """model_fit: the vocab size is taken from the vocab, seq_len above max_positions and a [CLS] head with fewer
  classes than labels are start-up errors naming the bindings, and real batches pass the declared checks."""
  vocab_size = BertTokenizer(fewshot_vocab).vocab_size
  data = fewshot_inputs.FewShotData(vocab_path=str(fewshot_vocab), task=_task(fewshot_dir, shots_per_class=3),
                                    input_format=fewshot_inputs.UniMCFormat(text_template="{sentence}"), seq_len=32,
                                    global_batch_size=8)
  fitted = model_fit.fit(plug.FewShotModel(tiny_config(vocab_size + 8), head="mlm"), data)
  assert fitted.config.vocab_size == vocab_size
  batch = next(data.train_iterator(seed=0))
  model_fit.BatchCheck(fitted.config, data.model_requirements())(batch, "batch 1")
  with pytest.raises(ConfigError, match=r"PlugConfig.max_positions = 16 .* FewShotData.seq_len = 32"):
    model_fit.fit(plug.FewShotModel(tiny_config(vocab_size, max_positions=16), head="mlm"), data)
  cls_data = fewshot_inputs.FewShotData(vocab_path=str(fewshot_vocab), task=data.task, seq_len=32)
  with pytest.raises(ConfigError, match=r"PlugConfig.num_classes = 1 .* FewShotTask.labels"):
    model_fit.fit(plug.FewShotModel(tiny_config(vocab_size, num_classes=1)), cls_data)
  with pytest.raises(ValueError, match="'token_types' holds 1, out of range for PlugConfig.type_vocab_size = 1"):
    model_fit.BatchCheck(tiny_config(vocab_size, type_vocab_size=1), data.model_requirements())(batch, "batch 1")
