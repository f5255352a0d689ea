"""Evaluation: scoring against transformers, CPM-1's task protocols on a recording fake model, gin task files,
bad input, checkpoint loading, the command-line programs, and zero-shot sentiment of an untrained model."""

import collections
import dataclasses
import glob
import json
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import zlib

import gin
import jax
import numpy as np
import pytest

from cpm_jax import checkpointing, decoding, gin_setup, partitioning, serving_weights
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import batching, interface, report, scoring, tasks
from cpm_jax.models import cpm, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = cpm.CPMConfig(vocab_size=30000, num_layers=2, embed_dim=32, num_heads=4, max_positions=64,
                       dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
  return jax.jit(cpm.init, static_argnums=0)(CONFIG, jax.random.key(1))


# ---- scoring -----------------------------------------------------------------------------------

def test_scores_match_transformers_gpt2(params, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from cpm_jax.models.cpm import hf

  hf_model = transformers.GPT2LMHeadModel.from_pretrained(hf.save_hf(params, CONFIG, tmp_path / "hf")).eval()
  rng = np.random.default_rng(0)
  requests = [(rng.integers(10, 30000, n).tolist(), rng.integers(10, 30000, m).tolist())
              for n, m in [(0, 5), (3, 1), (1, 9), (30, 35), (7, 7)]]
  totals, counts = scoring.score_requests(cpm.score_fn(CONFIG), params, requests, max_length=64,
                                          batch_size=2, pad_id=5)
  for (context, continuation), total, count in zip(requests, totals, counts):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
      log_probs = torch.log_softmax(hf_model(ids[:, :-1]).logits[0].double(), -1)
    scored = range(max(len(context) - 1, 0), ids.shape[1] - 1)
    expected = sum(float(log_probs[t, ids[0, t + 1]]) for t in scored)
    assert count == len(scored)
    assert total == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_truncation_from_the_left_and_strict_mode(caplog):
  assert scoring.truncate(([1, 2, 3, 4], [5, 6]), 4, "x.jsonl:3", strict=False) == (([2, 3, 4], [5, 6]), 1)
  assert scoring.truncate(([1], [2, 3, 4, 5, 6, 7]), 4, "x.jsonl:3", strict=False) == (([], [3, 4, 5, 6, 7]), 2)
  with pytest.raises(ValueError, match="x.jsonl:3: 6 tokens exceed the model's 4 positions.*strict"):
    scoring.truncate(([1, 2, 3, 4], [5, 6]), 4, "x.jsonl:3", strict=True)
  score_fn = lambda params, batch: {"total": batch["weights"].sum(-1), "count": batch["weights"].sum(-1)}  # noqa
  with caplog.at_level(logging.WARNING):
    totals, _ = scoring.score_requests(score_fn, None, [([1] * 9, [2, 3]), ([1], [2]), ([1] * 7, [2])],
                                       max_length=6, batch_size=2, pad_id=0, names=["a:1", "a:2", "a:3"])
  assert totals.tolist() == [2, 1, 1]
  assert "2 of 3 requests exceed the model's 6 positions" in caplog.text and "a:1, 4 tokens cut" in caplog.text


# ---- task protocols on a recording fake model ---------------------------------------------------

class CharTokenizer:
  eod_id, pad_id = 7, 5

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


def fake_model(preferred: str, generations=None):
  """Scores a request by whether its text contains `preferred`; records requests as text."""
  seen = []

  def score(requests, names=None):
    seen.extend((CharTokenizer().decode(c), CharTokenizer().decode([t for t in x if t != 7])) for c, x in requests)
    totals = np.array([5.0 if preferred in seen[-len(requests) + i][0] + seen[-len(requests) + i][1] else 1.0
                       for i in range(len(requests))])
    return totals * np.array([len(x) for _, x in requests]), np.array([len(x) for _, x in requests])

  def generate(prompts):
    return [CharTokenizer().encode(generations[i]) for i in range(len(prompts))]

  return interface.LanguageModel(CharTokenizer(), score, generate), seen


def test_label_prompt_protocol_and_sampled_setting():
  task = tasks.LabelPromptTask(name="t", templates=[["关于{label}：", "{sentence}"]], label_field="label_desc",
                               label_map={f"k{i}": f"类{i}" for i in range(6)}, sampled_wrong=3)
  examples = [{"sentence": "句子", "label_desc": "k2"}, {"sentence": "句子", "label_desc": "k4"}]
  model, seen = fake_model("类2")
  result = task.evaluate(model, examples)
  assert seen[:6] == [(f"关于类{i}：", "句子") for i in range(6)]
  assert result.metrics["accuracy"] == 0.5  # the model always prefers 类2
  assert result.predictions[1]["predicted"] == ["k2"]


def test_label_score_mean_favours_a_two_piece_label_and_sum_does_not():
  """p(差) = 0.45 then 评 for certain, against p(好) = 0.55: the mean per token picks 差评, the label's probability 好."""
  log_p = {"差评": math.log(0.45) + math.log(1.0), "好": math.log(0.55)}
  def score(requests, names=None):
    labels = [CharTokenizer().decode(x) for _, x in requests]
    return np.array([log_p[label] for label in labels]), np.array([len(label) for label in labels])
  model = interface.LanguageModel(CharTokenizer(), score, None)
  examples = [{"text": "好用", "label": 1}]
  label_map = {0: "差评", 1: "好"}
  by_mean = tasks.LabelPromptTask(name="t", templates=[["{text}：", "{label}"]], label_map=label_map)
  by_sum = dataclasses.replace(by_mean, score="sum")
  assert by_mean.evaluate(model, examples).metrics["accuracy"] == 0.0
  result = by_sum.evaluate(model, examples)
  assert result.metrics["accuracy"] == 1.0
  np.testing.assert_allclose(result.predictions[0]["sum_log_likelihood"], [[log_p["差评"], log_p["好"]]], atol=1e-5)
  with pytest.raises(ValueError, match="LabelPromptTask.score = 'max'; expected one of"):
    dataclasses.replace(by_mean, score="max").check(examples)


def hashed_model():
  """Scores each request by a hash of its text: distinct, input-dependent and unrelated to any label."""
  def score(requests, names=None):
    means = np.array([zlib.crc32(repr((list(c), list(x))).encode()) % 10007 / 1000 - 10 for c, x in requests])
    counts = np.array([len(x) for _, x in requests])
    return means * counts, counts

  return interface.LanguageModel(CharTokenizer(), score, None)


def test_sampled_setting_draws_3_wrong_labels_per_example_and_picks_among_them():
  labels = [f"k{i}" for i in range(6)]
  task = tasks.LabelPromptTask(name="t", templates=[["关于{label}：", "{sentence}"]], label_field="label_desc",
                               label_map={key: f"类{key}" for key in labels}, sampled_wrong=3, seed=5)
  examples = [{"sentence": f"句子{i}", "label_desc": labels[i % 6]} for i in range(240)]
  result = task.evaluate(hashed_model(), examples)
  drawn, correct = collections.Counter(), 0
  for example, record in zip(examples, result.predictions):
    wrong, gold = record["sampled_wrong"], example["label_desc"]
    assert len(set(wrong)) == 3 and gold not in wrong and set(wrong) <= set(labels), record
    drawn.update(wrong)
    scores = dict(zip(labels, record["mean_log_likelihood"][0]))  # recomputed from the reported scores
    best = max([*wrong, gold], key=scores.__getitem__)
    assert record["predicted_sampled"] == [best] and record["predicted"] == [max(labels, key=scores.__getitem__)]
    correct += best == gold
  assert result.metrics["accuracy_4way"] == correct / 240 == result.metrics["accuracy_4way/template_0"]
  assert result.metrics["accuracy_4way"] > result.metrics["accuracy"]  # 4 competitors, not 6
  # Each label is a wrong one for 200 examples and drawn for 3 of their 5 wrong labels: 120 +- 7 times.
  assert all(abs(drawn[key] - 120) < 30 for key in labels), drawn
  assert task.evaluate(hashed_model(), examples).predictions == result.predictions  # the seed fixes the draw
  other = dataclasses.replace(task, seed=6).evaluate(hashed_model(), examples).predictions
  assert sum(a["sampled_wrong"] != b["sampled_wrong"] for a, b in zip(other, result.predictions)) > 150


def test_label_prompt_errors_and_skip_labels():
  task = tasks.LabelPromptTask(name="ocnli", templates=[["{sentence1}？{label}，", "{sentence2}"]],
                               label_map={"entailment": "对", "contradiction": "错"}, skip_labels=["-"])
  model, _ = fake_model("对")
  examples = [{"sentence1": "a", "sentence2": "b", "label": "-", tasks.WHERE: "dev.json:1"},
              {"sentence1": "a", "sentence2": "b", "label": "entailment", tasks.WHERE: "dev.json:2"}]
  assert task.evaluate(model, examples).metrics["examples"] == 1
  with pytest.raises(ValueError, match="dev.json:3: label 'neutral' .*not in the label map of task 'ocnli'"):
    task.evaluate(model, examples + [{"sentence1": "a", "sentence2": "b", "label": "neutral",
                                      tasks.WHERE: "dev.json:3"}])
  with pytest.raises(ValueError, match="dev.json:2: template .* uses field 'sentence2', which the example lacks"):
    task.evaluate(model, [{"sentence1": "a", "label": "entailment", tasks.WHERE: "dev.json:2"}])


def test_few_shot_prefix_is_seeded_per_example():
  task = tasks.LabelPromptTask(name="t", templates=[["{text}：", "{label}"]], label_map={0: "差", 1: "好"},
                               shots=2, seed=3)
  demos = [{"text": f"d{i}", "label": i % 2} for i in range(10)]
  model, seen = fake_model("好")
  task.evaluate(model, [{"text": "x", "label": 1}, {"text": "y", "label": 0}], demos)
  first = seen[0][0]
  assert first.count("\n") == 2 and first.endswith("x：") and ("：好\n" in first or "：差\n" in first)
  assert task.prefix(0, demos) == task.prefix(0, demos) != task.prefix(1, demos)
  with pytest.raises(ValueError, match="shots=2 but only 1 demonstration"):
    task.prefix(0, demos[:1])


def test_multiple_choice_fills_the_blank_and_appends_eod():
  task = tasks.MultipleChoiceTask(name="chid")
  model, seen = fake_model("画蛇添足")
  result = task.evaluate(model, [{"content": "他这是#idiom12#。", "candidates": ["一举两得", "画蛇添足"], "answer": 1},
                                 {"content": "#idiom#", "candidates": ["画蛇添足", "x"], "answer": "x"}])
  assert seen[:2] == [("", "他这是一举两得。"), ("", "他这是画蛇添足。")]
  assert result.metrics["accuracy"] == 0.5 and [p["predicted"] for p in result.predictions] == [1, 0]
  with pytest.raises(ValueError, match="no blank matching"):
    task.evaluate(model, [{"content": "没有空", "candidates": ["a"], "answer": 0}])


def test_generation_task_metrics():
  task = tasks.GenerationTask(name="qa", prompt_template="{q}答：", reference_field="answers", metrics=["em", "f1"])
  model, _ = fake_model("", generations=["北京\n多余", "上海市"])
  result = task.evaluate(model, [{"q": "首都？", "answers": ["北京"]}, {"q": "?", "answers": ["上海"]}])
  assert result.metrics["em"] == 0.5
  assert result.metrics["f1"] == pytest.approx((1 + 0.8) / 2)
  assert result.predictions[0]["generated"] == "北京"


def test_malformed_jsonl_names_the_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "好"}\n\n{"text": 不是json}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
    tasks.read_jsonl(path)
  path.write_text('["a list"]\n', encoding="utf-8")
  with pytest.raises(ValueError, match=f"{path}:1: expected a JSON object"):
    tasks.read_jsonl(path)
  path.write_text("\n  \n", encoding="utf-8")
  with pytest.raises(ValueError, match=f"{path}: no examples"):
    tasks.read_jsonl(path)
  path.write_text('{"text": "好"}\n\n{"text": "坏"}\n', encoding="utf-8")
  assert tasks.read_jsonl(path) == [{"text": "好", tasks.WHERE: f"{path}:1"}, {"text": "坏", tasks.WHERE: f"{path}:3"}]


def test_adapters_run_fixed_size_batches_in_order_and_convert_the_decode_layout_once():
  batches = []

  def run(batch):
    batches.append(batch)
    return [10 * item for item in batch]

  assert batching.in_batches([1, 2, 3, 4, 5], 2, run, pad=0, desc="test") == [10, 20, 30, 40, 50]
  assert batches == [[1, 2], [3, 4], [5, 0]]  # one compiled shape: the last batch is padded
  assert batching.in_batches([], 2, run, pad=0, desc="test") == []
  conversions = []
  runner = batching.ModelRunner({"w": 1}, lambda params: conversions.append(params) or "decode layout", batch_size=2)
  assert runner.decode_params == runner.decode_params == "decode layout" and conversions == [{"w": 1}]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin_configs", "tasks", "*.gin"))),
                         ids=os.path.basename)
