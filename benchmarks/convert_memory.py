"""Peak memory of checkpoint conversion, as a ratio to the checkpoint's size, against transformers' loader.

Builds a random cpm_medium-shaped GPT2LMHeadModel checkpoint (safetensors, float32; written tensor by tensor) and a
random PLUG-shaped Orbax checkpoint of about the same size, then measures, each in a fresh process: peak RSS (VmHWM)
and the RSS after imports (baseline) for
  hf->orbax (save_params)   the cpm family's hf load + orbax save (what `convert_checkpoint.py --from=hf` runs)
  orbax->hf                 orbax load + hf save (`--to=hf`)
  orbax->megatron (mp=2)    orbax load + megatron save (`--to=megatron --mp=2`)
  megatron->orbax (mp=2)    megatron load of those shards + orbax save (`--from=megatron`)
  plug orbax->megatron, plug megatron->orbax   the same two directions for the plug family (DeepSpeed shards)
  peer                      transformers.GPT2LMHeadModel.from_pretrained of the same directory, every weight read
Columns (MiB): RSS after imports; peak RSS once the params are in memory (converted sharded jax arrays, or restored
ones), before writing; peak RSS overall; then peak/size, (peak - imports)/size, and the sampled peak of anonymous
memory above the imports / size (memory-mapped file pages count in RSS but not in it).
Target: every conversion's (peak - imports) <= 1.5x the checkpoint size.

  .venv/bin/python benchmarks/convert_memory.py [--layers=24 --embed=1024 --workdir=/tmp/convert_memory]
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags, logging

_LAYERS = flags.DEFINE_integer("layers", 24, "Layers (cpm_medium: 24).")
_EMBED = flags.DEFINE_integer("embed", 1024, "Hidden size (cpm_medium: 1024).")
_VOCAB = flags.DEFINE_integer("vocab", 30000, "Vocabulary size.")
_POSITIONS = flags.DEFINE_integer("positions", 1024, "Learned positions.")
_PLUG_ENCODER_LAYERS = flags.DEFINE_integer("plug_encoder_layers", 12, "PLUG cases: encoder layers (hidden --embed).")
_PLUG_DECODER_LAYERS = flags.DEFINE_integer("plug_decoder_layers", 6, "PLUG cases: decoder layers.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one, removed afterwards).")
CASES = {"hf_to_orbax": "hf->orbax",
         "orbax_to_hf": "orbax->hf", "orbax_to_megatron": "orbax->megatron (mp=2)",
         "megatron_to_orbax": "megatron->orbax (mp=2)", "plug_orbax_to_megatron": "plug orbax->megatron (mp=2)",
         "plug_megatron_to_orbax": "plug megatron->orbax (mp=2)", "peer": "peer: from_pretrained"}
_CASE = flags.DEFINE_enum("case", None, list(CASES), "Internal: run one measurement.")


def rss_mib(field: str) -> float:
  """A /proc/self/status memory figure in MiB: VmRSS, VmHWM (peak RSS) or RssAnon."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


class AnonPeak(threading.Thread):
  """Samples RssAnon every 5 ms: the peak of memory that is not file-backed (mmap'd pages the kernel can drop)."""

  def __init__(self):
    super().__init__(daemon=True)
    self.peak, self._done = rss_mib("RssAnon"), threading.Event()

  def run(self):
    while not self._done.wait(0.005):
      self.peak = max(self.peak, rss_mib("RssAnon"))

  def stop(self) -> float:
    self._done.set()
    self.join()
    return max(self.peak, rss_mib("RssAnon"))


def write_checkpoint(directory: pathlib.Path) -> int:
  """A random cpm-shaped HF checkpoint, generated and written one tensor at a time; returns its bytes."""
  import numpy as np

  from cpm_jax.convert import safetensors_io, table
  from cpm_jax.models import cpm
  from cpm_jax.models.cpm import convert as cpm_layout
  from cpm_jax.models.cpm import hf

  config = cpm.CPMConfig(vocab_size=_VOCAB.value, num_layers=_LAYERS.value, embed_dim=_EMBED.value,
                         num_heads=_EMBED.value // 64, max_positions=_POSITIONS.value)
  wanted = table.stored_tensors(cpm.abstract_params(config), cpm_layout.HF_ENTRIES, "transformer.")
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(hf.gpt2_config(config)))
  safetensors_io.write(directory / "model.safetensors", [(t.key, t.dtype, t.shape) for t in wanted],
                       (rng.standard_normal(t.shape, np.float32) * 0.02 for t in wanted), {"format": "pt"})
  return (directory / "model.safetensors").stat().st_size


