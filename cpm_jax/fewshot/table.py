"""The few-shot table: every system of a TableSpec run over the seeds, label-prompt baselines of a causal LM (CPM
zero- and few-shot) and the majority class on the same test split; mean +- std per row, per-seed numbers kept.

A system is a list of gin files (plus bindings) that configure `configured_recipe.recipe`, an object with
`run(seed, workdir) -> {"seed", "rounds": [metrics per round], "seconds"}` (cpm_jax.models.plug.fewshot.
FewShotRecipe); gin is cleared and parsed afresh for each system. "{workdir}" in a binding is replaced by the
table's workdir (e.g. a student's teacher: '{workdir}/systems/all/seed_{seed}/round_1'). Each system's runs are
written to workdir/systems/<name>/runs.json as each seed finishes (and the label-prompt rows to
workdir/label_prompts.json), and a later call reads them back instead of running them again (delete a system's folder to
rerun it). `rows` selects the rows to compute; table.json holds every row whose numbers are on disk.

SIGTERM or Ctrl-C stops the table at the next seed, training or baseline (a training under way saves first):
Preempted names where, table.json holds what was complete, and the same call resumes there.
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

from cpm_jax import checkpointing, gin_setup
from cpm_jax.data.fewshot import FewShotTask
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import report, tasks


class Preempted(RuntimeError):
  """The table stopped on SIGTERM or Ctrl-C (a training under way saved its checkpoint); running it again resumes."""


def finished(metrics: dict, workdir: str) -> dict:
  """A training's final metrics (train_loop.train); Preempted naming `workdir` if it stopped on SIGTERM / Ctrl-C."""
  stopped = metrics.get("preempted_at_step", metrics.get("interrupted_at_step"))
  if stopped is not None:
    raise Preempted(f"in the training {workdir}, at step {stopped} (saved)")
  return metrics


def stop_if_requested(guard: checkpointing.PreemptionGuard, before: str) -> None:
  """Preempted if `guard` received SIGTERM / Ctrl-C: the table stops before `before` starts."""
  if guard.requested:
    raise Preempted(f"before {before}")


@gin.configurable
def configured_recipe(recipe: Any = gin.REQUIRED) -> Any:
  """The recipe a system's gin files bind (`configured_recipe.recipe = @FewShotRecipe()`)."""
  return recipe


MAJORITY = "majority class"


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

  @property
  def label_prompt_rows(self) -> dict[str, int]:
    """{row label: shots} of the CPM rows (none without label_prompt_task)."""
    if not self.label_prompt_task:
      return {}
    rows = {"CPM zero-shot (label prompts)": 0}
    if self.label_prompt_shots:
      rows[f"CPM {self.label_prompt_shots}-shot (label prompts)"] = self.label_prompt_shots
    return rows

  def row_labels(self) -> list[str]:
    """Every row of the table, in its order."""
    return [MAJORITY, *self.label_prompt_rows, *(row[0] for row in self.rows)]

  def selected(self, labels: Sequence[str] | None) -> list[str]:
    """`labels` checked against the table's rows (None: all of them)."""
    known = self.row_labels()
    unknown = [label for label in labels or () if label not in known]
    if unknown:
      raise ValueError(f"Rows {unknown} are not in the table; its rows are {known}.")
    return known if labels is None else list(labels)


def summary(values: Sequence[float], seeds: Sequence[int]) -> dict:
  """{"mean", "std" (sample standard deviation; 0 for one value), "per_seed", "seeds"}."""
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "per_seed": values, "seeds": list(seeds)}


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _label_prompts_path(workdir: str) -> str:
  return os.path.join(workdir, "label_prompts.json")


def _runs_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "systems", name, "runs.json")


def saved_runs(workdir: str, name: str) -> dict[int, dict]:
  """{seed: run} of the system's finished seeds (its runs.json)."""
  path = _runs_path(workdir, name)
  return {run["seed"]: run for run in _read_json(path)} if os.path.exists(path) else {}


