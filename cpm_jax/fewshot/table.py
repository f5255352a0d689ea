"""The few-shot table: every system of a TableSpec run over the seeds, label-prompt baselines of a causal LM (CPM
zero- and few-shot) and the majority class on the same test split; mean +- std per row, per-seed numbers kept.

A system is a list of gin files (plus bindings) that configure `configured_recipe.recipe`, an object with
`run(seed, workdir) -> {"seed", "rounds": [metrics per round], "seconds"}` (cpm_jax.models.plug.fewshot.
FewShotRecipe); gin is cleared and parsed afresh for each system. "{workdir}" in a binding is replaced by the
table's workdir (e.g. a student's teacher: '{workdir}/systems/all/seed_{seed}/round_1'). Each system's runs are
written to workdir/systems/<name>/runs.json, and a later call with the same seeds reads them instead of running again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import gin
import numpy as np
from absl import logging

from cpm_jax import gin_setup
from cpm_jax.data.fewshot import FewShotTask
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import report, tasks


class Preempted(RuntimeError):
  """A recipe's training stopped on SIGTERM (its checkpoint is saved): the table stops too, and resumes when run
  again."""


@gin.configurable
def configured_recipe(recipe: Any = gin.REQUIRED) -> Any:
  """The recipe a system's gin files bind (`configured_recipe.recipe = @FewShotRecipe()`)."""
  return recipe


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TableSpec:
  """systems: (name, gin files, bindings) each. rows: (label, system, round, metric) each; round -1 is the last,
  metric a key of the recipe's per-round results ("accuracy", "knn_accuracy", ...). label_prompt_task: a tasks/ gin
  file (LabelPromptTask) scored zero-shot and with label_prompt_shots demonstrations from each seed's train sample.
  All rows read `task`'s test split."""

  task: FewShotTask = dataclasses.field(default_factory=FewShotTask)
  systems: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()
  rows: tuple[tuple[str, str, int, str], ...] = ()
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  label_prompt_task: str | None = None
  label_prompt_shots: int = 4

  def __post_init__(self):
    names = [system[0] for system in self.systems]
    unknown = sorted({row[1] for row in self.rows} - set(names))
    if unknown:
      raise ValueError(f"TableSpec.rows name systems {unknown} that TableSpec.systems lacks (it has {names}).")


def summary(values: Sequence[float], seeds: Sequence[int]) -> dict:
  """{"mean", "std" (sample standard deviation; 0 for one value), "per_seed", "seeds"}."""
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "per_seed": values, "seeds": list(seeds)}


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_system(name: str, files: Sequence[str], bindings: Sequence[str], seeds: Sequence[int],
               workdir: str) -> list[dict]:
  """The system's runs over `seeds` (read from its runs.json when it holds exactly these seeds)."""
  system_dir = os.path.join(workdir, "systems", name)
  done = os.path.join(system_dir, "runs.json")
  if os.path.exists(done):
    runs = _read_json(done)
    if [run["seed"] for run in runs] == list(seeds):
      logging.info("System %s: read %s.", name, done)
      return runs
  gin.clear_config()
  try:
    gin_setup.parse(files, [binding.replace("{workdir}", workdir) for binding in bindings])
    recipe = configured_recipe()
    runs = []
    for seed in seeds:
      logging.info("System %s, seed %d.", name, seed)
      runs.append(recipe.run(seed, os.path.join(system_dir, f"seed_{seed}")))
  finally:
    gin.clear_config()
  report.write_atomic(done, json.dumps(runs, indent=1))
  return runs


def label_prompt_baselines(task_file: str, checkpoint: str, fewshot_task: FewShotTask, seeds: Sequence[int],
                           shots: int, batch_size: int = 32) -> dict[str, dict]:
  """{"zero_shot": summary, "few_shot": summary (if shots)} of a causal LM's label-prompt scoring (mean accuracy over
  the task's templates) on `fewshot_task`'s test split; demonstrations from each seed's train sample."""
  task = tasks.task_from_gin([task_file])
  loaded = model_lib.load_checkpoint(checkpoint)
  lm = model_lib.language_model(loaded, model_lib.load_tokenizer(loaded), batch_size=batch_size)
  test = list(fewshot_task.splits(seeds[0]).test)
  zero = task.evaluate(lm, test).metrics["accuracy"]
  results = {"zero_shot": summary([zero] * len(seeds), seeds)}
  if shots:
    few = [dataclasses.replace(task, shots=shots, seed=seed).evaluate(lm, test, fewshot_task.splits(seed).train)
           .metrics["accuracy"] for seed in seeds]
    results["few_shot"] = summary(few, seeds)
  return results


def majority_class(fewshot_task: FewShotTask, seeds: Sequence[int]) -> dict:
  """The test accuracy of always answering the test split's most frequent label (the same for every seed)."""
  labels = [fewshot_task.label_of(e) for e in fewshot_task.splits(seeds[0]).test]
  best = max(labels.count(label) for label in fewshot_task.labels) / len(labels)
  return summary([best] * len(seeds), seeds)


def run_table(spec: TableSpec, workdir: str, *, label_prompt_checkpoint: str | None = None) -> dict:
  """Runs every system and baseline; writes workdir/table.json and table.md; returns the table (with its wall time and
  the load averages at start and end: on a shared machine they say how much of the time was this run's)."""
  start, load_at_start = time.perf_counter(), os.getloadavg()
  os.makedirs(workdir, exist_ok=True)
  systems, seconds = {}, {}
  for name, files, bindings in spec.systems:
    system_start = time.perf_counter()
    systems[name] = run_system(name, files, bindings, spec.seeds, workdir)
    seconds[name] = time.perf_counter() - system_start
  rows = [{"label": "majority class", **majority_class(spec.task, spec.seeds)}]
  if spec.label_prompt_task and label_prompt_checkpoint:
    baseline_start = time.perf_counter()
    baselines = label_prompt_baselines(spec.label_prompt_task, label_prompt_checkpoint, spec.task, spec.seeds,
                                       spec.label_prompt_shots)
    seconds["label_prompt"] = time.perf_counter() - baseline_start
    rows.append({"label": "CPM zero-shot (label prompts)", **baselines["zero_shot"]})
    if "few_shot" in baselines:
      rows.append({"label": f"CPM {spec.label_prompt_shots}-shot (label prompts)", **baselines["few_shot"]})
  for label, name, round_index, metric in spec.rows:
    runs = systems[name]
    rows.append({"label": label, "system": name, "round": round_index, "metric": metric,
                 **summary([run["rounds"][round_index][metric] for run in runs], spec.seeds)})
  table = {"rows": rows, "systems": systems, "system_seconds": seconds, "seeds": list(spec.seeds),
           "test_examples": len(spec.task.splits(spec.seeds[0]).test), "seconds": time.perf_counter() - start,
           "load_average": {"start": list(load_at_start), "end": list(os.getloadavg())}}
  report.write_atomic(os.path.join(workdir, "table.json"), json.dumps(table, indent=1, ensure_ascii=False))
  report.write_atomic(os.path.join(workdir, "table.md"), markdown(table))
  return table


def markdown(table: dict) -> str:
  """The rows as a markdown table of test accuracy (%) mean +- std over the seeds, with the per-seed values."""
  lines = ["| system | accuracy (%) | per seed |", "|---|---|---|"]
  for row in table["rows"]:
    per_seed = " ".join(f"{100 * v:.1f}" for v in row["per_seed"])
    lines.append(f"| {row['label']} | {100 * row['mean']:.1f} ± {100 * row['std']:.1f} | {per_seed} |")
  return "\n".join(lines) + "\n"
