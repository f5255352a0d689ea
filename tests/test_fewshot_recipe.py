"""The few-shot recipes end to end on a sharded mesh (data x fsdp x tensor = 2 x 2 x 2): a [CLS] model (mixup,
contrastive) with kNN and a self-training round, and a student distilled from it, through the shipped gin files, the
train loop and the evaluation adapter, into the table; the student evaluated as experiments/evaluate.py does; the
CPM label-prompt rows against a from-scratch recomputation. (UniMC with every loss switch, R-Drop included, trains
on the same mesh in test_fewshot_model.py.)"""

import dataclasses
import json
import os
import signal

import gin
import jax
import numpy as np
import pytest

from _fewshot_helpers import (NEGATIVE, POSITIVE, TINY, fewshot_dir, fewshot_vocab, reviews,  # noqa: F401
                              write_jsonl)
from cpm_jax import checkpointing, gin_setup, partitioning
from cpm_jax.data.fewshot import FewShotTask
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import tasks
from cpm_jax.fewshot import table as table_lib
from cpm_jax.models import cpm
from cpm_jax.tokenization import BertTokenizer

FILES = "experiments/fewshot/"


def _fewclue_files(root, fewshot_dir):  # noqa: F811
  """FewCLUE's layout for seed 3: train_3 (4 + 4), dev_3 (2 + 2), an unlabelled pool of the train reviews (which a
  model that fits its train set labels confidently, half and half) and the fixture's test_public."""
  root.mkdir()
  train = reviews(POSITIVE[:4], "Positive") + reviews(NEGATIVE[:4], "Negative", 4)
  write_jsonl(root / "train_3.json", train)
  write_jsonl(root / "dev_3.json", reviews(POSITIVE[4:6], "Positive", 8) + reviews(NEGATIVE[4:6], "Negative", 10))
  write_jsonl(root / "unlabeled.json", [{"id": e["id"], "sentence": e["sentence"]} for e in train])
  (root / "test_public.json").write_text((fewshot_dir / "test_public.json").read_text())
  return root


def _base_gin(path, data_dir, fewshot_vocab):  # noqa: F811
  vocab_size = BertTokenizer(fewshot_vocab).vocab_size
  config = "\n".join(f"PlugConfig.{name} = {value!r}" for name, value in TINY.items())
  path.write_text(f"""
import cpm_jax.fewshot.table
import cpm_jax.models.plug.fewshot
configured_recipe.recipe = @FewShotRecipe()
FewShotRecipe.model = @FewShotModel()
FewShotModel.config = @PlugConfig()
FewShotRecipe.data = @FewShotData()
FewShotRecipe.mesh_config = @MeshConfig()
MeshConfig.data = 2
MeshConfig.fsdp = 2
MeshConfig.tensor = 2
FewShotRecipe.eval_batch_size = 8
FewShotData.task = @FewShotTask()
FewShotData.vocab_path = "{fewshot_vocab}"
FewShotData.seq_len = 32
FewShotData.global_batch_size = 8
FewShotTask.dataset = "{data_dir}/{{split}}.json"
FewShotTask.labels = ("Negative", "Positive")
FewShotTask.presampled_train = "train_{{seed}}"
FewShotTask.presampled_dev = "dev_{{seed}}"
FewShotTask.unlabeled_split = "unlabeled"
FewShotTask.test_split = "test_public"
ClsFormat.templates = ("{{sentence}}",)
PlugConfig.vocab_size = {vocab_size}
{config}
train.num_steps = 30
train.eval_every = 30
train.log_every = 30
train.peak_flops = 1e12
learning_rate_schedule.peak = 1e-2
learning_rate_schedule.warmup_steps = 2
learning_rate_schedule.total_steps = 30
""", encoding="utf-8")
  return str(path)