def run_system(name: str, files: Sequence[str], bindings: Sequence[str], seeds: Sequence[int], workdir: str,
               guard: checkpointing.PreemptionGuard) -> list[dict]:
  """The system's runs over `seeds`: the seeds in its runs.json read back, each other one run and added to it."""
  runs = saved_runs(workdir, name)
  missing = [seed for seed in seeds if seed not in runs]
  if not missing:
    logging.info("System %s: read %s.", name, _runs_path(workdir, name))
  else:
    gin.clear_config()
    try:
      gin_setup.parse(files, [binding.replace("{workdir}", workdir) for binding in bindings])
      recipe = configured_recipe()
      for seed in missing:
        stop_if_requested(guard, f"system {name}, seed {seed}")
        logging.info("System %s, seed %d.", name, seed)
        runs[seed] = recipe.run(seed, os.path.join(workdir, "systems", name, f"seed_{seed}"))
        report.write_atomic(_runs_path(workdir, name), json.dumps(sorted(runs.values(), key=lambda r: r["seed"]),
                                                                  indent=1))
    finally:
      gin.clear_config()
  return [runs[seed] for seed in seeds]


def _label_prompt_key(shots: int, seed: int) -> str:
  return f"{shots}-shot seed {seed}"


def saved_label_prompts(path: str, seeds: Sequence[int], shots: Sequence[int]) -> dict[int, dict[int, float]]:
  """{shots: {seed: accuracy}} of the label-prompt results in `path` (zero-shot: the one value for every seed)."""
  results = _read_json(path)["results"] if os.path.exists(path) else {}
  return {n: {seed: results[_label_prompt_key(n, seeds[0] if n == 0 else seed)] for seed in seeds
              if _label_prompt_key(n, seeds[0] if n == 0 else seed) in results} for n in shots}


def label_prompt_baselines(task_file: str, checkpoint: str, fewshot_task: FewShotTask, seeds: Sequence[int],
                           shots: Sequence[int], path: str, guard: checkpointing.PreemptionGuard,
                           batch_size: int = 32) -> dict[int, dict[int, float]]:
  """{shots: {seed: accuracy}} of a causal LM's label-prompt scoring (mean accuracy over the task's templates) on
  `fewshot_task`'s test split, for each number of demonstrations in `shots` (drawn from each seed's train sample;
  zero-shot is one evaluation, the same for every seed). Each result goes to the JSON file `path` as it is measured;
  those there for the same task file and checkpoint are read back."""
  key = {"task": task_file, "checkpoint": checkpoint}
  saved = _read_json(path) if os.path.exists(path) else {}
  results = saved["results"] if {k: saved.get(k) for k in key} == key else {}
  lm = None
  for n in shots:
    for seed in seeds[:1] if n == 0 else seeds:
      if _label_prompt_key(n, seed) in results:
        continue
      stop_if_requested(guard, f"the CPM {n}-shot row, seed {seed}")
      if lm is None:
        task = tasks.task_from_gin([task_file])
        loaded = model_lib.load_checkpoint(checkpoint)
        lm = model_lib.language_model(loaded, model_lib.load_tokenizer(loaded), batch_size=batch_size)
        test = list(fewshot_task.splits(seeds[0]).test)
      scored = dataclasses.replace(task, shots=n, seed=seed).evaluate(lm, test, fewshot_task.splits(seed).train)
      results[_label_prompt_key(n, seed)] = scored.metrics["accuracy"]
      report.write_atomic(path, json.dumps({**key, "results": results}, indent=1))
  return saved_label_prompts(path, seeds, shots)


def majority_class(fewshot_task: FewShotTask, seeds: Sequence[int]) -> dict:
  """The test accuracy of always answering the test split's most frequent label (the same for every seed)."""
  labels = [fewshot_task.label_of(e) for e in fewshot_task.splits(seeds[0]).test]
  best = max(labels.count(label) for label in fewshot_task.labels) / len(labels)
  return summary([best] * len(seeds), seeds)


