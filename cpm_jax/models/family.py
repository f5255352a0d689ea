"""What a model family provides, as one object (`Family`); cpm_jax.models.registry holds one per family.

Shared machinery (training, train_loop, checkpointing, decoding loops, evaluation tasks, convert's ledgers, the
programs) never asks which family it has: it calls the family's entry. See BUILD.md, "Adding a model family".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from cpm_jax import layers, serving_weights, training
from cpm_jax.convert.common import Format


def record(name: str, config: Any, **extra) -> dict:
  """What a checkpoint records of its model: {"model": family name, "model_config": config fields, **extra}."""
  return {"model": name, "model_config": dataclasses.asdict(config), **extra}


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything family-specific, by the name checkpoints record ("model" in metadata.json / model.json).

  config_class: the gin-configurable frozen dataclass of sizes and options; it has `param_dtype` and
    `execution_fields` (options such as dtype or remat that may differ from a checkpoint's without changing it).
  param_specs: config -> tree of layers.ParamSpec (shapes, logical axes, initializers); init, abstract params and
    logical axes follow from it.
  training_models / data: the gin-configurable classes the train loop takes as `train.model` / `train.data`.
  tokenizer: path -> the tokenizer (or vocabulary) the family's programs use.
  language_model: (params, config, tokenizer, metadata, **options) -> what evaluation tasks and generate.py call
    (cpm_jax.evaluation.interface.LanguageModel for text models); options: batch_size, decoding_config, mesh,
    strict, progress, weights (serving_weights: None, "bfloat16", "int8"), long_text (generation past the
    positions by the family's protocol).
  formats: checkpoint formats by name (convert.common.Format); the registry adds "orbax" for every family.
  quantized: what int8 serving and int8 checkpoints quantise (serving_weights.Quantized); None: no int8.
  train_step: (model, optimizer, *, num_microbatches, dropout) -> the step (state, batch) -> (state, metrics) that
    training.make_sharded_steps jits for the train loop; training.dense_step unless the family brings its own (the
    KG family's sparse row update).
  serves: the kind of evaluation task its language_model's adapter runs and generate.py needs ("text": a
    LanguageModel; "kg": link prediction and queries), as tasks declare it (evaluation.tasks.Task.serves).
  """

  name: str
  config_class: type
  param_specs: Callable[[Any], Any]
  training_models: tuple[type, ...]
  data: tuple[type, ...]
  tokenizer: Callable[[str], Any]
  language_model: Callable[..., Any]
  formats: Mapping[str, Format] = dataclasses.field(default_factory=dict)
  quantized: serving_weights.Quantized | None = None
  train_step: Callable[..., Callable] = training.dense_step
  serves: str = "text"

  def init(self, config: Any, key: jax.Array) -> Any:
    """Freshly initialised params of `config` in its param_dtype."""
    return layers.init_from_specs(self.param_specs(config), key, jnp.dtype(config.param_dtype))

  def abstract_params(self, config: Any) -> Any:
    """ShapeDtypeStructs of the params (no allocation)."""
    return layers.abstract_params(self.param_specs(config), config.param_dtype)

  def logical_axes(self, config: Any) -> Any:
    return layers.logical_axes(self.param_specs(config))

  def stored_params(self, config: Any, metadata: dict, where: str) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(abstract params, logical axes, restored -> params) of a checkpoint whose metadata is `metadata`: as
    `abstract_params` / `logical_axes`, or for an int8 checkpoint ("weights": "int8") its int8 tree, dequantised
    on reading (serving_weights.from_checkpoint)."""
    abstract, axes = self.abstract_params(config), self.logical_axes(config)
    if metadata.get("weights") != "int8":
      return abstract, axes, lambda params: params
    if self.quantized is None:
      raise ValueError(f"{where}: an int8 checkpoint, but family {self.name!r} has no int8 weights.")
    abstract, axes = serving_weights.checkpoint_abstract(abstract, axes, self.quantized)
    return abstract, axes, lambda params: serving_weights.from_checkpoint(params, self.quantized,
                                                                          jnp.dtype(config.param_dtype))

  def record(self, config: Any, **extra) -> dict:
    """What a checkpoint records of its model (`record`)."""
    if not isinstance(config, self.config_class):
      raise TypeError(f"{type(config).__name__} is not the config of family {self.name!r} ({self.config_class}).")
    return record(self.name, config, **extra)

  def config_from_record(self, meta: dict, where: str) -> Any:
    """The config a `record` holds; ValueError naming `where` if it is another family's or has unknown fields."""
    name = meta.get("model", "cpm")  # the first checkpoints recorded no family: they were CPM's
    if name != self.name:
      raise ValueError(f"{where}: holds a {name!r} model, not a {self.name!r} one.")
    if "model_config" not in meta:
      raise ValueError(f"{where} has no 'model_config'; write checkpoints with "
                       "checkpointing.save_params(dir, params, family.record(config, tokenizer=...)).")
    known = {field.name for field in dataclasses.fields(self.config_class)}
    unknown = sorted(set(meta["model_config"]) - known)
    if unknown:
      raise ValueError(f"{where}: model_config has fields {unknown} that {self.config_class.__name__} lacks.")
    try:
      return self.config_class(**meta["model_config"])
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: model_config is not a valid {self.config_class.__name__}: {e}") from e
