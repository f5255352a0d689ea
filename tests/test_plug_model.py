"""PLUG model: released parameter count, parity with transformers' BERT and with a torch reference of PLUG."""

import contextlib
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from cpm_jax import layers, partitioning
from cpm_jax.models.plug import convert as convert_plug
from cpm_jax.convert.common import ConversionError
from cpm_jax.models import plug
from _params_helpers import randomised

GIN_MODELS = pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / "models"
encode = jax.jit(plug.encode, static_argnames="config")
decode = jax.jit(plug.decode, static_argnames="config")
TEXTS = ["中国的首都是北京，人口超过两千万。", "PLUG模型由StructBERT编码器和PALM解码器组成，共有270亿参数。"]


def config_from_gin(name: str, **overrides) -> plug.PlugConfig:
  gin.clear_config()
  try:
    gin.parse_config_file(str(GIN_MODELS / name))
    return plug.PlugConfig(**overrides)
  finally:
    gin.clear_config()


def tiny(**overrides) -> plug.PlugConfig:
  return config_from_gin("plug_tiny.gin", **overrides)


def test_plug_27b_parameter_count_matches_release():
  config = config_from_gin("plug_27b.gin")
  # Independently from FORMATS.md: the release's tensors (tied decoder weight counted once).
  v, h, f, pos, types = 21504, 8192, 32768, 2048, 3
  linear = lambda i, o: i * o + o
  embeddings = v * h + pos * h + types * h + 2 * h
  encoder_layer = 2 * 2 * h + linear(h, 3 * h) + linear(h, h) + linear(h, f) + linear(f, h)
  decoder_layer = (3 * 2 * h + linear(h, 3 * h) + linear(h, h) + linear(h, h) + linear(h, 2 * h)
                   + linear(h, h) + linear(h, f) + linear(f, h))
  heads = linear(h, h) + 2 * h + v + linear(h, h) + linear(h, 3)  # MLM transform + LN + bias, pooler, relation
  expected = embeddings + 24 * encoder_layer + 2 * h + 6 * decoder_layer + 2 * h + heads
  assert expected == 26_100_601_859
  assert layers.count_params(plug.abstract_params(config)) == expected


def test_every_gin_model_config_builds():
  for name in ("plug_27b.gin", "structbert_large.gin", "palm_base.gin", "plug_tiny.gin"):
    assert layers.count_params(plug.abstract_params(config_from_gin(name))) > 0
  large = config_from_gin("structbert_large.gin")
  assert (large.num_encoder_layers, large.embed_dim, large.num_heads, large.encoder_pre_ln) == (24, 1024, 16, False)


