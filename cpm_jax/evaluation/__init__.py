"""Evaluation: scoring primitives, CPM-1's zero/few-shot task protocols (gin-configured), PLUG's tasks, metrics.

  scoring.continuation_log_likelihood / score_requests   log p(continuation | context) over batches
  interface.LanguageModel                                what tasks use: tokenizer, score, generate, classify
  model.load_checkpoint / load_tokenizer / language_model  either family's checkpoint behind that interface
  plug_model.plug_language_model                         PLUG: decoder generation, [CLS]-head classification
  tasks.LabelPromptTask / MultipleChoiceTask / GenerationTask / LMScoreTask / ClassificationTask,
  configured_task (gin)
  metrics.corpus_bleu / rouge_l / distinct / exact_match / f1
  report.write_result / write_jsonl / table
"""
