"""Parameter-efficient fine-tuning: LoRA on the stacked kernels and P-tuning v2 prefixes, as gin switches.

`AdaptedModel` wraps any transformer training model: its params are the base model's, frozen (`ParamSpec.trainable`
False: no gradients, no optimizer state; stored in `base_dtype`, e.g. bfloat16), plus the adapters, which train:
- LoRA (`LoraConfig`): beside each targeted kernel `{name}_kernel` [layers, *in, *out] of a stack, `{name}_lora_a`
  [layers, *in, rank] (normal init), `{name}_lora_b` [layers, rank, *out] (zeros, so the adapted model starts as
  the base) and a frozen `{name}_lora_scale` = alpha / rank; `layers.dense` adds scale x (x A) B. A and B carry the
  kernel's logical axes on its in / out dims, so they split over the mesh like it.
- prefixes (`PrefixConfig`): every targeted self-attention of a stack gets `prefix_k`, `prefix_v` [layers, length,
  heads, head_dim], keys and values every query sees before its own (`layers.with_prefix`).
The adapters are saved as their own small checkpoint (`save_adapters` / `restore_adapters`), and LoRA merges into
the base for serving (`merge`: W + scale x A B, the base family's params again).

    train.model = @AdaptedModel()
    AdaptedModel.model = @CPMLanguageModel()
    AdaptedModel.lora = @LoraConfig()
    LoraConfig.rank = 8
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import gin
import jax
import jax.numpy as jnp

from cpm_jax import checkpointing, layers
from cpm_jax.models import registry

LORA_SUFFIXES = ("_lora_a", "_lora_b", "_lora_scale")
PREFIX_KEYS = ("prefix_k", "prefix_v")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters: rank, alpha (the update is scaled by alpha / rank) and the targeted kernels: regexes searched in
  each stacked kernel's path without its `_kernel` suffix (e.g. "blocks/attn/qkv", "decoder/blocks/mlp/out")."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = (r"attn/qkv$", r"attn/out$", r"mlp/in$", r"mlp/out$")
  init_stddev: float = 0.02

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank}; expected a positive integer.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  """P-tuning v2 prefixes: `length` trainable keys and values per layer of every self-attention module whose path
  one of `targets` (regexes) matches: CPM's "blocks/attn", PLUG's "encoder/blocks/attn", "decoder/blocks/self_attn"."""

  length: int = 16
  targets: tuple[str, ...] = (r"(^|/)attn$", r"(^|/)self_attn$")
  init_stddev: float = 0.02

  def __post_init__(self):
    if self.length < 1:
      raise ValueError(f"PrefixConfig.length={self.length}; expected a positive integer.")


def _path(keys: tuple[str, ...]) -> str:
  return "/".join(keys)


def _frozen(spec: layers.ParamSpec, dtype: str | None) -> layers.ParamSpec:
  return dataclasses.replace(spec, trainable=False, dtype=dtype or spec.dtype)


def _constant(value: float) -> layers.Initializer:
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def _lora_specs(name: str, module: dict, lora: LoraConfig) -> dict:
  """LoRA specs for the stacked kernel `{name}_kernel` of `module` (its in dims are those its bias lacks)."""
  kernel, bias = module[f"{name}_kernel"], module[f"{name}_bias"]
  out_dims = len(bias.shape) - 1
  in_dims = len(kernel.shape) - 1 - out_dims
  num_layers = kernel.shape[0]
  in_shape, out_shape = kernel.shape[1:1 + in_dims], kernel.shape[1 + in_dims:]
  in_axes, out_axes = kernel.axes[1:1 + in_dims], kernel.axes[1 + in_dims:]
  return {
      f"{name}_lora_a": layers.ParamSpec((num_layers, *in_shape, lora.rank), ("layers", *in_axes, None),
                                         layers.normal(lora.init_stddev)),
      f"{name}_lora_b": layers.ParamSpec((num_layers, lora.rank, *out_shape), ("layers", None, *out_axes),
                                         layers.zeros),
      f"{name}_lora_scale": layers.ParamSpec((num_layers,), ("layers",), _constant(lora.alpha / lora.rank),
                                             trainable=False),
  }


def _prefix_specs(module: dict, prefix: PrefixConfig) -> dict:
  """Prefix keys and values for a stacked self-attention module (its fused [layers, embed, 3, heads, head_dim]
  QKV kernel gives the sizes)."""
  kernel = module["qkv_kernel"]
  num_layers, heads, head_dim = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
  spec = layers.ParamSpec((num_layers, prefix.length, heads, head_dim), ("layers", None, *kernel.axes[-2:]),
                          layers.normal(prefix.init_stddev))
  return {"prefix_k": spec, "prefix_v": spec}


def adapted_specs(base: Any, lora: LoraConfig | None, prefix: PrefixConfig | None,
                  base_dtype: str | None = None) -> Any:
  """The base specs frozen (in base_dtype) with the adapters' specs added beside the kernels and attention modules
  they adapt; ValueError if no target matched anything."""
  matched = {"lora": 0, "prefix": 0}

  def visit(node: dict, keys: tuple[str, ...]) -> dict:
    out = {}
    for key, value in node.items():
      out[key] = visit(value, keys + (key,)) if isinstance(value, dict) else _frozen(value, base_dtype)
    stacked = [key for key, value in node.items() if layers.is_spec(value) and key.endswith("_kernel")
               and value.axes[:1] == ("layers",)]
    for key in stacked:
      name = key[:-len("_kernel")]
      if lora is not None and any(re.search(target, _path(keys + (name,))) for target in lora.targets):
        out.update(_lora_specs(name, node, lora))
        matched["lora"] += 1
    if prefix is not None and "qkv_kernel" in stacked and node["qkv_kernel"].shape[-3] == 3 and any(
        re.search(target, _path(keys)) for target in prefix.targets):
      out.update(_prefix_specs(node, prefix))
      matched["prefix"] += 1
    return out

  specs = visit(base, ())
  for kind, config in (("lora", lora), ("prefix", prefix)):
    if config is not None and not matched[kind]:
      raise ValueError(f"{type(config).__name__}.targets={list(config.targets)} match no stacked "
                       f"{'kernel' if kind == 'lora' else 'self-attention'} of the model.")
  return specs


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdaptedModel:
  """A training model whose base params are frozen and whose adapters train (see the module docstring); the train
  step gives gradients and optimizer state to the adapters only. FLOPs: a frozen kernel's weight gradient is not
  computed, so a step costs about 4 instead of 6 x matmul params per token (plus the adapters' small products)."""

  model: Any = gin.REQUIRED
  lora: LoraConfig | None = None
  prefix: PrefixConfig | None = None
  base_dtype: str | None = None  # the frozen base's dtype (None: the model's), e.g. "bfloat16"

  def __post_init__(self):
    if self.lora is None and self.prefix is None:
      raise ValueError("AdaptedModel: give lora (a LoraConfig) or prefix (a PrefixConfig), or both.")

  @property
  def config(self) -> Any:
    return self.model.config

  def param_specs(self) -> Any:
    return adapted_specs(self.model.param_specs(), self.lora, self.prefix, self.base_dtype)

  def loss(self, params: Any, batch: dict, dropout_rng: jax.Array | None = None):
    return self.model.loss(params, batch, dropout_rng)

  def flops_per_token(self, seq_len: int) -> float:
    return self.model.flops_per_token(seq_len) * 4 / 6

  def with_config(self, config) -> AdaptedModel:
    return dataclasses.replace(self, model=self.model.with_config(config))

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    return self.model.example_batch(batch_size, seq_len, target_len)


# ---- adapters apart from the base, and merged into it ------------------------------------------------

def _is_adapter(path) -> bool:
  name = str(getattr(path[-1], "key", path[-1]))
  return name.endswith(LORA_SUFFIXES) or name in PREFIX_KEYS


def split(params: Any) -> tuple[dict, dict]:
  """(base params, adapters): the adapted tree cut in two nested dicts."""
  base, adapters = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    target = adapters if _is_adapter(path) else base
    for key in path[:-1]:
      target = target.setdefault(key.key, {})
    target[path[-1].key] = leaf
  return base, adapters


def combine(base: Any, adapters: Any) -> dict:
  """The adapted tree: `base` with `adapters` (from `split`) put back beside their kernels."""
  def merge_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
      out[key] = merge_dicts(a.get(key, {}), value) if isinstance(value, dict) else value
    return out
  return merge_dicts(base, adapters)


def merge(params: Any) -> dict:
  """The base family's params with every LoRA update folded in (W + scale x A B), for serving; prefixes are keys
  and values, not weights, so a tree with prefixes cannot be merged (ValueError)."""
  def visit(node: dict, keys: tuple[str, ...]) -> dict:
    if any(key in node for key in PREFIX_KEYS):
      raise ValueError(f"{_path(keys)}: P-tuning prefixes do not merge into weights; serve the adapted params.")
    out = {}
    for key, value in node.items():
      if isinstance(value, dict):
        out[key] = visit(value, keys + (key,))
      elif not key.endswith(LORA_SUFFIXES):
        out[key] = value
    for key in node:
      if key.endswith("_lora_a"):
        name = key[:-len("_lora_a")]
        out[f"{name}_kernel"] = _merged_kernel(node[f"{name}_kernel"], node[key], node[f"{name}_lora_b"],
                                               node[f"{name}_lora_scale"])
    return out
  return visit(params, ())


def _merged_kernel(kernel, a, b, scale):
  """kernel [layers, *in, *out] + scale [layers] x A [layers, *in, r] B [layers, r, *out], in the kernel's dtype."""
  num_layers, rank = a.shape[0], a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(num_layers, -1, rank)
  b2 = b.astype(jnp.float32).reshape(num_layers, rank, -1)
  update = jnp.einsum("lir,lro->lio", a2, b2) * scale.astype(jnp.float32)[:, None, None]
  return (kernel.astype(jnp.float32) + update.reshape(kernel.shape)).astype(kernel.dtype)


ADAPTER_RECORD = "adapters"


def save_adapters(directory: str | os.PathLike, params: Any, model: AdaptedModel, **metadata) -> str:
  """Writes only the adapters of `params` (a checkpointing.save_params checkpoint, atomic) with the base model's
  record and the adapter configs."""
  _, adapters = split(params)
  record = registry.record(model.config, **metadata)
  record[ADAPTER_RECORD] = {"lora": None if model.lora is None else dataclasses.asdict(model.lora),
                            "prefix": None if model.prefix is None else dataclasses.asdict(model.prefix)}
  return os.fspath(checkpointing.save_params(directory, adapters, record))


def restore_adapters(directory: str | os.PathLike, model: AdaptedModel, base: Any, shardings: Any = None) -> dict:
  """The adapted params: `base` (the base family's params) with the adapters `save_adapters` wrote for `model` at
  `directory`, checked path for path and shape for shape (ValueError naming the first difference), each read into
  its sharding from `shardings` (the adapted tree's, e.g. ShardedSteps.state_shardings.params; default: one
  device)."""
  abstract = split(layers.abstract_params(model.param_specs()))[1]
  adapter_shardings = None if shardings is None else split(shardings)[1]
  adapters, _ = checkpointing.restore_params(directory, abstract, adapter_shardings)
  return combine(base, adapters)


def adapter_fraction(model: AdaptedModel) -> float:
  """Trainable params as a fraction of all."""
  specs = jax.tree.leaves(model.param_specs(), is_leaf=layers.is_spec)
  trainable = sum(math.prod(spec.shape) for spec in specs if spec.trainable)
  return trainable / sum(math.prod(spec.shape) for spec in specs)
