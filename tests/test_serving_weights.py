"""Serving weights (bfloat16, int8 weight-only per output channel) and the host-side stop criteria: int8 decoding
computes what its dequantised weights compute, int8 checkpoints round-trip exactly through the converter, and
generate.py streams, stops and serves int8."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import checkpointing, decoding, serving_weights
from cpm_jax.evaluation import model as model_lib
from cpm_jax.models import cpm, plug, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = cpm.CPMConfig(vocab_size=30000, num_layers=2, embed_dim=32, num_heads=4, max_positions=64,
                       dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
  return jax.jit(cpm.init, static_argnums=0)(CONFIG, jax.random.key(1))


def test_int8_is_per_output_channel_and_decodes_what_its_dequantised_weights_compute(params):
  weight = params["blocks"]["mlp"]["in_kernel"]  # [layers, embed (in), mlp (out)]
  q, scale = serving_weights.quantize(weight, (1,))
  assert q.dtype == jnp.int8 and scale.shape == (CONFIG.num_layers, 1, CONFIG.ffn_dim)
  assert (jnp.abs(q).max(axis=1) == 127).all()  # every output channel uses its full range
  assert (jnp.abs(q * scale - weight) <= scale / 2 + 1e-9).all()

  decode_params = cpm.decode_layout(params)
  tokens = np.array([[11, 12, 13, 14, 15, 16, 17, 18]])

  @jax.jit
  def cached_logits(served):
    hidden, _ = cpm.cached_hidden_states(served, tokens, CONFIG, cpm.init_cache(CONFIG, 1, 8))
    return cpm.logits_from_hidden(served.tree, hidden, CONFIG, served.layout)

  forward = jax.jit(cpm.forward, static_argnums=2)
  for weights, ratio in (("bfloat16", 0.5), ("int8", 0.29)):  # int8: + a float32 scale per row of 32
    served = serving_weights.for_decoding(decode_params, weights, cpm.QUANTIZED)
    assert serving_weights.weight_bytes(served.tree) <= ratio * serving_weights.weight_bytes(decode_params.tree)
    reference = forward(serving_weights.round_trip(params, weights, cpm.QUANTIZED), tokens, CONFIG)
    np.testing.assert_allclose(cached_logits(served), reference, atol=2e-5, rtol=1e-4)
    assert np.abs(reference - forward(params, tokens, CONFIG)).max() > 1e-4  # the weights did change


def test_plug_decoder_in_int8():
  config = plug.PlugConfig(vocab_size=256, num_encoder_layers=1, num_decoder_layers=2, embed_dim=32, num_heads=4,
                           mlp_dim=64, max_positions=32, num_relations=0, dropout_rate=0.0)
  params = jax.tree.map(lambda x: x * 20, plug.init(config, jax.random.key(0)))
  greedy = decoding.SamplingConfig(max_new_tokens=6, greedy=True)
  sources = [[101, 120, 121, 122, 102], [101, 130, 102]]
  served = serving_weights.for_decoding(plug.decode_layout(params), "int8", plug.QUANTIZED)
  assert served.tree["decoder"]["blocks"][0]["cross_attn"]["qkv_weight"].dtype == jnp.int8
  reference = plug.decode_layout(serving_weights.round_trip(params, "int8", plug.QUANTIZED))
  options = dict(cls_id=101, sep_id=102, pad_id=0)
  assert plug.generate(served, sources, config, greedy, **options) == plug.generate(reference, sources, config, greedy,
                                                                                    **options)


def test_stop_criteria_and_text_streams():
  stop = decoding.StopCriteria(stop_strings=("END", "停"), max_sentences=2)
  assert stop.text_end("一。二") is None  # one sentence so far
  assert stop.text_end("一。“二！”") is None  # a closing mark may still come
  assert stop.text_end("一。“二！”三") == len("一。“二！”")
  assert stop.text_end("abcEND more") == len("abcEND")
  assert stop.text_end("一停。二。三") == len("一停")  # the first end wins
  with pytest.raises(ValueError, match="max_sentences=0"):
    decoding.StopCriteria(max_sentences=0)

  text = "今天天气很好。我们去公园。明天"
  decode = lambda ids: "".join(text[i] for i in ids)  # noqa: E731  (token i = character i)
  streams = decoding.TextStreams(2, decode, decoding.StopCriteria(max_sentences=1), eod_id=-1)
  pieces = [streams.add([i, i if i < 3 else -1]) for i in range(len(text))]
  assert streams.finished and streams.texts == ["今天天气很好。", "今天天"]
  assert "".join(p[0] for p in pieces) == streams.texts[0] and "".join(p[1] for p in pieces) == streams.texts[1]
  clock = iter(range(100))
  timed = decoding.TextStreams(1, decode, decoding.StopCriteria(max_seconds=3), eod_id=-1,
                               clock=lambda: next(clock))
  for i in range(3):
    timed.add([i])
  assert timed.finished and timed.texts == ["今天天"]


def run_program(name, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}  # this checkout's cpm_jax
  result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", name), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_int8_checkpoint_converts_once_then_generate_streams_and_stops(params, tmp_path, cpm_vocab_path):
  source = checkpointing.save_params(tmp_path / "float", params, registry.record(CONFIG, tokenizer=str(
      cpm_vocab_path)))
  run_program("convert_checkpoint.py", f"--input={source}", f"--output={tmp_path / 'int8'}", "--weights=int8")
  int8 = model_lib.load_checkpoint(tmp_path / "int8")
  assert int8.metadata["weights"] == "int8"
  size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
  assert size(tmp_path / "int8") < 0.35 * size(tmp_path / "float")
  # Read back as the dequantised floats: exactly the numbers int8 serving quantises again.
  expected = serving_weights.round_trip(params, "int8", cpm.QUANTIZED)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), int8.params, expected)

  prompts = ["今天天气很好，", "人工智能"]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts),
                                     encoding="utf-8")
  model = model_lib.language_model(int8, model_lib.load_tokenizer(int8), long_text=True,
                                   decoding_config=decoding.SamplingConfig(max_new_tokens=70, greedy=True))
  # On device to <eod> or 70 tokens (past the 64 positions: the sliding window), one prompt at a time.
  full = [model.generate_text([p])[0] for p in prompts]
  stop = next(c for c in full[0][len(full[0]) // 2:] if c.strip())  # a character the first text produces
  stdout = run_program("generate.py", f"--checkpoint={tmp_path / 'int8'}", f"--input_file={tmp_path / 'in.jsonl'}",
                       "--max_new_tokens=70", "--greedy", "--long_text", "--stream", f"--stop={stop}",
                       f"--output={tmp_path / 'out.jsonl'}")
  streamed = [json.loads(line)["generated"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert all(text in stdout for text in streamed)
  for text, whole in zip(streamed, full):
    assert text == (whole[:whole.index(stop) + 1] if stop in whole else whole)
  assert len(streamed[0]) < len(full[0])
