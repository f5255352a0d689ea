r"""Trains a model configured by gin; resumes from the latest checkpoint in --workdir.

  python experiments/train.py --gin_file=experiments/cpm_demo.gin --workdir=/tmp/cpm_demo \
      --gin_bindings='LMData.tokenizer_path = "../shared/vocab/cpm/chinese_vocab.model"'

Writes config.gin, TensorBoard scalars (tensorboard/), checkpoints/ and final_metrics.json to --workdir; nothing
before the flags, the gin bindings, the mesh and the starting checkpoint have been checked. SIGTERM saves the
current step and exits 0; Ctrl-C does the same and exits 130 (a second Ctrl-C aborts the save).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from cpm_jax import adapters, gin_setup, host_memory, programs, train_loop  # noqa: F401  (adapters: AdaptedModel)
from cpm_jax.models import registry  # noqa: F401  (every family's gin configurables: models, data)

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files (paths, or relative to gin_configs/).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.num_steps = 100'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.", required=True)
_RESTORE_STEP = flags.DEFINE_integer("restore_step", None, "Resume from this checkpoint step, not the latest.")
_INIT_PARAMS_FROM = flags.DEFINE_string(
    "init_params_from", None, "With no checkpoint in --workdir yet: start from the params in this params-only "
    "checkpoint (convert_checkpoint.py output or checkpointing.save_params) with a fresh optimizer. For a partial "
    "start (a warm start: some params from a checkpoint, the rest fresh) bind train.init_from to a "
    "RestoreCheckpointConfig instead (gin_configs/restore/warm_start.gin).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed (one process per host). Without the three flags below, the "
    "cluster environment (SLURM, Cloud TPU, Open MPI, Kubernetes) supplies them.")
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_RETAIN_FREED_MEMORY = flags.DEFINE_bool(
    "retain_freed_memory", True, "Keep the memory XLA:CPU frees for its next step instead of returning it to the OS "
    "(glibc; cpm_jax.host_memory): a CPU step then page-faults nothing (11% less CPU time at cpm_small, BUILD.md); "
    "the process keeps its peak heap. --noretain_freed_memory: glibc's default.")


def _initialize_distributed() -> None:
  explicit = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value:
    if any(value is not None for value in explicit):
      raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed.")
    return
  # CPU devices need gloo for cross-process collectives; GPUs and TPUs use their own (NCCL, ICI).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*explicit)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # progress is logged once, by process 0
  logging.info("jax.distributed: %d processes, %d devices.", jax.process_count(), jax.device_count())


def main(argv):
  del argv
  if _RETAIN_FREED_MEMORY.value:
    host_memory.retain_freed_memory()  # before the first computation: XLA's threads pick their arena then
  _initialize_distributed()
  gin_setup.parse(_GIN_FILES.value, _GIN_BINDINGS.value)
  metrics = train_loop.train(_WORKDIR.value, restore_step=_RESTORE_STEP.value,
                             init_params_from=_INIT_PARAMS_FROM.value)
  if "interrupted_at_step" in metrics:
    sys.exit(130)  # Ctrl-C: saved, but a script running this should stop too


if __name__ == "__main__":
  programs.run(main, user_errors=(train_loop.TrainingDiverged,))
