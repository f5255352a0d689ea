r"""An M6 checkpoint on the embedded image-text tasks, against the same model given no image (the text-only
baseline), all in this run: captions and VQA on held-out shapes scenes, digits captioned with their numeral,
held-out crops of the sample photos.

  python experiments/train.py --gin_file=experiments/m6_demo.gin --workdir=/tmp/m6_demo \
      --gin_bindings='M6Data.data_dir = "/tmp/tfds"'
  python benchmarks/m6_image_text.py --checkpoint=/tmp/m6_demo --data_dir=/tmp/tfds

Each task is its gin file in gin_configs/tasks/ (what experiments/evaluate.py --task=NAME runs), greedy decoding;
the baseline binds ImageTextTask.with_image = False.
"""

from __future__ import annotations

import os

import gin
from absl import app, flags

from cpm_jax import decoding, gin_setup, partitioning, train_loop
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import tasks

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "M6 params-only checkpoint or training workdir.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir of the embedded datasets.")
_TASKS = flags.DEFINE_list("tasks", ["shapes_caption", "shapes_vqa", "digits_caption", "photo_caption"],
                           "Task gin files (gin_configs/tasks/NAME.gin).")
_LIMIT = flags.DEFINE_integer("limit", None, "Examples per task (drawn with the task's seed); default all.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Generations per compiled batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate at most.")


def evaluate(model, task_name: str, with_image: bool) -> dict[str, float]:
  gin.clear_config()
  gin_setup.parse([f"tasks/{task_name}.gin"], [f"ImageTextTask.with_image = {with_image}"])
  task = tasks.configured_task()
  examples = tasks.sample_examples(tasks.load_examples(task, None, os.path.expanduser(_DATA_DIR.value)),
                                   _LIMIT.value, task.seed)
  return task.evaluate(model, examples).metrics


def main(argv):
  del argv
  train_loop.quiet_library_logs()
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  checkpoint = model_lib.load_checkpoint(_CHECKPOINT.value, mesh)
  model = model_lib.language_model(checkpoint, model_lib.load_tokenizer(checkpoint), batch_size=_BATCH_SIZE.value,
                                   mesh=mesh, decoding_config=decoding.SamplingConfig(
                                       max_new_tokens=_MAX_NEW_TOKENS.value, greedy=True))
  print(f"{'task':<16} {'metric':<22} {'with image':>11} {'text only':>10}")
  for name in _TASKS.value:
    seen, blind = evaluate(model, name, True), evaluate(model, name, False)
    for metric in seen:
      if metric not in ("examples", "with_image"):
        print(f"{name:<16} {metric:<22} {seen[metric]:>11.4f} {blind.get(metric, float('nan')):>10.4f}")
    print(f"{name:<16} {'examples':<22} {seen['examples']:>11d}")


if __name__ == "__main__":
  app.run(main)
