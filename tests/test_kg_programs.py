"""The KG family through the programs: the train loop (resume exactness), experiments/evaluate.py (link
prediction, queries) and experiments/convert_checkpoint.py (the CPM-KG release -> Orbax), on PyKEEN's Nations."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from cpm_jax import checkpointing, gin_setup, partitioning, train_loop
from cpm_jax.convert.common import ConversionError
from cpm_jax.evaluation import model as model_lib
from cpm_jax.models import registry
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg import data as kg_data
from cpm_jax.models.kg import ranking
from cpm_jax.models.kg.scoring import SCORERS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def bindings(data_dir, steps):
  return ["train.model = @KGEmbeddingModel()", "KGEmbeddingModel.config = @KGConfig()", "train.data = @KGData()",
          'KGData.dataset = "kg_triples/nations"', f'KGData.data_dir = "{data_dir}"', "KGData.global_batch_size = 64",
          f"train.num_steps = {steps}", "train.log_every = 1", "train.eval_every = 1000", "train.eval_max_batches = 1",
          "train.peak_flops = 1e12", 'make_optimizer.optimizer = "row_adagrad"', "make_optimizer.weight_decay = 0.0",
          "learning_rate_schedule.peak = 0.1", "learning_rate_schedule.warmup_steps = 0",
          'learning_rate_schedule.decay = "constant"', "Checkpointer.save_interval_steps = 3"]


def train_in_process(workdir, data_dir, steps):
  gin.clear_config()
  gin_setup.parse(["models/kg_tiny.gin"], bindings(data_dir, steps))
  try:
    return train_loop.train(os.fspath(workdir))
  finally:
    gin.clear_config()


def run_program(name, *args, check=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A training workdir: 6 steps of DistMult on Nations through the train loop (what experiments/train.py runs), on
  8 devices, saving steps 3 and 6."""
  workdir = tmp_path_factory.mktemp("kg") / "nations"
  final_metrics = train_in_process(workdir, data_dir, 6)
  return workdir, final_metrics


def test_train_loop_on_8_devices_resumes_exactly(trained, tmp_path, data_dir):
  straight, straight_metrics = trained
  shutil.copytree(straight, tmp_path / "resumed", ignore=shutil.ignore_patterns("6", "final_metrics.json"))
  resumed_metrics = train_in_process(tmp_path / "resumed", data_dir, 6)  # restores step 3's state and data iterator
  assert resumed_metrics["loss"] == straight_metrics["loss"]
  record = json.loads((tmp_path / "resumed" / checkpointing.MODEL_RECORD).read_text())
  assert record["model"] == "kg" and record["dataset"] == "kg_triples/nations"
  params = [checkpointing.restore_any_params(path) for path in (straight, tmp_path / "resumed")]
  jax.tree.map(np.testing.assert_array_equal, params[0], params[1])


def test_evaluate_link_prediction_equals_the_ranking_of_the_trained_params(trained, data_dir, tmp_path):
  trained, _ = trained
  run_program("evaluate.py", f"--checkpoint={trained}", "--task=link_prediction", f"--data_dir={data_dir}",
              "--gin_bindings=LinkPredictionTask.dataset = 'kg_triples/nations'", f"--output={tmp_path / 'lp.json'}")
  result = json.loads((tmp_path / "lp.json").read_text())
  checkpoint = model_lib.load_checkpoint(trained)
  splits = [kg_data.load_triples("kg_triples/nations", s, data_dir) for s in ("train", "validation", "test")]
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
  expected = ranking.link_prediction(checkpoint.params, checkpoint.config, splits[2],
                                     ranking.KnownTriples.from_triples(splits, 55), mesh)
  assert result["metrics"]["triples"] == 201
  for name in ("mrr", "hits_at_1", "hits_at_10", "tail_mrr"):
    assert result["metrics"][name] == pytest.approx(expected[name], abs=1e-6)


def test_evaluate_query_mode_names_the_top_tails(trained, tmp_path):
  trained, _ = trained
  (tmp_path / "queries.jsonl").write_text('{"head": "brazil", "relation": "exports3"}\n')
  stdout = run_program("evaluate.py", f"--checkpoint={trained}", "--task=kg_query", "--print_predictions",
                       f"--input_file={tmp_path / 'queries.jsonl'}", "--gin_bindings=KGQueryTask.k = 4").stdout
  answer = json.loads(stdout.splitlines()[0])
  checkpoint = model_lib.load_checkpoint(trained)
  vocabulary = model_lib.load_tokenizer(checkpoint)
  entities = np.asarray(checkpoint.params["entities"])[:14]
  relation = np.asarray(checkpoint.params["relations"])[vocabulary.relation_id("exports3", "test")]
  scores = SCORERS["distmult"].score(entities[vocabulary.entity_id("brazil", "test")], relation, entities)
  best = np.argsort(-np.asarray(scores))[:4]
  assert [t["entity"] for t in answer["top_tails"]] == [vocabulary.entities[i] for i in best]
  np.testing.assert_allclose([t["score"] for t in answer["top_tails"]], np.asarray(scores)[best], rtol=1e-5)


def test_convert_checkpoint_reads_a_release_into_orbax(tmp_path):
  from test_kg_release import _fake_release
  entities, relations = _fake_release(tmp_path / "release", 30, 4, 8, page_rows=7, count_line=True)
  run_program("convert_checkpoint.py", "--model=kg", "--from=cpm_kg", f"--input={tmp_path / 'release'}",
              f"--output={tmp_path / 'ckpt'}")
  checkpoint = model_lib.load_checkpoint(tmp_path / "ckpt")
  assert (checkpoint.config.num_entities, checkpoint.config.num_relations) == (30, 4)
  np.testing.assert_array_equal(np.asarray(checkpoint.params["entities"])[:30], entities)
  np.testing.assert_array_equal(np.asarray(checkpoint.params["relations"]), relations)
  assert model_lib.load_tokenizer(checkpoint).entities[29] == "Q29"
  gin.clear_config()
  gin_setup.parse(["models/cpm_km.gin"], [])  # what --gin_file=models/cpm_km.gin gives the converter
  try:
    with pytest.raises(ConversionError, match=r"KGConfig.num_entities=84752481 but the release .* has 30 \(ent2id"):
      registry.formats("kg")["cpm_kg"].load(tmp_path / "release", config=KGConfig())
  finally:
    gin.clear_config()
