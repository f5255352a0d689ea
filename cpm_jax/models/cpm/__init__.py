"""CPM-LM (TsinghuaAI CPM-1): a GPT-2-style Chinese decoder. Everything CPM-specific is in this folder:

  model.py      config, param specs, forward (training layout) and cached forward (decode layout), the training model
  data.py       LMData: packed LM batches for the train loop; LabelPromptData: prompt-style fine-tuning rows
  decode.py     the decoding adapter: decode layout, prefill, step, generate
  evaluation.py the LanguageModel adapter: continuation scoring and generation
  convert.py    the release's Megatron/DeepSpeed shards (one key table, config inference)
  hf.py         Hugging Face GPT2LMHeadModel directories
  xl.py         CPM-XL, the Transformer-XL variant (segment recurrence, relative positions): family "cpm_xl"
  xl_decode.py  its decoding adapter (generation carries the memory) and LanguageModel adapter
"""

from cpm_jax.convert.common import Format
from cpm_jax.models.cpm import convert, hf, xl, xl_decode
from cpm_jax.models.cpm.data import LabelPromptData, LMData
from cpm_jax.models.cpm.decode import (QUANTIZED, SlidingWindow, attention_spans, cache_logical_axes, decode_layout,
                                      decode_program, generate, init_cache, prefill, served_logits, step_fn,
                                      stream)
from cpm_jax.models.cpm.evaluation import language_model, score_fn
from cpm_jax.models.cpm.model import (CPMConfig, CPMLanguageModel, cached_hidden_states, embed, forward,
                                      hidden_states, logits_from_hidden, param_specs)
from cpm_jax.models.family import Family
from cpm_jax.tokenization import CPMTokenizer

FAMILY = Family(
    name="cpm",
    config_class=CPMConfig,
    param_specs=param_specs,
    training_models=(CPMLanguageModel,),
    data=(LMData, LabelPromptData),
    tokenizer=CPMTokenizer,
    language_model=language_model,
    formats={
        "hf": Format(load=hf.load_hf, save=hf.save_hf, load_options=("num_heads", "trust_pickle")),
        "megatron": Format(load=convert.load_megatron, save=convert.save_megatron,
                           load_options=("num_heads", "tag", "trust_pickle"), save_options=("num_ranks", "tag")),
    },
    quantized=QUANTIZED,
)
init = FAMILY.init
abstract_params = FAMILY.abstract_params
logical_axes = FAMILY.logical_axes

# The Transformer-XL variant: a family of its own (its checkpoints record "cpm_xl") with CPM's tokenizer and data.
XL_FAMILY = Family(
    name="cpm_xl",
    config_class=xl.CPMXLConfig,
    param_specs=xl.param_specs,
    training_models=(xl.CPMXLLanguageModel,),
    data=(LMData,),
    tokenizer=CPMTokenizer,
    language_model=xl_decode.language_model,
    quantized=xl_decode.QUANTIZED,
)

__all__ = ["CPMConfig", "CPMLanguageModel", "FAMILY", "LabelPromptData", "LMData", "QUANTIZED", "SlidingWindow", "XL_FAMILY",
           "abstract_params", "attention_spans", "cache_logical_axes", "cached_hidden_states", "decode_layout",
           "decode_program", "embed", "forward", "generate", "hidden_states", "init", "init_cache", "language_model",
           "logical_axes", "logits_from_hidden", "param_specs", "prefill", "score_fn", "served_logits",
           "step_fn", "stream"]
