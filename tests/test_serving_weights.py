"""Serving weights (bfloat16, int8 weight-only per output channel) and the host-side stop criteria: int8 decoding
computes what its dequantised weights compute, for CPM and PLUG's decoder. (The converter's int8 checkpoints and
generate.py's streaming and stopping: tests/test_evaluation.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import decoding, serving_weights
from cpm_jax.models import cpm, plug

CONFIG = cpm.CPMConfig(vocab_size=2048, num_layers=2, embed_dim=64, num_heads=4, max_positions=32, dropout_rate=0.0)


def test_int8_is_per_output_channel_and_decodes_what_its_dequantised_weights_compute():
  params = cpm.init(CONFIG, jax.random.key(1))
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
  for weights, ratio in (("bfloat16", 0.5), ("int8", 0.28)):  # int8: + a float32 scale per row of 64
    served = serving_weights.for_decoding(decode_params, weights, cpm.QUANTIZED)
    assert serving_weights.weight_bytes(served.tree) <= ratio * serving_weights.weight_bytes(decode_params.tree)
    reference = forward(serving_weights.round_trip(params, weights, cpm.QUANTIZED), tokens, CONFIG)
    np.testing.assert_allclose(cached_logits(served), reference, atol=2e-5, rtol=1e-4)
    assert np.abs(reference - forward(params, tokens, CONFIG)).max() > 1e-4  # the weights did change


def test_plug_decoder_in_int8():
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
  np.testing.assert_allclose(decoder_logits(served), decoder_logits(reference), atol=1e-5, rtol=1e-4)


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