def test_every_task_gin_file_configures_a_task(path):
  gin.clear_config()
  try:
    gin_setup.parse([path], [])
    task = tasks.configured_task()
  finally:
    gin.clear_config()
  assert isinstance(task, tasks.Task) and task.name == os.path.basename(path)[:-4]


# ---- checkpoints and programs ------------------------------------------------------------------

def test_load_cpm_from_a_training_workdir(params, tmp_path, cpm_vocab_path):
  workdir = tmp_path / "workdir"
  with checkpointing.Checkpointer(workdir / "checkpoints", async_save=False) as checkpointer:
    state = {"params": params, "step": np.int32(3), "opt_state": {"mu": params}}
    checkpointer.maybe_save(3, state, force=True)
  with pytest.raises(FileNotFoundError, match="model.json"):
    model_lib.load_checkpoint(workdir)
  (workdir / "model.json").write_text(json.dumps(registry.record(CONFIG, tokenizer=str(cpm_vocab_path))))
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=1, tensor=4))
  loaded = model_lib.load_checkpoint(workdir, mesh)
  assert loaded.config == CONFIG and loaded.family.name == "cpm"
  assert model_lib.load_tokenizer(loaded).eod_id == 7
  assert loaded.params["blocks"]["attn"]["qkv_kernel"].sharding.spec == partitioning.logical_to_spec(
      cpm.logical_axes(CONFIG)["blocks"]["attn"]["qkv_kernel"], None, mesh.axis_names)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)


