"""Serving weights (bfloat16, int8 weight-only per output channel, w8a8) and the host-side stop criteria: int8 decoding
computes what its dequantised weights compute, for CPM and PLUG's decoder. (The converter's int8 checkpoints and
generate.py's streaming and stopping: tests/test_evaluation.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import decoding, layers, serving_weights
from cpm_jax.models import cpm, plug

CONFIG = cpm.CPMConfig(vocab_size=2048, num_layers=2, embed_dim=64, num_heads=4, max_positions=32, dropout_rate=0.0)


def test_int8_is_per_output_channel_and_decodes_what_its_dequantised_weights_compute():
  params = cpm.init(CONFIG, jax.random.key(1))
  weight = params["blocks"]["mlp"]["in_kernel"]  # [layers, embed (in), mlp (out)]
  q, scale = layers.quantize_int8(weight, (1,))
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
  for weights, ratio in (("bfloat16", 0.5), ("int8", 0.28)):  # int8: + a float32 scale per row of 64
    served = serving_weights.for_decoding(decode_params, weights, cpm.QUANTIZED)
    assert serving_weights.weight_bytes(served.tree) <= ratio * serving_weights.weight_bytes(decode_params.tree)
    reference = forward(serving_weights.round_trip(params, weights, cpm.QUANTIZED), tokens, CONFIG)
    np.testing.assert_allclose(cached_logits(served), reference, atol=2e-5, rtol=1e-4)
    assert np.abs(reference - forward(params, tokens, CONFIG)).max() > 1e-4  # the weights did change


def test_plug_decoder_in_int8_and_w8a8():
  config = plug.PlugConfig(vocab_size=256, num_encoder_layers=1, num_decoder_layers=2, embed_dim=32, num_heads=4,
                           mlp_dim=64, max_positions=32, num_relations=0, dropout_rate=0.0)
  params = plug.init(config, jax.random.key(0))
  sources, segment_ids = jnp.array([[101, 120, 121, 122, 102]]), jnp.ones((1, 5), jnp.int32)

  @jax.jit
  def decoder_logits(decode_params):  # the encoder, the cross-attention K/V and three decoder tokens
    cache, _ = plug.prefill(decode_params, sources, segment_ids, config, 3, cls_id=101)
    hidden, _ = plug.cached_decode(decode_params, jnp.array([[101, 130, 131]]), config, cache)
    return plug.decoder_logits(decode_params.tree, hidden, config)

  served = serving_weights.for_decoding(plug.decode_layout(params), "int8", plug.QUANTIZED)
  assert served.tree["decoder"]["blocks"][0]["cross_attn"]["qkv_weight"].dtype == jnp.int8
  reference = plug.decode_layout(serving_weights.round_trip(params, "int8", plug.QUANTIZED))
  int8 = np.asarray(decoder_logits(served))
  np.testing.assert_allclose(int8, decoder_logits(reference), atol=1e-5, rtol=1e-4)
  w8a8 = serving_weights.for_decoding(plug.decode_layout(params), "w8a8", plug.QUANTIZED)
  assert w8a8.layout is layers.Layout.DECODE_W8A8
  w8a8_logits = np.asarray(decoder_logits(w8a8))
  assert 1e-5 < np.abs(w8a8_logits - int8).max() / np.abs(int8).max() < 0.05  # activations quantised, no more


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


def test_w8a8_product_is_the_integer_product_of_per_row_quantised_activations():
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((3, 48)).astype(np.float32), rng.standard_normal((20, 48)).astype(np.float32)
  q, w_scale = layers.quantize_int8(jnp.asarray(w), (1,))
  out = np.asarray(layers.int8_product(jnp.asarray(x), q, w_scale[:, 0]))
  # From scratch: x rows scaled by max |x| / 127, rounded, the integer dot, both scales.
  x_scale = np.abs(x).max(1, keepdims=True) / 127
  x_int = np.clip(np.round(x / x_scale), -127, 127).astype(np.int64)
  expected = (x_int @ np.asarray(q, np.int64).T) * x_scale * np.asarray(w_scale)[:, 0]
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  assert np.abs(out - x @ w.T).max() < 0.05 * np.abs(x @ w.T).max()  # close to the float product, not equal
  assert np.abs(out - x @ (np.asarray(q) * np.asarray(w_scale)).T).max() > 1e-4  # the activations were quantised
  one = layers.int8_product(jnp.asarray(x[1:2]), q, w_scale[:, 0])  # one row: duplicated for the int8 kernel
  assert one.shape == (1, 20)
  np.testing.assert_array_equal(one, out[1:2])


def test_w8a8_decodes_near_int8_and_scores_through_the_decode_path():
  params = cpm.init(CONFIG, jax.random.key(1))
  tokens = np.array([[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 5, 5, 5]])
  positions = np.tile(np.arange(8), (2, 1))
  segment_ids = np.array([[1] * 8, [1] * 5 + [0] * 3])
  logits = jax.jit(lambda served: cpm.served_logits(served, tokens, CONFIG, positions=positions,
                                                    segment_ids=segment_ids))
  decode_params = cpm.decode_layout(params)
  served = {w: serving_weights.for_decoding(decode_params, w, cpm.QUANTIZED) for w in ("int8", "w8a8")}
  assert served["w8a8"].layout is layers.Layout.DECODE_W8A8
  assert serving_weights.weight_bytes(served["w8a8"].tree) == serving_weights.weight_bytes(served["int8"].tree)
  w8a8, int8 = np.asarray(logits(served["w8a8"])), np.asarray(logits(served["int8"]))
  valid = segment_ids.astype(bool)
  assert 1e-4 < np.abs(w8a8 - int8)[valid].max() < 0.05 * np.abs(int8[valid]).max()
  # The decode path as a scorer: with float32 weights it is the training-layout forward pass.
  np.testing.assert_allclose(np.asarray(logits(decode_params))[valid],
                             np.asarray(cpm.forward(params, tokens, CONFIG, positions=positions,
                                                    segment_ids=segment_ids))[valid], atol=2e-5, rtol=1e-4)
  # Greedy decoding in w8a8 picks, token by token, the argmax of the (causal) decode path over what came before.
  greedy = decoding.SamplingConfig(max_new_tokens=5, greedy=True)
  generated = list(cpm.generate(served["w8a8"], [[11, 12, 13]], CONFIG, greedy, eod_id=-1, pad_id=5)[0])
  row = np.array([[11, 12, 13, *generated]])
  whole = cpm.served_logits(served["w8a8"], row, CONFIG, positions=positions[:1], segment_ids=np.ones_like(row))
  assert list(np.argmax(whole[0, 2:-1], -1)) == generated
  with pytest.raises(ValueError, match="'w8a8' quantises activations"):
    serving_weights.round_trip(params, "w8a8", cpm.QUANTIZED)

