"""The model families by the name checkpoints record ("model" in metadata.json / a workdir's model.json)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from cpm_jax.models import cpm, plug


@dataclasses.dataclass(frozen=True)
class Family:
  """A family's config class and the functions of a config that give its params' structure."""

  name: str
  config_class: type
  abstract_params: Callable[[Any], dict]
  logical_axes: Callable[[Any], dict]
  init: Callable[[Any, Any], dict]


FAMILIES = {
    "cpm": Family("cpm", cpm.CPMConfig, cpm.abstract_params, cpm.logical_axes, cpm.init),
    "plug": Family("plug", plug.PlugConfig, plug.abstract_params, plug.logical_axes, plug.init),
}


def of_config(config: Any) -> Family:
  for family in FAMILIES.values():
    if isinstance(config, family.config_class):
      return family
  raise TypeError(f"{type(config).__name__} is the config of no model family ({sorted(FAMILIES)}).")


def record(config: Any, **extra) -> dict:
  """What a checkpoint records of its model: {"model": family, "model_config": fields, **extra}."""
  return {"model": of_config(config).name, "model_config": dataclasses.asdict(config), **extra}


def from_record(meta: dict, where: str) -> tuple[Family, Any]:
  """(family, config) of a `record` (a record without "model" is CPM's, as the first checkpoints were)."""
  name = meta.get("model", "cpm")
  if name not in FAMILIES:
    raise ValueError(f"{where}: model {name!r} is none of {sorted(FAMILIES)}.")
  if "model_config" not in meta:
    raise ValueError(f"{where} has no 'model_config'; write checkpoints with "
                     "checkpointing.save_params(dir, params, families.record(config, tokenizer=...)).")
  family = FAMILIES[name]
  known = {field.name for field in dataclasses.fields(family.config_class)}
  unknown = sorted(set(meta["model_config"]) - known)
  if unknown:
    raise ValueError(f"{where}: model_config has fields {unknown} that {family.config_class.__name__} lacks.")
  return family, family.config_class(**meta["model_config"])