def _row(label: str, values: dict[int, float], seeds: Sequence[int], **fields) -> dict:
  """A table row of the seeds that have a value: complete (every seed), partial or missing (no seed)."""
  done = [seed for seed in seeds if seed in values]
  if not done:
    return {"label": label, **fields, "missing": True}
  row = {"label": label, **fields, **summary([values[seed] for seed in done], done)}
  return row if len(done) == len(seeds) else {**row, "partial": True}


def _rows(spec: TableSpec, workdir: str) -> list[dict]:
  """The table's rows from what is on disk: every system's finished seeds and the CPM rows measured."""
  rows = [{"label": MAJORITY, **majority_class(spec.task, spec.seeds)}]
  label_prompts = saved_label_prompts(_label_prompts_path(workdir), spec.seeds, spec.label_prompt_rows.values())
  for label, shots in spec.label_prompt_rows.items():
    rows.append(_row(label, label_prompts[shots], spec.seeds))
  for label, name, round_index, metric in spec.rows:
    runs = saved_runs(workdir, name)
    rows.append(_row(label, {seed: run["rounds"][round_index][metric] for seed, run in runs.items()}, spec.seeds,
                     system=name, round=round_index, metric=metric))
  return rows


def run_table(spec: TableSpec, workdir: str, *, label_prompt_checkpoint: str | None = None,
              rows: Sequence[str] | None = None) -> dict:
  """Runs the systems and baselines that the `rows` (labels; None: all) read, skipping what is on disk; writes
  workdir/table.json and table.md with every row on disk (and, if stopped, where: "stopped"); returns the table
  (with its wall time and the load averages at start and end: on a shared machine they say how much of the time was
  this run's). SIGTERM / Ctrl-C: Preempted after table.json is written."""
  start, load_at_start = time.perf_counter(), os.getloadavg()
  selected = spec.selected(rows)
  needed = {row[1] for row in spec.rows if row[0] in selected}
  shots = [n for label, n in spec.label_prompt_rows.items() if label in selected and label_prompt_checkpoint]
  os.makedirs(workdir, exist_ok=True)
  seconds, stopped = {}, None
  with checkpointing.PreemptionGuard() as guard:
    try:
      for name, files, bindings in spec.systems:
        if name in needed:
          system_start = time.perf_counter()
          run_system(name, files, bindings, spec.seeds, workdir, guard)
          seconds[name] = time.perf_counter() - system_start
      if shots:
        baseline_start = time.perf_counter()
        label_prompt_baselines(spec.label_prompt_task, label_prompt_checkpoint, spec.task, spec.seeds, shots,
                               _label_prompts_path(workdir), guard)
        seconds["label_prompt"] = time.perf_counter() - baseline_start
    except Preempted as e:
      stopped = str(e)
  table = {"rows": _rows(spec, workdir),
           "systems": {name: list(saved_runs(workdir, name).values()) for name, _, _ in spec.systems},
           "system_seconds": seconds, "seeds": list(spec.seeds),
           "test_examples": len(spec.task.splits(spec.seeds[0]).test), "seconds": time.perf_counter() - start,
           "load_average": {"start": list(load_at_start), "end": list(os.getloadavg())}}
  if stopped:
    table["stopped"] = stopped
  report.write_atomic(os.path.join(workdir, "table.json"), json.dumps(table, indent=1, ensure_ascii=False))
  report.write_atomic(os.path.join(workdir, "table.md"), markdown(table))
  if stopped:
    raise Preempted(stopped)
  return table


def markdown(table: dict) -> str:
  """The rows as a markdown table of test accuracy (%) mean +- std over the seeds, with the per-seed values (a row
  that lacks seeds says which it has; one without any says so)."""
  lines = ["| system | accuracy (%) | per seed |", "|---|---|---|"]
  for row in table["rows"]:
    if row.get("missing"):
      lines.append(f"| {row['label']} | not measured | |")
      continue
    per_seed = " ".join(f"{100 * v:.1f}" for v in row["per_seed"])
    seeds = f" (seeds {', '.join(map(str, row['seeds']))} only)" if row.get("partial") else ""
    lines.append(f"| {row['label']} | {100 * row['mean']:.1f} ± {100 * row['std']:.1f}{seeds} | {per_seed} |")
  return "\n".join(lines) + "\n"
