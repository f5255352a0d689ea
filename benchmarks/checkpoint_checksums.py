"""What checkpoint checksums cost: save and restore of a params tree with and without them, in the same run.

  save, checksums      checkpointing.save_params: the arrays' checksums (cpm_jax.checksums, one fused pass on
                       device), then the Orbax write and the metadata
  save, none           the same Orbax write alone (what save_params does without the checksums)
  restore, verified    checkpointing.restore_any_params(verify=True): read, then every array's checksum checked
  restore, unverified  the same read with verify=False
  checksums alone      checksums.compute of the params in memory

Each round runs every case once, in turn (so all meet the same load on a shared machine); the best of --repeats
rounds is printed, with each case's ratio to its peer without checksums. The params are random, of the gin model's
shape (default cpm_small), on all local devices (data-parallel mesh: replicated, as a 1-process save would write).

  .venv/bin/python benchmarks/checkpoint_checksums.py [--model=cpm_small --repeats=3 --workdir=/tmp/ckpt_bench]
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", "cpm_small", "Model shape: a gin_configs/models/<name>.gin file.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (after one untimed round).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one, removed afterwards).")


def main(argv):
  del argv
  import jax
  import orbax.checkpoint as ocp

  from cpm_jax import checkpointing, checksums, gin_setup, layers, logging_setup, partitioning
  from cpm_jax.evaluation import model as model_lib
  from cpm_jax.models import cpm, registry

  logging_setup.quiet_library_logs()
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
  gin_setup.parse([f"models/{_MODEL.value}.gin"], [])
  config = cpm.CPMConfig()
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  shardings = model_lib.param_shardings(cpm.FAMILY, config, mesh)
  params = jax.jit(lambda key: cpm.init(config, key), out_shardings=shardings)(jax.random.key(0))
  abstract = cpm.abstract_params(config)
  size = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  record = registry.record(config)
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="checkpoint_checksums_"))
  saved = workdir / "saved"

  def fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    return path

  def save_with_checksums():
    checkpointing.save_params(fresh(workdir / "with"), params, record)

  def save_without():
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
      checkpointer.save(fresh(workdir / "without") / checkpointing.PARAMS_DIR, args=ocp.args.PyTreeSave(params))

  def restore(verify):
    def run():
      restored = checkpointing.restore_any_params(saved, abstract, shardings, verify=verify)
      jax.block_until_ready(restored)
    return run

  def checksums_alone():
    checksums.compute(params)

  checkpointing.save_params(fresh(saved), params, record)
  cases = {"save, checksums": save_with_checksums, "save, none": save_without,
           "restore, verified": restore(True), "restore, unverified": restore(False),
           "checksums alone": checksums_alone}
  best = {name: float("inf") for name in cases}
  for round_index in range(_REPEATS.value + 1):
    for name, fn in cases.items():
      start = time.perf_counter()
      fn()
      if round_index:  # the first round compiles and warms the caches
        best[name] = min(best[name], time.perf_counter() - start)
  peers = {"save, checksums": "save, none", "restore, verified": "restore, unverified",
           "checksums alone": "save, none"}
  print(f"{_MODEL.value}: {layers.count_params(abstract):,} params, {size / 2**20:.0f} MiB float32, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), best of {_REPEATS.value} rounds")
  print(f"{'case':22s} {'seconds':>8s} {'GB/s':>6s}  ratio to its peer")
  for name, seconds in best.items():
    peer = peers.get(name)
    ratio = f"{seconds / best[peer]:.3f} x '{peer}'" if peer else ""
    print(f"{name:22s} {seconds:8.3f} {size / seconds / 1e9:6.2f}  {ratio}")
  if not _WORKDIR.value:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
