"""M6 through the shared machinery: the train loop on a data x fsdp x tensor mesh with multitask M6Data (held-out
loss falls), its workdir read back by the evaluation programs' loader, the caption / VQA tasks run on it, and
experiments/generate.py captioning image files."""

import json
import os
import pathlib
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from skimage import io as skimage_io

from _m6_helpers import TASKS, VOCAB_SIZE, m6_data_dir  # noqa: F401  (session fixture)
from cpm_jax import decoding, partitioning, train_loop
from cpm_jax.data import images, sources
from cpm_jax.evaluation import image_tasks
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation.interface import LanguageModel
from cpm_jax.models import m6, registry

CONFIG = m6.M6Config(vocab_size=VOCAB_SIZE, num_layers=2, embed_dim=64, num_heads=4, max_text_positions=32,
                     image_size=16, patch_size=4, dropout_rate=0.0)
MESH = partitioning.MeshConfig(data=2, fsdp=2, tensor=2)
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(m6_data_dir, tmp_path_factory):  # noqa: F811
  data = m6.M6Data(data_dir=str(m6_data_dir), vocab_path=str(m6_data_dir / "chars.txt"), vocab_size=VOCAB_SIZE,
                   mixture=tuple((name, 1.0) for name in TASKS), image_size=16, seq_len=24, global_batch_size=16,
                   eval_examples=8)
  gin.parse_config(["learning_rate_schedule.peak = 1e-2", "learning_rate_schedule.warmup_steps = 2",
                    "learning_rate_schedule.total_steps = 15"])
  try:
    workdir = tmp_path_factory.mktemp("m6_train")
    final = train_loop.train(str(workdir), model=m6.M6Model(CONFIG), data=data, mesh_config=MESH, num_steps=15,
                             log_every=5, eval_every=15, eval_max_batches=None, peak_flops=1e12)
  finally:
    gin.clear_config()
  return workdir, final


def test_trains_through_the_shared_loop_on_a_mesh(trained):
  # At initialisation the tied head's logits are near zero (std ~0.02 * sqrt(64)): the loss of guessing uniformly
  # over the vocabulary. 15 steps on every mode must beat that by a wide margin on the held-out batches.
  _, final = trained
  assert final["validation_tokens"] > 0 and final["finite"] == 1.0
  assert final["validation_loss"] < np.log(VOCAB_SIZE) - 1.5, final


def test_orbax_round_trip(trained, tmp_path):
  checkpoint = model_lib.load_checkpoint(trained[0])
  orbax = registry.formats("m6")["orbax"]
  orbax.save(checkpoint.params, checkpoint.config, tmp_path / "params", tokenizer=checkpoint.metadata["tokenizer"])
  loaded = orbax.load(tmp_path / "params", config=CONFIG)
  assert loaded.config == CONFIG and loaded.metadata["model"] == "m6"
  for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(checkpoint.params)):
    np.testing.assert_array_equal(got, want)


def test_workdir_evaluates_captions_and_answers_with_and_without_the_image(trained, m6_data_dir):  # noqa: F811
  workdir, _ = trained
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  checkpoint = model_lib.load_checkpoint(workdir, mesh)
  assert checkpoint.family is m6.FAMILY and checkpoint.config == CONFIG
  tokenizer = model_lib.load_tokenizer(checkpoint)
  model = model_lib.language_model(checkpoint, tokenizer, batch_size=4, mesh=mesh,
                                   decoding_config=decoding.SamplingConfig(max_new_tokens=6, greedy=True))
  examples = sources.load_examples("shapes_captions", "test", m6_data_dir)[:6]
  vqa = image_tasks.ImageTextTask(name="vqa", prompt_template="{question}", reference_field="answer",
                                  metrics=["em"], group_field="question_type")
  with_image = vqa.evaluate(model, examples)
  assert set(with_image.metrics) >= {"em", "examples", "with_image"} and with_image.metrics["examples"] == 6
  assert any(name.startswith("em/") for name in with_image.metrics)
  # describe() is m6.generate on the resized images; without the image the prompt alone is the prefix.
  prompts = [tokenizer.encode(e["question"]) for e in examples]
  pixels = np.stack([images.model_input(e["image"], CONFIG.image_size) for e in examples])
  direct = m6.generate(m6.decode_layout(checkpoint.params), prompts, CONFIG,
                       decoding.SamplingConfig(max_new_tokens=6, greedy=True), tokenizer, image_inputs=pixels,
                       batch_size=4, mesh=mesh)
  assert [p["generated"] for p in with_image.predictions] == [tokenizer.decode(ids) for ids in direct]
  blind = image_tasks.ImageTextTask(name="vqa", prompt_template="{question}", reference_field="answer",
                                    metrics=["em"], with_image=False).evaluate(model, examples)
  assert blind.metrics["with_image"] == 0.0 and len(blind.predictions) == 6
  with pytest.raises(ValueError, match="needs an image-text model"):
    vqa.generate(LanguageModel(tokenizer, None, None), examples, prompts)
  # score() is the causal-LM reading of "<bos> context continuation" (the text_lm task's).
  totals, counts = model.score([(prompts[0], prompts[1])], None)
  sequence = [tokenizer.bos_id, *prompts[0], *prompts[1]]
  logits = m6.forward(checkpoint.params, np.zeros((1, 16, 16, 3), np.float32), np.array([sequence[:-1]]), CONFIG,
                      has_image=np.zeros(1, np.int32), prefix_lengths=np.zeros(1, np.int32))
  log_probs = np.asarray(jax.nn.log_softmax(logits[0], -1))
  start = len(prompts[0])
  expected = sum(log_probs[start + i, token] for i, token in enumerate(prompts[1]))
  assert counts[0] == len(prompts[1]) and totals[0] == pytest.approx(expected, abs=1e-3)


def test_generate_program_describes_image_files(trained, m6_data_dir, tmp_path):  # noqa: F811
  # experiments/generate.py reads image files (--image_field of a jsonl) and asks the workdir's M6 about them:
  # the same text as the LanguageModel adapter gives for the stored images.
  examples = sources.load_examples("shapes_captions", "test", m6_data_dir)[:2]
  lines = []
  for i, (example, prompt) in enumerate(zip(examples, ["", examples[1]["question"]])):
    skimage_io.imsave(tmp_path / f"{i}.png", example["image"], check_contrast=False)
    lines.append(json.dumps({"prompt": prompt, "image": str(tmp_path / f"{i}.png")}, ensure_ascii=False) + "\n")
  (tmp_path / "in.jsonl").write_text("".join(lines), encoding="utf-8")
  result = subprocess.run([sys.executable, str(REPO / "experiments" / "generate.py"), f"--checkpoint={trained[0]}",
                           f"--input_file={tmp_path / 'in.jsonl'}", "--image_field=image", "--greedy",
                           "--max_new_tokens=6", "--batch_size=4", f"--output={tmp_path / 'out.jsonl'}"],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
                          cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  checkpoint = model_lib.load_checkpoint(trained[0], mesh)
  model = model_lib.language_model(checkpoint, model_lib.load_tokenizer(checkpoint), batch_size=4, mesh=mesh,
                                   decoding_config=decoding.SamplingConfig(max_new_tokens=6, greedy=True))
  expected = model.describe_text([e["image"] for e in examples], [r["prompt"] for r in records])
  assert [r["generated"] for r in records] == expected
  assert [r["image"] for r in records] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