def run_program(name, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}  # this checkout's cpm_jax
  result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", name), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_programs_lm_score_and_generate(params, tmp_path, cpm_vocab_path):
  checkpoint = checkpointing.save_params(tmp_path / "ckpt", params, {
      "model_config": dataclasses.asdict(CONFIG), "tokenizer": str(cpm_vocab_path)})
  texts = ["今天天气很好，我们去公园散步。", "人工智能", "好"]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t, "prompt": t}, ensure_ascii=False) + "\n"
                                             for t in texts), encoding="utf-8")
  stdout = run_program("evaluate.py", f"--checkpoint={checkpoint}", "--task=lm_score",
                       f"--input_file={tmp_path / 'in.jsonl'}", f"--predictions={tmp_path / 'scores.jsonl'}",
                       f"--output={tmp_path / 'result.json'}")
  assert "perplexity" in stdout
  records = tasks.read_jsonl(tmp_path / "scores.jsonl")
  loaded = model_lib.load_checkpoint(checkpoint)
  config, tokenizer, loaded = loaded.config, model_lib.load_tokenizer(loaded), loaded.params
  for text, record in zip(texts, records):
    ids = tokenizer.encode(text)
    totals, counts = scoring.score_requests(cpm.score_fn(config), loaded, [(ids[:1], ids[1:])],
                                            max_length=64, batch_size=1, pad_id=5)
    assert record["tokens"] == len(ids) - 1 == counts[0]
    assert record["log_likelihood"] == pytest.approx(totals[0], rel=1e-5)
    if counts[0]:
      assert record["perplexity"] == pytest.approx(math.exp(-totals[0] / counts[0]), rel=1e-5)
  assert json.loads((tmp_path / "result.json").read_text())["metrics"]["tokens"] == sum(r["tokens"] for r in records)

  run_program("generate.py", f"--checkpoint={checkpoint}", f"--input_file={tmp_path / 'in.jsonl'}",
              f"--output={tmp_path / 'out.jsonl'}", "--max_new_tokens=5", "--top_k=5", "--top_p=0.9", "--seed=1")
  generated = [r["generated"] for r in tasks.read_jsonl(tmp_path / "out.jsonl")]
  model = cpm.language_model(loaded, config, tokenizer, {}, batch_size=8, decoding_config=
                             decoding.SamplingConfig(max_new_tokens=5, top_k=5, top_p=0.9, seed=1))
  assert generated == model.generate_text(texts)


