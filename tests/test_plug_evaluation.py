"""PLUG through evaluate.py and generate.py: question-generation fine-tuning scored by BLEU / ROUGE-L, and a
classifier's accuracy, each checked against the model run in-process."""

import dataclasses
import json
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _data_helpers import demo_data_dir  # noqa: F401  (session fixture)
from cpm_jax import decoding, gin_setup, train_loop
from cpm_jax.data import corpus
from cpm_jax.models.plug import data as plug_pipeline
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import tasks
from cpm_jax.models import plug
from cpm_jax.convert import orbax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_program(name, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", name), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def question_examples(count):
  """{"answer", "context", "question"} from real sentences: the answer is a 4-character span of the context and
  the question asks for it ("什么是<answer>？"), so a model must copy from its encoder input."""
  examples = []
  for paragraph in corpus.peoples_daily_paragraphs():
    sentence = paragraph.split("。")[0][:40]
    if len(sentence) >= 12:
      answer = sentence[4:8]
      examples.append({"answer": answer, "context": sentence, "question": f"什么是{answer}？"})
    if len(examples) == count:
      return examples


def test_question_generation_fine_tuning_scored_by_bleu_and_rouge(plug_vocab_path, tmp_path):
  data = tmp_path / "qg"
  data.mkdir()
  examples = question_examples(16)
  for split in ("train", "dev"):  # the model should fit its fine-tuning set: dev = train here
    (data / f"{split}.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
  workdir = tmp_path / "workdir"
  gin.clear_config()
  try:
    gin_setup.parse(["experiments/plug_question_generation_demo.gin"], [
        f'Seq2SeqData.vocab_path = "{plug_vocab_path}"', f'Seq2SeqData.dataset = "{data}/{{split}}.jsonl"',
        "Seq2SeqData.seq_len = 64", "Seq2SeqData.target_len = 16", "Seq2SeqData.global_batch_size = 8",
        "train.num_steps = 80", "train.eval_every = 80", "train.log_every = 80", "train.peak_flops = 1e12",
        "learning_rate_schedule.total_steps = 80", "learning_rate_schedule.warmup_steps = 10",
        "learning_rate_schedule.peak = 5e-3", "PlugConfig.dropout_rate = 0.0", "PlugConfig.max_positions = 64"])
    metrics = train_loop.train(str(workdir))
  finally:
    gin.clear_config()
  assert metrics["validation_loss"] < 1.0, metrics

  results = {}
  for name, extra in (("trained", []), ("untrained", ["--untrained"])):
    run_program("evaluate.py", f"--checkpoint={workdir}", "--task=plug_question_generation",
                f"--input_file={data / 'dev.jsonl'}", "--decoding=beam", f"--output={tmp_path / name}.json",
                "--gin_bindings=BeamSearchConfig.max_new_tokens = 12", "--gin_bindings=BeamSearchConfig.min_length = 1",
                *extra)
    results[name] = json.loads((tmp_path / f"{name}.json").read_text())
  trained, untrained = results["trained"]["metrics"], results["untrained"]["metrics"]
  assert trained["bleu_4"] > 0.5 > untrained["bleu_4"] + 0.3, (trained, untrained)
  assert trained["rouge_l"] > untrained["rouge_l"] + 0.4, (trained, untrained)

  # The program's generations are the Python API's: the workdir's record names model, config and vocab.
  checkpoint = model_lib.load_checkpoint(workdir)
  assert checkpoint.family.name == "plug" and checkpoint.config.max_positions == 64
  model = model_lib.language_model(checkpoint, model_lib.load_tokenizer(checkpoint), decoding_config=
                                   decoding.BeamSearchConfig(max_new_tokens=12, min_length=1))
  prompts = [f"{e['answer']}[SEP]{e['context']}" for e in examples]
  generated = model.generate_text(prompts)
  assert generated == [p["generated"] for p in results["trained"]["predictions"]]
  # The encoder input is what fine-tuning fed it: [CLS] answer [SEP] context [SEP], types 0 then 1.
  features = plug_pipeline.seq2seq_example(examples[0], tokenizer=model.tokenizer.bert, seq_len=64, target_len=16,
                                           source_fields=("answer", "context"), target_field="question")
  ids = model.tokenizer.encode(prompts[0])
  np.testing.assert_array_equal(features["inputs"][:len(ids)], ids)
  np.testing.assert_array_equal(features["token_types"][:len(ids)], model.tokenizer.token_types(ids))

  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n"
                                                  for p in prompts[:4]))
  run_program("generate.py", f"--checkpoint={workdir}", f"--input_file={tmp_path / 'prompts.jsonl'}",
              f"--output={tmp_path / 'out.jsonl'}", "--max_new_tokens=12", "--beam_size=5", "--min_length=1")
  assert [r["generated"] for r in tasks.read_jsonl(tmp_path / "out.jsonl")] == generated[:4]

  with pytest.raises(ValueError, match="PLUG cannot score continuations"):
    tasks.LMScoreTask().evaluate(model, [{"text": "今天"}])


def test_classifier_accuracy_through_evaluate_matches_the_training_model(plug_vocab_path, demo_data_dir,  # noqa: F811
                                                                          tmp_path):
  gin.clear_config()
  try:
    gin_setup.parse(["experiments/plug_classify_demo.gin"], [f'ClassificationData.vocab_path = "{plug_vocab_path}"'])
    config = plug.PlugConfig()
  finally:
    gin.clear_config()
  config = dataclasses.replace(config, dropout_rate=0.0)
  params = jax.jit(plug.init, static_argnums=0)(config, jax.random.key(3))
  orbax.save_orbax(plug.FAMILY, params, config, tmp_path / "classifier", tokenizer=str(plug_vocab_path),
                          labels=["0", "1"])
  run_program("evaluate.py", f"--checkpoint={tmp_path / 'classifier'}", "--task=review_sentiment_classifier",
              f"--data_dir={demo_data_dir}", "--limit=40", f"--output={tmp_path / 'result.json'}")
  result = json.loads((tmp_path / "result.json").read_text())

  # The same examples as ClassificationData batches them for training, through ClassifierModel.logits.
  task = tasks.ClassificationTask(name="x", dataset="review_sentiment")
  examples = tasks.sample_examples(tasks.load_examples(task, None, str(demo_data_dir), "test"), 40, 0)
  data = plug_pipeline.ClassificationData(vocab_path=str(plug_vocab_path), seq_len=config.max_positions)
  features = [data.example_fn(examples)(e) for e in examples]
  batch = {k: jnp.asarray(np.stack([f[k] for f in features])) for k in features[0]}
  want = np.asarray(plug.ClassifierModel(config).logits(params, batch)).argmax(-1)
  assert [p["predicted"] for p in result["predictions"]] == [str(w) for w in want]
  gold = np.array([int(e["label"]) for e in examples])
  assert result["metrics"]["accuracy"] == pytest.approx(float((want == gold).mean()))
  assert result["metrics"]["majority_class_accuracy"] == pytest.approx(max(gold.mean(), 1 - gold.mean()))
