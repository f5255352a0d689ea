"""Checkpoint conversion for both model families, in any direction, by (model, format).

  loaded = convert.FORMATS["cpm"].loaders["megatron"]("/ckpt/CPM", mesh=mesh)  # -> Loaded(params, config, notes)
  convert.FORMATS["cpm"].savers["hf"](loaded.params, loaded.config, "/out/cpm-hf")

Formats: "orbax" (cpm_jax's params-only checkpoints), "megatron" (model-parallel `mp_rank_XX_model_states.pt`
shards: CPM's Megatron release, PLUG's DeepSpeed release), "hf" (CPM: GPT2LMHeadModel in and out; PLUG: a
BertModel / BertForMaskedLM into the encoder, read only).

Modules: `common` (errors, key ledgers, exactly-once target filling, atomic output), `torch_io` (safe
torch.load), `safetensors_io` (streaming), `megatron` (model-parallel shard dirs and splits, model-agnostic),
`cpm` (CPM's key table, config inference, Megatron and Orbax), `hf` (GPT2LMHeadModel directories), `plug`
(PLUG / StructBERT / BERT).
"""

import dataclasses
from typing import Callable

from cpm_jax.convert import plug
from cpm_jax.convert.common import ConversionError
from cpm_jax.convert.cpm import Loaded, load_megatron, load_orbax, save_megatron, save_orbax
from cpm_jax.convert.hf import load_hf, save_hf


@dataclasses.dataclass(frozen=True)
class Formats:
  """What one model family reads (path, **options) -> Loaded and writes (params, config, path, ...)."""

  loaders: dict[str, Callable[..., Loaded]]
  savers: dict[str, Callable]


FORMATS = {
    "cpm": Formats(loaders={"orbax": load_orbax, "hf": load_hf, "megatron": load_megatron},
                   savers={"orbax": save_orbax, "hf": save_hf, "megatron": save_megatron}),
    "plug": Formats(loaders={"orbax": plug.load_orbax, "hf": plug.load_hf_bert, "megatron": plug.load_deepspeed},
                    savers={"orbax": plug.save_orbax, "megatron": plug.save_deepspeed}),
}

__all__ = ["ConversionError", "FORMATS", "Formats", "Loaded", "load_hf", "load_megatron", "load_orbax", "save_hf",
           "save_megatron", "save_orbax"]