def test_knn_self_training_and_distillation_table(fewshot_dir, fewshot_vocab, tmp_path):  # noqa: F811
  data_dir = _fewclue_files(tmp_path / "eprstmt", fewshot_dir)
  base = _base_gin(tmp_path / "base.gin", data_dir, fewshot_vocab)
  workdir = str(tmp_path / "table")
  cls = ("cls", (base, FILES + "cls.gin", FILES + "knn.gin", FILES + "self_training.gin"),
         ("SelfTraining.threshold = 0.6", "KnnSearch.dim = 8", "KnnSearch.max_k = 4",
          "FewShotModel.mixup_alpha = 0.5", "FewShotModel.contrastive_weight = 0.5"))
  student = ("student", (base, FILES + "distillation.gin"),
             ('Distillation.teacher = "{workdir}/systems/cls/seed_{seed}/round_1"', "train.num_steps = 20",
              "train.eval_every = 20", "learning_rate_schedule.total_steps = 20", "PlugConfig.embed_dim = 8"))
  gin.clear_config()
  gin_setup.parse([base], [])
  spec = table_lib.TableSpec(systems=(cls, student), seeds=(3,), rows=(
      ("[CLS]", "cls", 0, "accuracy"), ("[CLS] + kNN", "cls", 0, "knn_accuracy"),
      ("[CLS] + self-training", "cls", 1, "accuracy"), ("student", "student", 0, "accuracy")))
  gin.clear_config()
  table = table_lib.run_table(spec, workdir)

  labels = [row["label"] for row in table["rows"]]
  assert labels == ["majority class", "[CLS]", "[CLS] + kNN", "[CLS] + self-training", "student"]
  assert table["rows"][0]["per_seed"] == [0.5]  # 4 + 4 test reviews
  systems = {name: runs[0]["rounds"] for name, runs in table["systems"].items()}
  assert [row["per_seed"][0] for row in table["rows"][1:]] == [
      systems["cls"][0]["accuracy"], systems["cls"][0]["knn_accuracy"], systems["cls"][1]["accuracy"],
      systems["student"][0]["accuracy"]]
  knn = systems["cls"][0]
  assert 1 <= knn["knn_k"] <= 4 and 0 <= knn["knn_lambda"] <= 1 and knn["knn_dim"] <= 8
  assert systems["cls"][0]["extra_examples"] == 0 and systems["cls"][1]["extra_examples"] == 8
  assert systems["student"][0]["extra_examples"] == 8  # the teacher's logits on the 8 pool reviews

  # The student is an ordinary checkpoint: evaluate.py's path (task gin, mesh, load, adapter) gives the same accuracy.
  task = tasks.task_from_gin(["tasks/review_sentiment_classifier.gin"],
                             ["ClassificationTask.text_fields = ['sentence']"])
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  checkpoint = model_lib.load_checkpoint(f"{workdir}/systems/student/seed_3/round_0", mesh)
  assert checkpoint.config.num_encoder_layers == 1 and checkpoint.config.embed_dim == 8
  lm = model_lib.language_model(checkpoint, model_lib.load_tokenizer(checkpoint), mesh=mesh)
  result = task.evaluate(lm, tasks.load_examples(task, f"{data_dir}/test_public.json", None))
  assert result.metrics["accuracy"] == systems["student"][0]["accuracy"]

  # Run again: every system is read back, the table is the same.
  again = table_lib.run_table(spec, workdir)
  assert [row["per_seed"] for row in again["rows"]] == [row["per_seed"] for row in table["rows"]]
  assert json.loads((tmp_path / "table" / "table.json").read_text())["rows"] == again["rows"]


def test_label_prompt_baselines_score_the_test_split(fewshot_dir, tmp_path, cpm_vocab_path):  # noqa: F811
  """The CPM rows: zero-shot equals a from-scratch recomputation (the label words' mean log-likelihood from
  cpm.forward, argmax) on the FewShotTask's test split; the few-shot row of each seed draws its demonstrations from
  that seed's train sample."""
  config = cpm.CPMConfig(vocab_size=30000, num_layers=1, embed_dim=32, num_heads=4, max_positions=128,
                         dropout_rate=0.0, init_stddev=0.5)
  params = jax.jit(cpm.init, static_argnums=0)(config, jax.random.key(7))
  checkpoint = checkpointing.save_params(tmp_path / "cpm", params, {"model_config": dataclasses.asdict(config),
                                                                   "tokenizer": str(cpm_vocab_path)})
  task_file = tmp_path / "prompts.gin"
  task_file.write_text("""import cpm_jax.evaluation.tasks
configured_task.task = @LabelPromptTask()
LabelPromptTask.name = 'eprstmt'
LabelPromptTask.templates = [['{sentence}\\n总体评价：', '{label}']]
LabelPromptTask.label_map = {'Negative': '差评', 'Positive': '好评'}
""", encoding="utf-8")
  fewshot = FewShotTask(dataset=f"{fewshot_dir}/{{split}}.json", labels=("Negative", "Positive"), shots_per_class=3,
                        test_split="test_public")
  saved = tmp_path / "label_prompts.json"
  with checkpointing.PreemptionGuard() as guard:
    got = table_lib.label_prompt_baselines(str(task_file), str(checkpoint), fewshot, (0, 1), (0, 2), str(saved), guard)
  assert sorted(json.loads(saved.read_text())["results"]) == ["0-shot seed 0", "2-shot seed 0", "2-shot seed 1"]
  assert sorted(got[2]) == [0, 1]

  loaded = model_lib.load_checkpoint(str(checkpoint))
  spm = model_lib.load_tokenizer(loaded)
  forward = jax.jit(lambda p, t: cpm.forward(p, t, config))

  def mean_log_likelihood(context, continuation):
    c, x = spm.encode(context), spm.encode(continuation)
    tokens = np.zeros((1, config.max_positions), np.int32)  # one shape; causal, so the padding after is not seen
    tokens[0, :len(c + x)] = c + x
    log_probs = np.asarray(jax.nn.log_softmax(forward(params, tokens)[0], -1))
    return np.mean([log_probs[len(c) - 1 + i, token] for i, token in enumerate(x)])

  test = fewshot.splits(0).test
  words = ("差评", "好评")
  predicted = [int(np.argmax([mean_log_likelihood(f"{e['sentence']}\n总体评价：", w) for w in words])) for e in test]
  expected = np.mean([p == ("Negative", "Positive").index(e["label"]) for p, e in zip(predicted, test)])
  assert [got[0][0], got[0][1]] == pytest.approx([expected, expected], abs=1e-9)
  task = tasks.task_from_gin([str(task_file)])
  lm = model_lib.language_model(loaded, spm)
  for seed, accuracy in got[2].items():
    shots = dataclasses.replace(task, shots=2, seed=seed)
    assert accuracy == shots.evaluate(lm, test, fewshot.splits(seed).train).metrics["accuracy"]
    assert shots.prefix(0, fewshot.splits(seed).train).count("总体评价") == 2