def test_int8_checkpoint_converts_once_then_generate_streams_and_stops(params, tmp_path, cpm_vocab_path):
  source = checkpointing.save_params(tmp_path / "float", params, registry.record(CONFIG, tokenizer=str(
      cpm_vocab_path)))
  run_program("convert_checkpoint.py", f"--input={source}", f"--output={tmp_path / 'int8'}", "--weights=int8")
  int8 = model_lib.load_checkpoint(tmp_path / "int8")
  assert int8.metadata["weights"] == "int8"
  size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
  assert size(tmp_path / "int8") < 0.35 * size(tmp_path / "float")
  # Read back as the dequantised floats: exactly the numbers int8 serving quantises again.
  expected = serving_weights.round_trip(params, "int8", cpm.QUANTIZED)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), int8.params, expected)

  prompts = ["今天天气很好，", "人工智能"]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts),
                                     encoding="utf-8")
  model = model_lib.language_model(int8, model_lib.load_tokenizer(int8), long_text=True,
                                   decoding_config=decoding.SamplingConfig(max_new_tokens=70, greedy=True))
  # On device to <eod> or 70 tokens (past the 64 positions: the sliding window), one prompt at a time.
  full = [model.generate_text([p])[0] for p in prompts]
  stop = next(c for c in full[0][len(full[0]) // 2:] if c.strip())  # a character the first text produces
  stdout = run_program("generate.py", f"--checkpoint={tmp_path / 'int8'}", f"--input_file={tmp_path / 'in.jsonl'}",
                       "--max_new_tokens=70", "--greedy", "--long_text", "--stream", f"--stop={stop}",
                       f"--output={tmp_path / 'out.jsonl'}")
  streamed = [json.loads(line)["generated"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert all(text in stdout for text in streamed)
  for text, whole in zip(streamed, full):
    assert text == (whole[:whole.index(stop) + 1] if stop in whole else whole)
  assert len(streamed[0]) < len(full[0])


def test_w8a8_scores_through_its_decode_path_and_xl_refuses_it(params, cpm_vocab_path):
  tokenizer = cpm.CPMTokenizer(str(cpm_vocab_path))
  requests = [([11, 12, 13], [14, 15]), ([21, 22], [23, 24, 25, 26])]
  scores = {w: cpm.language_model(params, CONFIG, tokenizer, {}, weights=w).score(requests, None)
            for w in ("int8", "w8a8")}
  served = serving_weights.for_decoding(cpm.decode_layout(params), "w8a8", cpm.QUANTIZED)
  for (context, continuation), total, count in zip(requests, *scores["w8a8"]):
    row = np.array([context + continuation[:-1]])
    logits = np.asarray(cpm.served_logits(served, row, CONFIG, positions=np.arange(row.shape[1])[None],
                                          segment_ids=np.ones_like(row)), np.float64)[0, len(context) - 1:]
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert count == len(continuation)
    assert total == pytest.approx(log_probs[np.arange(len(continuation)), continuation].sum(), rel=1e-4)
  assert not np.array_equal(scores["w8a8"][0], scores["int8"][0])  # activations quantised, not int8's numbers
  np.testing.assert_allclose(scores["w8a8"][0], scores["int8"][0], rtol=0.02)
  xl_config = cpm.xl.CPMXLConfig(vocab_size=30000, num_layers=1, embed_dim=32, num_heads=4, segment_length=8,
                                 memory_length=8)
  with pytest.raises(ValueError, match="--weights=w8a8: CPM-XL scores in the training layout"):
    cpm.xl_decode.language_model(cpm.XL_FAMILY.init(xl_config, jax.random.key(0)), xl_config, tokenizer, {},
                                 weights="w8a8")


# ---- real data ---------------------------------------------------------------------------------

def test_untrained_model_is_at_chance_on_review_sentiment(params, tmp_path, cpm_vocab_path):
  from cpm_jax.tokenization import CPMTokenizer

  gin.clear_config()
  try:
    gin_setup.parse(["tasks/review_sentiment_zero_shot.gin"], [])
    task = tasks.configured_task()
  finally:
    gin.clear_config()
  examples = tasks.load_examples(task, None, str(tmp_path / "tfds"))
  assert {e["label"] for e in examples[:400]} == {0}  # the split is sorted by label: a prefix is one class
  examples = tasks.sample_examples(examples, 120, seed=0)
  assert 40 < sum(e["label"] for e in examples) < 80
  model = cpm.language_model(params, CONFIG, CPMTokenizer(cpm_vocab_path), {}, batch_size=48)
  result = task.evaluate(model, examples)
  # Scores of an untrained model carry no information about the label, so accuracy ~ Binomial(120, ~0.5) / 120:
  # 0.5 +- 0.15 is more than 3 standard deviations (0.046) plus the test split's 52/48 label imbalance.
  assert abs(result.metrics["accuracy"] - 0.5) < 0.15
  assert result.metrics["examples"] == 120 and len(result.predictions) == 120
  # ...and they are the model's scores of each review: they differ across reviews for every template and label,
  # and across labels within a review (a scorer that ignored its input would pass the line above).
  scores = np.array([record["mean_log_likelihood"] for record in result.predictions])  # [examples, templates, 2]
  assert scores.shape == (120, 3, 2) and (scores.std(axis=0) > 1e-3).all()
  assert (np.abs(scores[..., 0] - scores[..., 1]) > 1e-5).mean() > 0.9
  # The accuracy is what these scores give (label "0" first: 差评, "1": 好评) against the gold labels.
  gold = np.array([example["label"] for example in examples])
  np.testing.assert_allclose(result.metrics["accuracy"], (scores.argmax(-1) == gold[:, None]).mean())
  for t in range(3):
    assert result.metrics[f"accuracy/template_{t}"] == pytest.approx((scores[:, t].argmax(-1) == gold).mean())
  # A scorer that always prefers 好评, whatever the review, scores exactly the share of positive reviews.
  biased = interface.LanguageModel(model.tokenizer, lambda requests, names=None: (
      np.array([10.0 if model.tokenizer.decode(x) == "好评" else 0.0 for _, x in requests]),
      np.ones(len(requests))), None)
  assert task.evaluate(biased, examples).metrics["accuracy"] == pytest.approx(gold.mean())
  print(report.table(task.name, result.metrics))


# ---- the released prompts ----------------------------------------------------------------------

FORMATS = pathlib.Path(REPO).parent / "shared" / "docs" / "FORMATS.md"


@pytest.fixture(scope="module")
def released_prompts():
  """The CLUE classification prompts of FORMATS.md ("CPM zero-shot evaluation as released")."""
  if not FORMATS.exists():
    pytest.skip(f"{FORMATS} not found")
  text = " ".join(FORMATS.read_text(encoding="utf-8").split())
  paragraph = re.search(r"Classification \(TNEWS, IFLYTEK, OCNLI\): (.*?); score", text).group(1)
  ocnli = re.search(r'OCNLI s1 \+ "(.*?)" / "(.*?)" / "(.*?)" \+ s2 for (\w+) / (\w+) / (\w+)', paragraph)
  return {"tnews": re.search(r'TNEWS "(.*?)" \+ sentence', paragraph).group(1),
          "iflytek": re.search(r'IFLYTEK "(.*?)" \+ sentence', paragraph).group(1),
          "ocnli": dict(zip(ocnli.groups()[3:], ocnli.groups()[:3]))}


def _configured(name):
  gin.clear_config()
  try:
    gin_setup.parse([f"tasks/{name}.gin"], [])
    return tasks.configured_task()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name,field", [("tnews", "label_desc"), ("iflytek", "label_des")])
def test_tnews_and_iflytek_prompts_are_the_released_ones(released_prompts, name, field):
  task = _configured(name)
  (context, continuation), = task.templates
  example = {"sentence": "一条新闻的标题", field: "x"}
  for words in ("体育", "金融"):
    assert tasks.fill(context, example, 0, label=words) == released_prompts[name].replace("{label}", words)
  assert tasks.fill(continuation, example, 0, label="体育") == "一条新闻的标题"  # only the sentence is scored
  assert task.label_field == field and task.sampled_wrong == 3


def test_ocnli_prompts_are_the_released_ones(released_prompts):
  task = _configured("ocnli")
  (context, continuation), = task.templates
  example = {"sentence1": "他去了北京", "sentence2": "他在中国"}
  assert set(task.label_map) == set(released_prompts["ocnli"])
  for label, infix in released_prompts["ocnli"].items():  # s1 + "？对，" + s2 for entailment, ...
    words = task.label_map[label]
    assert tasks.fill(context, example, 0, label=words) + tasks.fill(continuation, example, 0, label=words) == \
        "他去了北京" + infix + "他在中国"
    assert tasks.fill(continuation, example, 0, label=words) == "他在中国"
