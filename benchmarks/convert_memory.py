"""Peak memory of checkpoint conversion, as a ratio to the checkpoint's size, against transformers' loader.

Builds a random cpm_medium-shaped GPT2LMHeadModel checkpoint (safetensors, float32; written tensor by tensor),
then measures, each in a fresh process: peak RSS (VmHWM) and the RSS after imports (baseline) for
  hf->orbax (save_params)   cpm_jax.convert.load_hf + save_orbax (what `convert_checkpoint.py --from=hf` runs)
  hf->orbax (uncompressed)  the same arrays written by Orbax without zstd compression
  orbax->hf                 cpm_jax.convert.load_orbax + save_hf (`--to=hf`)
  peer                      transformers.GPT2LMHeadModel.from_pretrained of the same directory, every weight read
"load peak" is the peak once the converted params are in memory (sharded jax arrays, or the restored ones).
Target: hf->orbax peak <= 1.5x the checkpoint size.

  .venv/bin/python benchmarks/convert_memory.py [--layers=24 --embed=1024 --workdir=/tmp/convert_memory]
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 24, "Layers (cpm_medium: 24).")
_EMBED = flags.DEFINE_integer("embed", 1024, "Hidden size (cpm_medium: 1024).")
_VOCAB = flags.DEFINE_integer("vocab", 30000, "Vocabulary size.")
_POSITIONS = flags.DEFINE_integer("positions", 1024, "Learned positions.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one, removed afterwards).")
_CASE = flags.DEFINE_enum("case", None, ["hf_to_orbax", "hf_to_orbax_uncompressed", "orbax_to_hf", "peer"],
                          "Internal: run one measurement.")


def rss_mib(field: str) -> float:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


def write_checkpoint(directory: pathlib.Path) -> int:
  """A random cpm-shaped HF checkpoint, generated and written one tensor at a time; returns its bytes."""
  import numpy as np

  from cpm_jax.convert import cpm as cpm_layout
  from cpm_jax.convert import hf
  from cpm_jax.models import cpm

  config = cpm.CPMConfig(vocab_size=_VOCAB.value, num_layers=_LAYERS.value, embed_dim=_EMBED.value,
                         num_heads=_EMBED.value // 64, max_positions=_POSITIONS.value)
  wanted = cpm_layout.tensors(cpm.abstract_params(config), lambda entry: "transformer." + entry.hf)
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(__import__("json").dumps(hf.gpt2_config(config)))
  hf.safetensors_io.write(directory / "model.safetensors", [(t.key, t.dtype, t.shape) for t in wanted],
                          (rng.standard_normal(t.shape, np.float32) * 0.02 for t in wanted), {"format": "pt"})
  return (directory / "model.safetensors").stat().st_size


def measure(case: str, workdir: pathlib.Path) -> None:
  """Runs in a child process: prints baseline RSS, peak RSS after loading, peak RSS overall (MiB), seconds."""
  if case == "peer":
    import torch
    import transformers
    baseline, start = rss_mib("VmRSS"), time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(workdir / "hf")
    with torch.no_grad():
      sum(float(param.sum()) for param in model.parameters())  # touch every weight (loading may be lazy)
    loaded_peak = rss_mib("VmHWM")
  else:
    from cpm_jax import convert, partitioning
    baseline, start = rss_mib("VmRSS"), time.perf_counter()
    if case.startswith("hf_to_orbax"):
      loaded = convert.load_hf(workdir / "hf", mesh=partitioning.make_mesh())
      loaded_peak = rss_mib("VmHWM")
      if case == "hf_to_orbax":
        convert.save_orbax(loaded.params, loaded.config, workdir / "orbax")
      else:  # the same arrays through Orbax without zstd compression (not what save_params does today)
        import orbax.checkpoint as ocp
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
          checkpointer.save(workdir / "orbax_uncompressed", args=ocp.args.PyTreeSave(loaded.params))
    else:
      loaded = convert.load_orbax(workdir / "orbax")
      loaded_peak = rss_mib("VmHWM")
      convert.save_hf(loaded.params, loaded.config, workdir / "hf_out")
  print(f"{baseline:.1f} {loaded_peak:.1f} {rss_mib('VmHWM'):.1f} {time.perf_counter() - start:.2f}")


def main(argv: list[str]) -> None:
  del argv
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="convert_memory_"))
  if _CASE.value:
    measure(_CASE.value, workdir)
    return
  try:
    size_mib = write_checkpoint(workdir / "hf") / 2**20
    print(f"checkpoint: {_LAYERS.value} layers, hidden {_EMBED.value}, vocab {_VOCAB.value}, float32 safetensors "
          f"{size_mib:.0f} MiB")
    print("peak RSS (VmHWM) of a fresh process per case, as a ratio to the checkpoint size; 'net' subtracts the "
          "RSS after imports")
    print(f"{'case':<26} {'imports MiB':>11} {'load peak':>10} {'net/size':>9} {'total peak':>11} {'total/size':>11} "
          f"{'net/size':>9} {'s':>6}")
    for case, label in (("hf_to_orbax", "hf->orbax (save_params)"), ("hf_to_orbax_uncompressed", "hf->orbax (uncompressed)"),
                        ("orbax_to_hf", "orbax->hf"), ("peer", "peer: from_pretrained")):
      out = subprocess.run([sys.executable, __file__, f"--case={case}", f"--workdir={workdir}"], check=True,
                           capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
      baseline, loaded, peak, seconds = map(float, out.stdout.split()[-4:])
      print(f"{label:<26} {baseline:>11.0f} {loaded:>10.0f} {(loaded - baseline) / size_mib:>9.2f} {peak:>11.0f} "
            f"{peak / size_mib:>11.2f} {(peak - baseline) / size_mib:>9.2f} {seconds:>6.1f}")
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir)


if __name__ == "__main__":
  app.run(main)