@gin.configurable
class SignalledRecipe:
  """A recipe whose seed `signal_after` sends this process SIGTERM once it finished (as if between two trainings);
  every seed it ran is recorded in `ran`, its accuracy is seed / 10."""

  ran: list = []

  def __init__(self, signal_after: int = -1):
    self.signal_after = signal_after

  def run(self, seed, workdir):
    SignalledRecipe.ran.append(seed)
    if seed == self.signal_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"seed": seed, "rounds": [{"accuracy": seed / 10}], "seconds": 0.0}


def test_sigterm_between_trainings_stops_the_table_and_a_rerun_resumes(fewshot_dir, tmp_path):  # noqa: F811
  system = tmp_path / "system.gin"
  system.write_text("import cpm_jax.fewshot.table\nconfigured_recipe.recipe = @SignalledRecipe()\n", encoding="utf-8")
  task = FewShotTask(dataset=f"{fewshot_dir}/{{split}}.json", labels=("Negative", "Positive"), shots_per_class=3,
                     test_split="test_public")
  spec = table_lib.TableSpec(task=task, seeds=(0, 1, 2), systems=(
      ("first", (str(system),), ("SignalledRecipe.signal_after = 1",)), ("second", (str(system),), ())),
      rows=(("first row", "first", 0, "accuracy"), ("second row", "second", 0, "accuracy")))
  workdir = tmp_path / "table"
  SignalledRecipe.ran = []
  with pytest.raises(table_lib.Preempted, match="before system first, seed 2"):
    table_lib.run_table(spec, str(workdir))
  assert SignalledRecipe.ran == [0, 1]  # seed 2 and the second system never started
  stopped = json.loads((workdir / "table.json").read_text())
  assert stopped["stopped"] == "before system first, seed 2"
  first, second = stopped["rows"][1:]
  assert first["partial"] and first["seeds"] == [0, 1] and first["per_seed"] == [0.0, 0.1]
  assert second["missing"]
  assert [run["seed"] for run in json.loads((workdir / "systems" / "first" / "runs.json").read_text())] == [0, 1]

  # --rows: only the second system's row is computed; the first's stays as it was.
  SignalledRecipe.ran = []
  table = table_lib.run_table(spec, str(workdir), rows=["second row"])
  assert SignalledRecipe.ran == [0, 1, 2] and table["rows"][1]["partial"] and "stopped" not in table
  with pytest.raises(ValueError, match=r"Rows \['third row'\] are not in the table"):
    table_lib.run_table(spec, str(workdir), rows=["third row"])

  # The same call again resumes: only seed 2 of the first system runs; the table is complete.
  SignalledRecipe.ran = []
  table = table_lib.run_table(spec, str(workdir))
  assert SignalledRecipe.ran == [2]
  assert [row["per_seed"] for row in table["rows"][1:]] == [[0.0, 0.1, 0.2]] * 2
  assert not any(row.get("partial") or row.get("missing") for row in table["rows"])
  assert json.loads((workdir / "table.json").read_text())["rows"] == table["rows"]
