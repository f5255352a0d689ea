"""CPM-LM checkpoint conversion: Megatron/DeepSpeed shards, Hugging Face GPT-2 and Orbax, in any direction.

  loaded = convert.LOADERS["megatron"]("/ckpt/CPM", mesh=mesh)     # -> Loaded(params, config, notes)
  convert.SAVERS["hf"](loaded.params, loaded.config, "/out/cpm-hf")

Modules: `common` (errors, key ledgers, exactly-once target filling, atomic output), `torch_io` (safe
torch.load), `safetensors_io` (streaming), `megatron` (model-parallel shard dirs and splits, model-agnostic),
`cpm` (CPM's key table, config inference, Megatron and Orbax), `hf` (GPT2LMHeadModel directories).
"""

from cpm_jax.convert.common import ConversionError
from cpm_jax.convert.cpm import Loaded, load_megatron, load_orbax, save_megatron, save_orbax
from cpm_jax.convert.hf import load_hf, save_hf

LOADERS = {"orbax": load_orbax, "hf": load_hf, "megatron": load_megatron}
SAVERS = {"orbax": save_orbax, "hf": save_hf, "megatron": save_megatron}

__all__ = ["ConversionError", "LOADERS", "Loaded", "SAVERS", "load_hf", "load_megatron", "load_orbax", "save_hf",
           "save_megatron", "save_orbax"]
