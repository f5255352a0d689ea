r"""PLUG NLU on review_sentiment: a tiny classifier from the stage-1 (StructBERT) encoder vs from scratch vs the
majority class, all measured in this run on the validation split.

  python benchmarks/plug_review_sentiment.py --vocab=../shared/vocab/plug/vocab.txt --workdir=/tmp/plug_nlu

Stage 1 runs through the train loop with gin_configs/experiments/plug_stage1_demo.gin; the classifiers train
with the same optimizer for --finetune_steps on ClassificationData (plug_classify_demo.gin's settings).
"""

from __future__ import annotations

import dataclasses
import os

import gin
import numpy as np
from absl import app, flags

from cpm_jax import checkpointing, gin_setup, logging_setup, partitioning, train_loop, training
from cpm_jax.models.plug import data as plug_pipeline
from cpm_jax.models import plug

_VOCAB = flags.DEFINE_string("vocab", "../shared/vocab/plug/vocab.txt", "BERT-Chinese vocab.txt.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (stage-1 checkpoints).", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir for the demo datasets.")
_STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", 300, "StructBERT pre-training steps.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 300, "Classification fine-tuning steps.")
_LR = flags.DEFINE_float("finetune_lr", 5e-4, "Peak fine-tuning learning rate.")


def stage1(workdir: str) -> plug.PlugConfig:
  gin.clear_config()
  gin_setup.parse(["experiments/plug_stage1_demo.gin"], [
      f'StructBertData.vocab_path = "{_VOCAB.value}"', f'StructBertData.data_dir = "{_DATA_DIR.value}"',
      f"train.num_steps = {_STAGE1_STEPS.value}", f"learning_rate_schedule.total_steps = {_STAGE1_STEPS.value}"])
  metrics = train_loop.train(workdir)
  config = plug.PlugConfig()
  gin.clear_config()
  print(f"stage 1: validation MLM+relation loss {metrics['validation_loss']:.3f} after {_STAGE1_STEPS.value} steps")
  return config


def accuracy(config: plug.PlugConfig, data: plug_pipeline.ClassificationData, pretrained: str | None) -> float:
  """Validation accuracy after fine-tuning from scratch, or warm-started from the stage-1 workdir `pretrained`."""
  model = plug.ClassifierModel(dataclasses.replace(config, num_classes=2))
  mesh = partitioning.make_mesh()
  optimizer = training.make_optimizer(training.learning_rate_schedule(_LR.value, _FINETUNE_STEPS.value // 10,
                                                                      _FINETUNE_STEPS.value))
  steps = training.make_sharded_steps(model, optimizer, mesh)
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  if pretrained is not None:
    warm = checkpointing.RestoreCheckpointConfig(path=pretrained, fallback_to_init=True)
    state = state.replace(params=checkpointing.warm_start(warm, state.params).params)
  batches = data.train_iterator(seed=0)
  for _ in range(_FINETUNE_STEPS.value):
    state, _ = steps.train(state, training.global_batch(next(batches), mesh))
  correct = total = 0.0
  for batch in data.eval_batches():
    sums = steps.evaluate(state.params, training.global_batch(batch, mesh))
    correct += float(sums["correct_sum"])
    total += float(sums["weight_sum"])
  return correct / total


def main(argv):
  del argv
  logging_setup.quiet_library_logs()
  pretrained = os.path.join(_WORKDIR.value, "stage1")
  config = stage1(pretrained)
  data = plug_pipeline.ClassificationData(vocab_path=_VOCAB.value, data_dir=_DATA_DIR.value, seq_len=128,
                                          global_batch_size=32)
  labels = np.concatenate([b["labels"][b["label_weights"] > 0] for b in data.eval_batches()])
  majority = max(np.mean(labels == 0), np.mean(labels == 1))
  from_stage1 = accuracy(config, data, pretrained)
  from_scratch = accuracy(config, data, None)
  print(f"review_sentiment validation ({len(labels)} reviews), {_FINETUNE_STEPS.value} fine-tuning steps:")
  print(f"  majority class        {majority:.4f}")
  print(f"  from scratch          {from_scratch:.4f}")
  print(f"  from stage 1          {from_stage1:.4f}  ({from_stage1 - majority:+.4f} vs majority)")


if __name__ == "__main__":
  app.run(main)
