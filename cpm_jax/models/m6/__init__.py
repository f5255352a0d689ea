"""M6 / 悟道·文汇: one transformer over image patches and Chinese text with M6's multitask masks. Everything
M6-specific is in this folder:

  model.py       config, param specs, embeddings, forward (training layout) and cached forward, the training model
  patches.py     patchify, 2-D patch grid, patch-feature encoders (linear, conv stem, precomputed features)
  masks.py       the per-example prefix-LM masks of M6's modes
  vocab.py       the character vocabulary (CharVocab)
  data.py        M6Data: multitask batches over the embedded image and text datasets
  decode.py      the decoding adapter: decode layout, prefill (the image + prompt prefix, once), step, generate
  evaluation.py  the LanguageModel adapter: describe (image -> text), generate (text -> text)
"""

from cpm_jax.models.family import Family
from cpm_jax.models.m6.data import M6Data
from cpm_jax.models.m6.decode import cache_logical_axes, decode_layout, generate, prefill, step_fn, text_prefix
from cpm_jax.models.m6.evaluation import language_model
from cpm_jax.models.m6.masks import prefix_lm_mask
from cpm_jax.models.m6.model import (M6Config, M6Model, cached_hidden_states, embed_image, embed_text, forward,
                                     hidden_states, logits_from_hidden, param_specs)
from cpm_jax.models.m6.patches import grid_positions, patchify, unpatchify
from cpm_jax.models.m6.vocab import CharVocab

FAMILY = Family(
    name="m6",
    config_class=M6Config,
    param_specs=param_specs,
    training_models=(M6Model,),
    data=(M6Data,),
    tokenizer=CharVocab,
    language_model=language_model,
)
init = FAMILY.init
abstract_params = FAMILY.abstract_params
logical_axes = FAMILY.logical_axes

__all__ = ["CharVocab", "FAMILY", "M6Config", "M6Data", "M6Model", "abstract_params", "cache_logical_axes",
           "cached_hidden_states", "decode_layout", "embed_image", "embed_text", "forward", "generate",
           "grid_positions", "hidden_states", "init", "language_model", "logical_axes", "logits_from_hidden",
           "param_specs", "patchify", "prefill", "prefix_lm_mask", "step_fn", "text_prefix", "unpatchify"]
