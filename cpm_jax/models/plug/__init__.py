"""PLUG (AliceMind): a StructBERT encoder + PALM decoder, and plain post-LN BERT. Everything PLUG-specific is in
this folder:

  model.py       config, param specs, encoder, heads, decoder (training and cached), the training models (incl.
                 FewShotModel: [CLS] / PET / UniMC heads, R-Drop, mixup, contrastive, distillation switches)
  objectives.py  StructBERT and PALM noising and losses
  data.py        the Grain pipelines: StructBertData, PalmData, Seq2SeqData, ClassificationData
  fewshot_inputs.py  few-shot input formats (ClsFormat, PromptFormat, UniMCFormat) and FewShotData
  fewshot.py     few-shot recipes: train, evaluate, kNN, self-training, distillation over seeds
  decode.py      the decoding adapter: decode layout, prefill (the encoder), step, generate
  evaluation.py  the LanguageModel adapter: generation, [CLS]-head and few-shot classification, embeddings
  convert.py     the release's DeepSpeed shards, Hugging Face BERT, warm starts
"""

from cpm_jax.convert.common import Format
from cpm_jax.models.family import Family
from cpm_jax.models.plug import convert
from cpm_jax.models.plug.data import ClassificationData, Noise, PalmData, Seq2SeqData, StructBertData
from cpm_jax.models.plug.decode import (QUANTIZED, LongText, cache_logical_axes, decode_layout, generate,
                                       generate_long, init_cache, prefill, step_fn, stream, stream_long)
from cpm_jax.models.plug.evaluation import language_model
from cpm_jax.models.plug.fewshot_inputs import ClsFormat, FewShotData, PromptFormat, TextMasking, UniMCFormat
from cpm_jax.models.plug.model import (ClassifierModel, FewShotModel, PlugConfig, Seq2SeqModel, StructBertModel,
                                       cached_decode, classification_logits, decode, decoder_logits, embed, encode,
                                       mlm_logits, param_specs, pooled, relation_logits)
from cpm_jax.tokenization import BertTokenizer

FAMILY = Family(
    name="plug",
    config_class=PlugConfig,
    param_specs=param_specs,
    training_models=(StructBertModel, Seq2SeqModel, ClassifierModel, FewShotModel),
    data=(StructBertData, PalmData, Seq2SeqData, ClassificationData, FewShotData),
    tokenizer=BertTokenizer,
    language_model=language_model,
    formats={
        "hf": Format(load=convert.load_hf_bert, load_options=("trust_pickle",), needs_config=True),
        "megatron": Format(load=convert.load_deepspeed, save=convert.save_deepspeed,
                           load_options=("tag", "trust_pickle"), save_options=("num_ranks", "tag")),
    },
    quantized=QUANTIZED,
)
init = FAMILY.init
abstract_params = FAMILY.abstract_params
logical_axes = FAMILY.logical_axes

__all__ = ["ClassificationData", "ClassifierModel", "ClsFormat", "FAMILY", "FewShotData", "FewShotModel", "LongText",
           "Noise", "PalmData", "PlugConfig", "PromptFormat", "QUANTIZED", "Seq2SeqData", "Seq2SeqModel",
           "StructBertData", "StructBertModel", "TextMasking", "UniMCFormat", "abstract_params", "cache_logical_axes",
           "cached_decode", "classification_logits", "decode", "decode_layout", "decoder_logits", "embed", "encode",
           "generate", "generate_long", "init", "init_cache", "language_model", "logical_axes", "mlm_logits",
           "param_specs", "pooled", "prefill", "relation_logits", "step_fn", "stream", "stream_long"]
