"""Data: TFDS builders for the demo and user corpora (array_record, no TensorFlow) and the Grain LM pipeline.

  sources.load_split(name, split, data_dir)        a split as a random-access source (demo datasets built on demand)
  sources.load_examples(name, split, data_dir)     a split's examples with str text (review_sentiment: + label)
  sources.build_demo_dataset / build_text_corpus   build peoples_daily_1998, review_sentiment, text_corpus/<name>
  pipeline.make_lm_iterator(source, tokenizer, ...) packed training batches of this process, checkpointable
  pipeline.make_eval_iterator(source, tokenizer, ...) one pass of packed batches for evaluation
  pipeline.non_pad_fraction(batches)                packing efficiency
  processes.process_share / process_examples / process_rows  each process's share (every family's pipelines)
  splits.SplitData                                  the fields every family's data class has (dataset, splits, ...)
  jsonl.read_examples(path, required)               a CLUE-style jsonl file's examples
"""

from cpm_jax.data.pipeline import make_eval_iterator, make_lm_iterator, non_pad_fraction
from cpm_jax.data.sources import build_demo_dataset, build_text_corpus, load_examples, load_split

__all__ = ["build_demo_dataset", "build_text_corpus", "load_examples", "load_split", "make_eval_iterator",
           "make_lm_iterator", "non_pad_fraction"]
