"""Serving weights of a trained CPM (bfloat16, int8 weight-only, w8a8) against its float32 weights: bytes,
perplexity on held-out text and batch-1 decode speed, with transformers' GPT2LMHeadModel on the same float32 weights
beside.

Perplexity is scored on People's Daily's validation split (held out from training), in the training rows, through
the served decode path itself (`cpm.served_logits`: each row prefilled into an empty cache with the served weights:
int8 dense layers and tied head, activations float32, or int8 too for w8a8), and also by
`serving_weights.round_trip` in the training layout (what evaluate.py --weights scores int8 with; w8a8 has no
round trip, evaluate.py scores it through the decode path). Speed: greedy 64 tokens after a 32-token prompt, batch
1, every variant timed in turn in each round (best of --repeats).

  .venv/bin/python benchmarks/serving_quality.py --checkpoint=workdir/demo/cpm --data_dir=workdir/demo/tfds
"""

from __future__ import annotations

import math
import os
import tempfile

from absl import app, flags

from benchmark_timing import best_times

flags.DEFINE_string("checkpoint", "workdir/demo/cpm", "A trained CPM (scripts/demo.sh trains one).")
flags.DEFINE_string("data_dir", "workdir/demo/tfds", "TFDS data_dir holding peoples_daily_1998.")
flags.DEFINE_integer("eval_documents", 400, "Validation documents scored.")
flags.DEFINE_integer("repeats", 5, "Timed rounds.")
FLAGS = flags.FLAGS
WEIGHTS = ("float32", "bfloat16", "int8", "w8a8")


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  import transformers

  from cpm_jax import decoding, serving_weights
  from cpm_jax.evaluation import model as model_lib
  from cpm_jax.models import cpm

  torch.set_num_threads(os.cpu_count())
  checkpoint = model_lib.load_checkpoint(FLAGS.checkpoint)
  config, params = checkpoint.config, checkpoint.params
  data = cpm.LMData(tokenizer_path=checkpoint.metadata["tokenizer"], data_dir=os.path.abspath(FLAGS.data_dir),
                    seq_len=config.max_positions // 2, global_batch_size=8, eval_max_documents=FLAGS.eval_documents)
  batches = list(data.eval_batches())
  decode_params = cpm.decode_layout(params)
  served = {w: serving_weights.for_decoding(decode_params, w, cpm.QUANTIZED) for w in WEIGHTS}

  served_logits = jax.jit(lambda params, batch: cpm.served_logits(
      params, batch["inputs"], config, positions=batch["positions"], segment_ids=batch["segment_ids"]))

  forward = jax.jit(lambda params, batch: cpm.forward(params, batch["inputs"], config, positions=batch["positions"],
                                                      segment_ids=batch["segment_ids"]))

  def perplexity(logits_fn) -> float:
    total = count = 0.0
    for batch in batches:
      logits = np.asarray(logits_fn(batch), np.float64)
      logits -= logits.max(-1, keepdims=True)
      logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
      total, count = total + float((nll * batch["weights"]).sum()), count + float(batch["weights"].sum())
    return math.exp(total / count)

  reference = perplexity(lambda b: forward(params, b))  # float32, the training layout
  tokens = int(sum(b["weights"].sum() for b in batches))
  print(f"{FLAGS.checkpoint}: {config.num_layers} layers x {config.embed_dim}, vocab {config.vocab_size}; "
        f"{tokens} held-out tokens of peoples_daily_1998 validation; load average {os.getloadavg()[0]:.1f}")
  print(f"{'weights':9s} {'MB':>7s} {'ppl (served decode path)':>25s} {'ppl (round trip)':>17s} {'vs float32':>11s}")
  for w in WEIGHTS:
    served_ppl = perplexity(lambda b, w=w: served_logits(served[w], b))
    trip_ppl = "n/a"
    if w in serving_weights.ROUND_TRIPS:
      trip = serving_weights.round_trip(params, w, cpm.QUANTIZED)
      trip_ppl = f"{perplexity(lambda b, trip=trip: forward(trip, b)):.3f}"
    print(f"{w:9s} {serving_weights.weight_bytes(served[w].tree) / 1e6:7.1f} {served_ppl:25.3f} {trip_ppl:>17s} "
          f"{100 * (served_ppl / reference - 1):+10.2f}%")

  with tempfile.TemporaryDirectory() as hf_dir:
    hf = transformers.GPT2LMHeadModel.from_pretrained(cpm.hf.save_hf(params, config, f"{hf_dir}/hf")).eval()
  prompt = np.random.default_rng(0).integers(10, config.vocab_size, (1, 32))
  greedy = decoding.SamplingConfig(max_new_tokens=64, greedy=True)
  inputs = torch.from_numpy(prompt)

  def transformers_generate():
    with torch.inference_mode():
      hf.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=64,
                  min_new_tokens=64, pad_token_id=0)

  times = best_times([*(lambda w=w: cpm.generate(served[w], prompt.tolist(), config, greedy, eod_id=-1, pad_id=5)
                        for w in WEIGHTS), transformers_generate], FLAGS.repeats)
  ours, theirs = dict(zip(WEIGHTS, times)), times[-1]
  print("batch 1, 64 greedy tokens: " + ", ".join(f"{w} {64 / t:.1f} tokens/s ({ours['float32'] / t:.2f}x float32)"
                                                 for w, t in ours.items())
        + f"; transformers (float32) {64 / theirs:.1f} tokens/s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
