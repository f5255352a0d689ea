r"""Trains a model configured by gin; resumes from the latest checkpoint in --workdir.

  python experiments/train.py --gin_file=experiments/cpm_demo.gin --workdir=/tmp/cpm_demo \
      --gin_bindings='LMData.tokenizer_path = "../shared/vocab/cpm/chinese_vocab.model"'

Writes config.gin, TensorBoard scalars (tensorboard/), checkpoints/ and final_metrics.json to --workdir.
"""

from __future__ import annotations

from absl import app, flags

from cpm_jax import gin_setup, train_loop
from cpm_jax.models import cpm  # noqa: F401  (registers the model configurables)

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files (paths, or relative to gin_configs/).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.num_steps = 100'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train_loop.quiet_library_logs()
  gin_setup.parse(_GIN_FILES.value, _GIN_BINDINGS.value)
  train_loop.train(_WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
