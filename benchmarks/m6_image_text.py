r"""An M6 checkpoint on the embedded image-text tasks, against the same model given no image (the text-only
baseline), all in this run: captions and VQA on held-out shapes scenes, digits captioned with their numeral,
held-out crops of the sample photos.

  python experiments/train.py --gin_file=experiments/m6_demo.gin --workdir=/tmp/m6_demo \
      --gin_bindings='M6Data.data_dir = "/tmp/tfds"'
  python benchmarks/m6_image_text.py --checkpoint=/tmp/m6_demo --data_dir=/tmp/tfds

Each task is its gin file in gin_configs/tasks/ (what experiments/evaluate.py --task=NAME runs: greedy decoding of
the task's SamplingConfig.max_new_tokens); the baseline binds ImageTextTask.with_image = False. "The best blind
guess" answers each prompt with its most common reference in the train split: what any model without the image
can reach at best.
"""

from __future__ import annotations

import collections
import os

import gin
from absl import app, flags

from cpm_jax import decoding, gin_setup, logging_setup, partitioning
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import tasks

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "M6 params-only checkpoint or training workdir.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir of the embedded datasets.")
_TASKS = flags.DEFINE_list("tasks", ["shapes_caption", "shapes_vqa", "digits_caption", "photo_caption"],
                           "Task gin files (gin_configs/tasks/NAME.gin).")
_LIMIT = flags.DEFINE_integer("limit", None, "Examples per task (drawn with the task's seed); default all.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Generations per compiled batch.")


def evaluate(checkpoint, tokenizer, mesh, task_name: str, with_image: bool) -> tuple[dict[str, float], float]:
  """(the task's metrics as experiments/evaluate.py --task=task_name computes them, greedy with the task's length;
  the exact match of the best blind guess: each prompt's most common reference in the train split)."""
  gin.clear_config()
  gin_setup.parse([f"tasks/{task_name}.gin"], [f"ImageTextTask.with_image = {with_image}"])
  task = tasks.configured_task()
  model = model_lib.language_model(checkpoint, tokenizer, batch_size=_BATCH_SIZE.value, mesh=mesh,
                                   decoding_config=decoding.SamplingConfig(greedy=True))
  data_dir = os.path.expanduser(_DATA_DIR.value)
  examples = tasks.sample_examples(tasks.load_examples(task, None, data_dir), _LIMIT.value, task.seed)
  answers = collections.defaultdict(collections.Counter)
  for i, example in enumerate(tasks.load_examples(task, None, data_dir, "train")):
    answers[tasks.fill(task.prompt_template, example, i)][example[task.reference_field]] += 1
  guesses = [answers[tasks.fill(task.prompt_template, e, i)].most_common(1) for i, e in enumerate(examples)]
  blind_guess = sum(bool(g) and g[0][0] == e[task.reference_field] for g, e in zip(guesses, examples))
  return task.evaluate(model, examples).metrics, blind_guess / len(examples)


def main(argv):
  del argv
  logging_setup.quiet_library_logs()
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  checkpoint = model_lib.load_checkpoint(_CHECKPOINT.value, mesh)
  tokenizer = model_lib.load_tokenizer(checkpoint)
  print(f"{'task':<16} {'metric':<22} {'with image':>11} {'text only':>10}")
  for name in _TASKS.value:
    (seen, guess), (blind, _) = (evaluate(checkpoint, tokenizer, mesh, name, image) for image in (True, False))
    for metric in seen:
      if metric not in ("examples", "with_image"):
        print(f"{name:<16} {metric:<22} {seen[metric]:>11.4f} {blind.get(metric, float('nan')):>10.4f}")
    print(f"{name:<16} {'em, best blind guess':<22} {'':>11} {guess:>10.4f}")
    print(f"{name:<16} {'examples':<22} {seen['examples']:>11d}")


if __name__ == "__main__":
  app.run(main)
