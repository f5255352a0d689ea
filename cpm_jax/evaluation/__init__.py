"""Evaluation: scoring primitives, zero/few-shot task protocols (gin-configured), metrics, reports.

  scoring.continuation_log_likelihood / score_requests   log p(continuation | context) over batches
  interface.LanguageModel                                what tasks use: tokenizer, score, generate, classify
  batching.ModelRunner / in_batches                      how adapters run a model: fixed-size batches, the mesh,
                                                         the decode layout made once
  model.load_checkpoint / load_tokenizer / language_model  any family's checkpoint behind its family's adapter
                                                         (cpm_jax/models/<family>/evaluation.py)
  tasks.LabelPromptTask / MultipleChoiceTask / GenerationTask / LMScoreTask / ClassificationTask,
  configured_task (gin)
  metrics.corpus_bleu / rouge_l / distinct / exact_match / f1
  report.write_result / write_jsonl / table
"""
