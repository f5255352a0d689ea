"""Where the data meets the model: the sizes a data class needs of the model config, checked once at start-up.

An id past the end of an embedding table (a token id >= vocab_size, a position >= max_positions, a token type or a
label out of range) is not an error on device: the gather clamps it and training goes on, silently wrong. So every
training data class declares `model_requirements() -> tuple[Requirement, ...]`, and the train loop calls
`fit(model, data)` before it builds anything:
- a size the data fixes (`adopt`, e.g. vocab_size from the tokenizer) is taken from the data when gin binds no value
  for it, so a demo config needs no vocab binding;
- a config value below what the data needs is a one-line ConfigError naming both bindings;
- `BatchCheck` then checks each host batch against the config's sizes (a numpy max per declared array, before the
  batch goes to the devices), which catches a data class whose declaration is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import gin
import numpy as np
from absl import logging

from cpm_jax.gin_setup import ConfigError


@dataclasses.dataclass(frozen=True)
class Requirement:
  """The data needs `config.<field> >= needed`; the arrays `batch_keys` hold values < config.<field>.

  source: what fixes `needed`, named as the user binds it, e.g. "the tokenizer LMData.tokenizer_path = '...'".
  adopt: when gin leaves the config field unbound, the config takes `needed` (vocab_size from the tokenizer).
  """

  field: str
  needed: int
  source: str
  batch_keys: tuple[str, ...] = ()
  adopt: bool = False


def gin_binds(config: Any, field: str) -> bool:
  """Whether the parsed gin config binds `field` of `config`'s class (e.g. CPMConfig.vocab_size)."""
  try:
    gin.query_parameter(f"{type(config).__name__}.{field}")
  except ValueError:
    return False
  return True


def fit(model: Any, data: Any) -> Any:
  """`model` (a frozen dataclass with a `config`), its config fitted to `data`'s requirements; see the module doc."""
  config = model.config
  name = type(config).__name__
  fields = {field.name for field in dataclasses.fields(config)}
  changes: dict[str, int] = {}
  for requirement in data.model_requirements():
    binding = f"{name}.{requirement.field}"
    if requirement.field not in fields:
      raise ConfigError(f"{type(data).__name__} needs {binding}, which {name} lacks: the data is for another model "
                        "family.")
    value = changes.get(requirement.field, getattr(config, requirement.field))
    if requirement.adopt and not gin_binds(config, requirement.field):
      if value != requirement.needed:
        logging.info("%s = %d, from %s (bind %s to set it).", binding, requirement.needed, requirement.source,
                     binding)
        changes[requirement.field] = requirement.needed
      continue
    if value < requirement.needed:
      unbound = " or leave it unbound to take it from the data" if requirement.adopt else ""
      raise ConfigError(f"{binding} = {value} is too small for the data: {requirement.source} needs at least "
                        f"{requirement.needed} (larger ids would be clamped silently). Bind {binding} >= "
                        f"{requirement.needed}{unbound}.")
  if not changes:
    return model
  return model.with_config(dataclasses.replace(config, **changes))


class BatchCheck:
  """Checks host batches against the config's sizes for the arrays the requirements name."""

  def __init__(self, config: Any, requirements: Sequence[Requirement]):
    name = type(config).__name__
    self._limits: Mapping[str, tuple[str, int]] = {
        key: (f"{name}.{r.field}", getattr(config, r.field)) for r in requirements for key in r.batch_keys}

  def __call__(self, batch: Mapping[str, np.ndarray], where: str) -> None:
    """Raises a ValueError naming the batch array, its largest value and the config binding it exceeds."""
    for key, (binding, limit) in self._limits.items():
      if key not in batch:
        raise KeyError(f"{where}: the data declares batch array {key!r} (for {binding}) but its batches hold "
                       f"{sorted(batch)}.")
      largest = int(np.max(batch[key], initial=0))
      if largest >= limit:
        raise ValueError(f"{where}: batch array {key!r} holds {largest}, out of range for {binding} = {limit}; "
                         "the data class's model_requirements() understates what it produces.")