def write_plug_checkpoint(directory: pathlib.Path) -> int:
  """A random PLUG-shaped params-only Orbax checkpoint; returns the bytes of its params."""
  import jax
  import numpy as np

  from cpm_jax.models import plug, registry

  config = plug.PlugConfig(vocab_size=21128, num_encoder_layers=_PLUG_ENCODER_LAYERS.value,
                           num_decoder_layers=_PLUG_DECODER_LAYERS.value, embed_dim=_EMBED.value,
                           num_heads=_EMBED.value // 64, mlp_dim=None, max_positions=_POSITIONS.value)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape, np.float32) * 0.02,
                        plug.abstract_params(config))
  registry.formats("plug")["orbax"].save(params, config, directory)
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def convert_case(case: str, workdir: pathlib.Path) -> float:
  """Runs one conversion; returns the peak RSS (MiB) once the params were loaded, before writing."""
  if case == "peer":
    import torch
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(workdir / "cpm_hf")
    with torch.no_grad():
      sum(float(param.sum()) for param in model.parameters())  # touch every weight (loading may be lazy)
    return rss_mib("VmHWM")
  from cpm_jax import checkpointing, partitioning
  from cpm_jax.models import registry
  family, case = ("plug", case.removeprefix("plug_")) if case.startswith("plug_") else ("cpm", case)
  formats = registry.formats(family)
  source, target = case.split("_to_")
  mesh = None if target != "orbax" else partitioning.make_mesh()
  config = None
  if source == "megatron":  # shards do not record the heads: the config of the checkpoint they were made of
    config = registry.get(family).config_from_record(checkpointing.read_metadata(workdir / f"{family}_orbax"), family)
  loaded = formats[source].load(workdir / f"{family}_{source}", mesh=mesh, config=config)
  loaded_peak = rss_mib("VmHWM")
  if target == "megatron":
    formats["megatron"].save(loaded.params, loaded.config, workdir / f"{family}_megatron", num_ranks=2)
  else:  # hf->orbax writes the "orbax" input of the cpm orbax->* cases
    output = workdir / (f"{family}_orbax" if case == "hf_to_orbax" else f"{family}_{case}")
    formats[target].save(loaded.params, loaded.config, output)
  return loaded_peak


def measure(case: str, workdir: pathlib.Path) -> None:
  """In a child process: prints RSS after imports, peak RSS after loading, peak RSS, peak anon RSS, seconds."""
  if case == "peer":
    import transformers  # noqa: F401  (imports are not counted)
  else:
    from cpm_jax.models import registry  # noqa: F401
    if "megatron" in case:
      import torch  # noqa: F401  (imported by the conversion when it reads or writes torch files)
  baseline, anon_baseline, start = rss_mib("VmRSS"), rss_mib("RssAnon"), time.perf_counter()
  sampler = AnonPeak()
  sampler.start()
  loaded_peak = convert_case(case, workdir)
  anon_peak = sampler.stop()
  print(baseline, loaded_peak, rss_mib("VmHWM"), anon_peak - anon_baseline, time.perf_counter() - start)


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of writing the PLUG checkpoint
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="convert_memory_"))
  if _CASE.value:
    measure(_CASE.value, workdir)
    return
  try:
    sizes = {"cpm": write_checkpoint(workdir / "cpm_hf") / 2**20, "plug": write_plug_checkpoint(workdir / "plug_orbax")
             / 2**20}
    print(f"checkpoints: cpm {_LAYERS.value} layers, hidden {_EMBED.value}, vocab {_VOCAB.value}, float32 "
          f"safetensors {sizes['cpm']:.0f} MiB; plug {_PLUG_ENCODER_LAYERS.value} + {_PLUG_DECODER_LAYERS.value} "
          f"layers, hidden {_EMBED.value}, float32 {sizes['plug']:.0f} MiB; one fresh process per case; ratios are "
          "to the checkpoint size")
    print(f"{'case':<30} {'imports':>8} {'loaded':>8} {'peak RSS':>9} {'peak/size':>10} {'net/size':>9} "
          f"{'anon net/size':>14} {'s':>6}")
    for case, label in CASES.items():
      size_mib = sizes["plug" if case.startswith("plug_") else "cpm"]
      env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
      out = subprocess.run([sys.executable, __file__, f"--case={case}", f"--workdir={workdir}"], check=False,
                           capture_output=True, text=True, env=env)
      if out.returncode:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
      baseline, loaded, peak, anon, seconds = map(float, out.stdout.split()[-5:])
      print(f"{label:<30} {baseline:>8.0f} {loaded:>8.0f} {peak:>9.0f} {peak / size_mib:>10.2f} "
            f"{(peak - baseline) / size_mib:>9.2f} {anon / size_mib:>14.2f} {seconds:>6.1f}")
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir)


if __name__ == "__main__":
  app.run(main)
