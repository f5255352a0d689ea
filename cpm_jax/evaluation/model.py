"""What tasks need from a model (tokenizer, scoring, generation), and loading CPM-LM for it.

`load_cpm(checkpoint)` reads a params-only checkpoint (`checkpointing.save_params`: metadata.json holds the
model config under "model_config" and the tokenizer path under "tokenizer") onto any mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cpm_jax import checkpointing, decoding, partitioning
from cpm_jax.evaluation import scoring
from cpm_jax.models import cpm
from cpm_jax.tokenization import CPMTokenizer


@dataclasses.dataclass
class LanguageModel:
  """A tokenizer (encode/decode/eod_id/pad_id), request scoring and generation, as tasks use them.

  score(requests, names) -> (total log-likelihoods, scored-token counts); generate(prompt ids) -> new ids.
  """

  tokenizer: Any
  score: Callable[[Sequence[scoring.Request], Sequence[str] | None], tuple[np.ndarray, np.ndarray]]
  generate: Callable[[Sequence[Sequence[int]]], list[list[int]]]

  def generate_text(self, prompts: Sequence[str]) -> list[str]:
    """Decoded continuations of text prompts."""
    return [self.tokenizer.decode(ids) for ids in self.generate([self.tokenizer.encode(p) for p in prompts])]


def cpm_language_model(params: dict, config: cpm.CPMConfig, tokenizer: Any, *, batch_size: int = 8,
                       decoding_config: decoding.DecodingConfig | None = None, mesh=None, strict: bool = False,
                       progress: bool = False) -> LanguageModel:
  """CPM-LM behind the LanguageModel interface (greedy decoding of 64 tokens unless told otherwise)."""
  score_fn = scoring.cpm_score_fn(config)
  decoding_config = decoding_config or decoding.SamplingConfig(greedy=True)

  def score(requests, names=None):
    with partitioning.activate(mesh) if mesh is not None else contextlib.nullcontext():
      return scoring.score_requests(score_fn, params, requests, max_length=config.max_positions,
                                    batch_size=batch_size, pad_id=tokenizer.pad_id, strict=strict,
                                    progress=progress, names=names)

  def generate(prompts):
    return decoding.generate(params, prompts, config, decoding_config, eod_id=tokenizer.eod_id,
                             pad_id=tokenizer.pad_id, batch_size=batch_size, strict=strict, mesh=mesh,
                             progress=progress)

  return LanguageModel(tokenizer, score, generate)


def config_from_params(params: Any, **overrides) -> cpm.CPMConfig:
  """The CPMConfig whose shapes these params (arrays or ShapeDtypeStructs) have."""
  layers, embed, _, heads, _ = params["blocks"]["attn"]["qkv_kernel"].shape
  vocab = params["embed"]["wte"].shape[0]
  return cpm.CPMConfig(vocab_size=vocab, num_layers=layers, embed_dim=embed, num_heads=heads,
                       mlp_dim=params["blocks"]["mlp"]["in_kernel"].shape[-1],
                       max_positions=params["embed"]["wpe"].shape[0],
                       param_dtype=str(params["embed"]["wte"].dtype), **overrides)


def _workdir_params(workdir: epath.Path, shardings_for) -> tuple[dict, cpm.CPMConfig, str | None]:
  """Params of the latest checkpoint of a training workdir, the config they imply, the tokenizer in config.gin."""
  step = checkpointing.Checkpointer(workdir / "checkpoints").latest_step()
  if step is None:
    raise FileNotFoundError(f"Training workdir {workdir} has no complete checkpoint in {workdir / 'checkpoints'}.")
  state_dir = workdir / "checkpoints" / str(step) / checkpointing.STATE_ITEM
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(state_dir).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
    config = config_from_params(abstract["params"])
    shardings = jax.tree.map(lambda _: None, abstract)
    shardings["params"] = shardings_for(config)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = checkpointer.restore(state_dir, target)["params"]
  gin_text = (workdir / "config.gin").read_text() if (workdir / "config.gin").exists() else ""
  found = re.search(r"tokenizer_path\s*=\s*['\"]([^'\"]+)['\"]", gin_text)
  return params, config, found.group(1) if found else None


def untrained_params(config: cpm.CPMConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> dict:
  """Freshly initialised params of `config` (the chance baseline of an evaluation), sharded over `mesh`."""
  shardings = None
  if mesh is not None:
    shardings = partitioning.tree_shardings(cpm.logical_axes(config), mesh, cpm.abstract_params(config))
  return jax.jit(lambda key: cpm.init(config, key), out_shardings=shardings)(jax.random.key(seed))


def load_cpm(checkpoint: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, tokenizer_path: str | None = None
             ) -> tuple[dict, cpm.CPMConfig, CPMTokenizer]:
  """(params, config, tokenizer) from a params-only checkpoint or a training workdir, sharded over `mesh`.

  Params-only (`checkpointing.save_params`): the config and tokenizer path come from metadata.json. Training
  workdir (`train.py --workdir`): the latest checkpoint's params, the config from their shapes and the tokenizer
  from config.gin. tokenizer_path overrides the recorded one.
  """
  path = epath.Path(checkpoint)

  def shardings_for(config):
    if mesh is None:
      return jax.tree.map(lambda _: None, cpm.abstract_params(config))
    return partitioning.tree_shardings(cpm.logical_axes(config), mesh, cpm.abstract_params(config))

  if (path / checkpointing.METADATA_FILE).exists():
    metadata = checkpointing.read_metadata(path)
    if "model_config" not in metadata:
      raise ValueError(f"{path / checkpointing.METADATA_FILE} has no 'model_config'; write checkpoints with "
                       "checkpointing.save_params(dir, params, {'model_config': dataclasses.asdict(config), ...}).")
    fields = {f.name for f in dataclasses.fields(cpm.CPMConfig)}
    config = cpm.CPMConfig(**{k: v for k, v in metadata["model_config"].items() if k in fields})
    shardings = None if mesh is None else shardings_for(config)
    params, _ = checkpointing.restore_params(path, cpm.abstract_params(config), shardings)
    recorded = metadata.get("tokenizer")
  elif (path / "checkpoints").is_dir():
    params, config, recorded = _workdir_params(path, shardings_for)
  else:
    raise FileNotFoundError(f"--checkpoint {path}: neither a params-only checkpoint ({checkpointing.METADATA_FILE}) "
                            "nor a training workdir (checkpoints/).")
  tokenizer_path = tokenizer_path or recorded
  if not tokenizer_path:
    raise ValueError(f"--checkpoint {path} records no tokenizer path; pass --tokenizer.")
  return params, config, CPMTokenizer(os.path.expanduser(tokenizer_path))
