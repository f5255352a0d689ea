"""The model families, by the name checkpoints record ("model" in metadata.json / a workdir's model.json).

Importing this module imports every family (registering their gin configurables). A new family is one folder in
cpm_jax/models/ with a `FAMILY` (cpm_jax.models.family.Family) and one line in `FAMILIES` below.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import gin

from cpm_jax.convert import orbax
from cpm_jax.convert.common import Format
from cpm_jax.models import cpm, kg, m6, plug
from cpm_jax.models.family import Family

FAMILIES: dict[str, Family] = {family.name: family for family in (cpm.FAMILY, cpm.XL_FAMILY, plug.FAMILY, kg.FAMILY,
                                                                  m6.FAMILY)}
DEFAULT = "cpm"  # the family of checkpoints that record none, and of programs told nothing else


def get(name: str, where: str = "model") -> Family:
  """The family called `name`; a ValueError naming `where` and the families there are otherwise."""
  if name not in FAMILIES:
    raise ValueError(f"{where}: model family {name!r} is none of {sorted(FAMILIES)}.")
  return FAMILIES[name]


def of_config(config: Any) -> Family:
  """The family whose config class `config` is."""
  for family in FAMILIES.values():
    if type(config) is family.config_class:
      return family
  raise TypeError(f"{type(config).__name__} is the config of no model family ({sorted(FAMILIES)}).")


def record(config: Any, **extra) -> dict:
  """What a checkpoint records of a model of `config`'s family (Family.record)."""
  return of_config(config).record(config, **extra)


def from_record(meta: dict, where: str) -> tuple[Family, Any]:
  """(family, config) of a `record`."""
  family = get(meta.get("model", DEFAULT), where)
  return family, family.config_from_record(meta, where)


@functools.cache
def formats(name: str) -> dict[str, Format]:
  """Every checkpoint format of the family `name`: its own and the shared "orbax"."""
  family = get(name)
  shared = {"orbax": Format(load=functools.partial(orbax.load_orbax, family),
                            save=functools.partial(orbax.save_orbax, family))}
  return {**shared, **family.formats}


def gin_bound_family() -> Family | None:
  """The family whose config class the parsed gin files bind a field of (e.g. `PlugConfig.num_heads = 2`), if
  any: a program told no family takes it from there."""
  for family in FAMILIES.values():
    for field in dataclasses.fields(family.config_class):
      try:
        gin.query_parameter(f"{family.config_class.__name__}.{field.name}")
      except ValueError:
        continue
      return family
  return None