def _perturb(model: torch.nn.Module, seed: int) -> None:
  """Random LayerNorm scales and biases too (HF inits them to 1 / 0, which would hide mistakes)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_post_ln_encoder_and_mlm_head_match_transformers_bert(plug_vocab_path):
  hf_config = transformers.BertConfig(vocab_size=21128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      intermediate_size=128, max_position_embeddings=128, type_vocab_size=2,
                                      attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(hf_config).eval()
  _perturb(model, 1)
  tokenizer = transformers.BertTokenizer(vocab_file=str(plug_vocab_path))
  batch = tokenizer([TEXTS[0], TEXTS[0]], [TEXTS[1], "天气很好"], padding=True, return_tensors="pt")
  with torch.no_grad():
    out = model(**batch, output_hidden_states=True)

  config = plug.PlugConfig(vocab_size=21128, num_encoder_layers=2, num_decoder_layers=0, embed_dim=64, num_heads=8,
                           mlp_dim=128, max_positions=128, type_vocab_size=2, encoder_pre_ln=False, num_relations=0,
                           layer_norm_eps=1e-12)
  params, notes = convert_plug.params_from_hf_state(model.state_dict(), config)
  assert notes == []
  mask = batch["attention_mask"].numpy().astype(bool)
  assert not mask.all()  # the second row is padded
  hidden = encode(params, jnp.asarray(batch["input_ids"].numpy()), config,
                       token_types=jnp.asarray(batch["token_type_ids"].numpy()),
                       segment_ids=jnp.asarray(mask.astype(np.int32)))
  logits = plug.mlm_logits(params, hidden, config)
  np.testing.assert_allclose(np.asarray(hidden)[mask], out.hidden_states[-1].numpy()[mask], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits)[mask], out.logits.numpy()[mask], atol=1e-4, rtol=1e-4)


def test_hf_bert_model_without_mlm_head_initialises_heads():
  hf_config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32)
  config = plug.PlugConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=0, embed_dim=16, num_heads=2,
                           mlp_dim=32, max_positions=32, type_vocab_size=2, encoder_pre_ln=False, num_classes=5,
                           num_relations=0)
  state = transformers.BertModel(hf_config).state_dict()
  params, notes = convert_plug.params_from_hf_state(state, config)
  assert notes == ["initialised classifier from the config (not in the checkpoint)",
                   "initialised mlm from the config (not in the checkpoint)"]  # BertModel has a pooler
  np.testing.assert_array_equal(params["pooler"]["kernel"], state["pooler.dense.weight"].numpy().T)
  assert params["classifier"]["kernel"].shape == (16, 5)
  with pytest.raises(ConversionError, match="post-LN"):
    convert_plug.params_from_hf_state(state, tiny())
  del state["encoder.layer.0.attention.self.key.bias"]
  with pytest.raises(ConversionError, match="attention.self.key.bias"):
    convert_plug.params_from_hf_state(state, config)


# ---- torch reference of PLUG, written from FORMATS.md over the release's key names ----------------

def _reference(state: dict, config: plug.PlugConfig, src, types, src_mask, tgt):
  s = {k: torch.tensor(np.asarray(v)) for k, v in state.items()}
  h, d = config.embed_dim, config.head_dim
  norm = lambda x, key: F.layer_norm(x, (h,), s[key + ".weight"], s[key + ".bias"], config.layer_norm_eps)
  linear = lambda x, key: F.linear(x, s[key + ".weight"], s[key + ".bias"])

  def attend(q, k, v, visible):
    split = lambda x: x.reshape(*x.shape[:2], -1, d).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / d ** 0.5 + (~visible) * -10000.0
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)

  def embed(ids, token_types):
    e = "bert.embeddings."
    x = s[e + "word_embeddings.weight"][ids] + s[e + "position_embeddings.weight"][torch.arange(ids.shape[1])]
    return norm(x + s[e + "token_type_embeddings.weight"][token_types], e + "LayerNorm")

  x = embed(src, types)
  pad = src_mask[:, None, None, :]
  for n in range(config.num_encoder_layers):
    p = f"bert.encoder.layer.{n}."
    q, k, v = linear(norm(x, p + "attention.LayerNorm"), p + "attention.self.query_key_value").chunk(3, -1)
    x = x + linear(attend(q, k, v, pad), p + "attention.output.dense")
    x = x + linear(F.gelu(linear(norm(x, p + "LayerNorm"), p + "intermediate.dense")), p + "output.dense")
  enc = norm(x, "bert.encoder.LayerNorm")
  t = norm(F.gelu(linear(enc, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
  mlm = t @ s["cls.predictions.decoder_weight"].T + s["cls.predictions.bias"]
  relation = linear(torch.tanh(linear(enc[:, 0], "bert.pooler.dense")), "cls.seq_relationship")

  y = embed(tgt, torch.zeros_like(tgt))
  causal = torch.tril(torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool))
  for n in range(config.num_decoder_layers):
    p = f"decoder.decoder.layer.{n}."
    q, k, v = linear(norm(y, p + "input_layernorm"), p + "attention.query_key_value").chunk(3, -1)
    y = y + linear(attend(q, k, v, causal), p + "attention.dense")
    q = linear(norm(y, p + "post_attention_layernorm"), p + "cross_attention.query")
    k, v = linear(enc, p + "cross_attention.key_value").chunk(2, -1)
    y = y + linear(attend(q, k, v, pad), p + "cross_attention.dense")
    y = y + linear(F.gelu(linear(norm(y, p + "post_cross_attention_layernorm"), p + "intermediate")), p + "output")
  y = norm(y, "decoder.decoder.final_layernorm")
  return enc, mlm, relation, y @ s["bert.embeddings.word_embeddings.weight"].T


def _randomised(config, seed):
  """Random values for every param, LayerNorm scales and biases included."""
  return randomised(plug.abstract_params(config), seed)


def test_pre_ln_encoder_decoder_match_torch_reference_of_release():
  config = tiny(dropout_rate=0.0)
  params = _randomised(config, 0)
  state = convert_plug.state_from_params(params, config)
  rng = np.random.default_rng(0)
  src = rng.integers(106, 21128, (2, 12))
  types = (np.arange(12) >= 7).astype(np.int64)[None].repeat(2, 0)
  src_mask = np.ones((2, 12), bool)
  src_mask[1, 9:] = False
  tgt = rng.integers(106, 21128, (2, 7))
  enc, mlm, relation, dec = _reference(state, config, torch.from_numpy(src), torch.from_numpy(types),
                                       torch.from_numpy(src_mask), torch.from_numpy(tgt))

  segments = jnp.asarray(src_mask.astype(np.int32))
  hidden = encode(params, jnp.asarray(src), config, token_types=jnp.asarray(types), segment_ids=segments)
  dec_hidden = decode(params, jnp.asarray(tgt), config, encoder_hidden=hidden, encoder_segment_ids=segments)
  tol = dict(atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(np.asarray(hidden)[src_mask], enc.numpy()[src_mask], **tol)
  np.testing.assert_allclose(np.asarray(plug.mlm_logits(params, hidden, config))[src_mask], mlm.numpy()[src_mask],
                             **tol)
  np.testing.assert_allclose(plug.relation_logits(params, hidden, config), relation.numpy(), **tol)
  np.testing.assert_allclose(plug.decoder_logits(params, dec_hidden, config), dec.numpy(), **tol)


@pytest.mark.parametrize("mesh_sizes", [None, dict(data=2, fsdp=1, tensor=4)])
def test_cached_decoding_matches_full_decoder_pass(mesh_sizes):
  """Per-layer cached decoding (prefill of 2 tokens, then generation's step_fn one token at a time) gives the
  full decoder pass's logits at every step, on one device and with heads split over `tensor`."""
  config = tiny(dropout_rate=0.0)
  params = _randomised(config, 3)
  src = jax.random.randint(jax.random.key(0), (2, 9), 106, 21128)
  segments = jnp.array([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
  tgt = jax.random.randint(jax.random.key(1), (2, 5), 106, 21128)
  hidden = encode(params, src, config, segment_ids=segments)
  full = decode(params, tgt, config, encoder_hidden=hidden, encoder_segment_ids=segments)
  full = plug.decoder_logits(params, full, config)

  @jax.jit
  def cached(params, hidden):
    cache = plug.init_cache(params, config, hidden, segments, length=8)
    cache = jax.tree.map(partitioning.constrain, cache, plug.cache_logical_axes(config),
                         is_leaf=partitioning.is_logical_axes)
    prefix, cache = plug.cached_decode(params, tgt[:, :2], config, cache)
    steps = [plug.decoder_logits(params.tree, prefix, config)]
    for t in range(2, 5):
      logits, cache = plug.step_fn(config)(params, tgt[:, t:t + 1], cache)
      steps.append(logits)
    return jnp.concatenate(steps, 1), cache

  context = contextlib.nullcontext()
  if mesh_sizes:
    mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes))
    params = jax.device_put(params, partitioning.tree_shardings(plug.logical_axes(config), mesh, params))
    context = partitioning.activate(mesh)
  with context:
    logits, cache = cached(plug.decode_layout(params), hidden)
  np.testing.assert_allclose(logits, full, atol=2e-5, rtol=1e-4)
  assert int(cache["index"]) == 5
  # One array per layer, [batch * heads] rows: self-attention K/V for 8 slots, cross-attention K/V over the 9 source
  # tokens ([rows, length, head_dim]).
  assert len(cache["k"]) == len(cache["cross_v"]) == config.num_decoder_layers
  assert cache["k"][1].shape == (2 * 8, 8, 8) and cache["v"][1].shape == (2 * 8, 8, 8)
  assert cache["cross_k"][1].shape == (2 * 8, 9, 8) and cache["cross_v"][1].shape == (2 * 8, 9, 8)
  if mesh_sizes:
    assert cache["k"][1].sharding.spec[0] == ("data", "tensor")
    assert cache["cross_v"][1].sharding.spec[0] == ("data", "tensor")


def test_unrolled_layers_with_remat_match_scan():
  config = tiny(dropout_rate=0.0)
  params = _randomised(config, 4)
  src = jax.random.randint(jax.random.key(0), (2, 6), 106, 21128)
  unrolled = tiny(dropout_rate=0.0, scan_layers=False, remat_policy="full")
  hidden = encode(params, src, config)
  np.testing.assert_allclose(encode(params, src, unrolled), hidden, atol=1e-5)
  np.testing.assert_allclose(decode(params, src, unrolled, encoder_hidden=hidden),
                             decode(params, src, config, encoder_hidden=hidden), atol=1e-5)


def test_bad_configs_and_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    plug.PlugConfig(embed_dim=10, num_heads=3)
  encoder_only = tiny(num_decoder_layers=0)
  with pytest.raises(ValueError, match="no decoder"):
    plug.decode({}, jnp.zeros((1, 2), jnp.int32), encoder_only, encoder_hidden=jnp.zeros((1, 2, 64)))
