"""Zero/few-shot evaluation: scoring primitives, CPM-1's task protocols (gin-configured), metrics.

  scoring.continuation_log_likelihood / score_requests   log p(continuation | context) over batches
  model.cpm_language_model / load_cpm                    a CPM checkpoint behind the LanguageModel interface
  tasks.LabelPromptTask / MultipleChoiceTask / GenerationTask / LMScoreTask, configured_task (gin)
  metrics.corpus_bleu / rouge_l / distinct / exact_match / f1
  report.write_result / write_jsonl / table
"""
