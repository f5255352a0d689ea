r"""The end of scripts/demo.sh: the sentiment table (untrained / pre-trained zero-shot / fine-tuned / majority
class), the labelled continuations, where everything was written and the commands to look at it.

  python scripts/demo_summary.py --workdir=workdir/demo --python=.venv/bin/python \
      --decoding_flags="--repetition_penalty=1.2 --no_repeat_ngram_size=3" --sampling_flags="--top_k=10"
"""

from __future__ import annotations

import collections
import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "The demo's $WORKDIR.")
_PYTHON = flags.DEFINE_string("python", ".venv/bin/python", "The interpreter the printed commands use.")
_DECODING_FLAGS = flags.DEFINE_string("decoding_flags", "", "generate.py flags the demo's two decodings shared.")
_SAMPLING_FLAGS = flags.DEFINE_string("sampling_flags", "", "generate.py flags of the demo's sampled decoding.")
_REQUIRED = flags.DEFINE_float("required_accuracy", 0.75, "What the fine-tuned model must reach to count as working.")

MODELS = (("untrained (random init)", "untrained"), ("pre-trained, zero-shot", "zero_shot"),
          ("fine-tuned", "fine_tuned"))


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def sentiment_table(work: str) -> tuple[list[str], float, float]:
  """The table's lines, the fine-tuned accuracy and the majority-class accuracy (of the scored reviews)."""
  results = {key: _read_json(os.path.join(work, "eval", f"{key}.json")) for _, key in MODELS}
  gold = collections.Counter(p["label"] for p in results["fine_tuned"]["predictions"])
  majority_label, count = gold.most_common(1)[0]
  majority = count / sum(gold.values())
  words = {"0": "差评", "1": "好评"}.get(majority_label, majority_label)
  rows = [(name, results[key]["metrics"]["accuracy"]) for name, key in MODELS]
  rows.append((f"majority class (always {words})", majority))
  lines = [f"Sentiment of {sum(gold.values())} review_sentiment test reviews (label prompt "
           "'{review}\\n总体评价：' + 好评 / 差评)", f"  {'model':<34}accuracy"]
  lines += [f"  {name:<34}{accuracy:8.3f}" for name, accuracy in rows]
  return lines, rows[2][1], majority


def continuations(work: str) -> tuple[list[str], str]:
  """The labelled continuations' lines and the first prompt."""
  lines = []
  for name, settings in (("greedy", "--greedy"), ("sampled", _SAMPLING_FLAGS.value)):
    lines.append(f"  {name} ({settings} {_DECODING_FLAGS.value}):")
    records = [json.loads(line) for line in open(os.path.join(work, "generate", f"{name}.jsonl"), encoding="utf-8")]
    for record in records:
      lines += [f"    prompt:       {record['prompt']}", f"    continuation: {record['generated']}"]
  return lines, records[0]["prompt"]


def main(argv):
  del argv
  work, py = _WORKDIR.value, _PYTHON.value
  table, fine_tuned, majority = sentiment_table(work)
  print("\n" + "\n".join(table))
  if fine_tuned >= _REQUIRED.value and fine_tuned > majority:
    print(f"The fine-tuned model works: {fine_tuned:.3f} against {majority:.3f} for always guessing the majority.")
  else:
    print(f"The fine-tuned model did NOT work well enough: {fine_tuned:.3f} (wanted >= {_REQUIRED.value:.2f}, and "
          f"above the majority class's {majority:.3f}); train it longer (experiments/cpm_sentiment_demo.gin).")
  lines, prompt = continuations(work)
  print("\nContinuations of the pre-trained model\n" + "\n".join(lines))
  tensorboard_dirs = ", ".join(os.path.join(work, run, "tensorboard") for run in ("cpm", "cpm_sentiment"))
  print(f"""
Written to {work}/:
  spm.model, tfds/             the SentencePiece vocab and the demo datasets (TFDS array_record)
  cpm/                         the pre-trained model: checkpoints/, config.gin, model.json, final_metrics.json
  cpm_sentiment/               the fine-tuned model, the same layout
  {tensorboard_dirs}
                               TensorBoard scalars: loss, learning rate, grad norm, tokens/s, MFU, validation perplexity
  eval/*.json                  metrics and per-review predictions; generate/*.jsonl the continuations
Look at them:
  tensorboard --logdir {work}
  {py} experiments/generate.py --checkpoint={work}/cpm --prompt={prompt} {_SAMPLING_FLAGS.value} \\
      {_DECODING_FLAGS.value}
  {py} experiments/evaluate.py --checkpoint={work}/cpm_sentiment --task=review_sentiment_prompt \\
      --data_dir={work}/tfds --limit=20 --print_predictions""")


if __name__ == "__main__":
  app.run(main)
