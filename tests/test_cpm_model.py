"""CPM-LM model: released sizes, packing, scan/remat/attention options, dtypes, dropout."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import layers
from cpm_jax.models import cpm

TINY = cpm.CPMConfig(vocab_size=96, num_layers=3, embed_dim=32, num_heads=4, max_positions=64, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
  return cpm.init(TINY, jax.random.key(0))


def _tokens(batch=2, length=24, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 8, TINY.vocab_size)


@pytest.mark.parametrize("layers_, embed, heads, expected", [
    (12, 768, 12, 108_882_432),     # published ~108.9M
    (24, 1024, 16, 334_080_000),    # published ~334.1M
    (32, 2560, 32, 2_597_073_920),  # exact released figure
])
def test_released_parameter_counts_from_abstract_shapes(layers_, embed, heads, expected):
  config = cpm.CPMConfig(num_layers=layers_, embed_dim=embed, num_heads=heads)
  abstract = cpm.abstract_params(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert layers.count_params(abstract) == expected


def test_gin_model_configs_match_released_sizes():
  import gin, pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / "models"
  for name, expected in [("cpm_small", 108_882_432), ("cpm_medium", 334_080_000), ("cpm_large", 2_597_073_920)]:
    gin.clear_config()
    gin.parse_config_file(str(root / f"{name}.gin"))
    assert layers.count_params(cpm.abstract_params(cpm.CPMConfig())) == expected, name
  gin.clear_config()


def test_init_statistics_follow_release():
  config = cpm.CPMConfig(vocab_size=512, num_layers=8, embed_dim=128, num_heads=4, max_positions=64)
  p = cpm.init(config, jax.random.key(0))
  np.testing.assert_allclose(np.std(p["embed"]["wte"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(p["blocks"]["mlp"]["in_kernel"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(p["blocks"]["mlp"]["out_kernel"]), 0.02 / np.sqrt(16), rtol=0.05)
  np.testing.assert_allclose(np.std(p["blocks"]["attn"]["out_kernel"]), 0.02 / np.sqrt(16), rtol=0.05)
  assert not np.allclose(p["blocks"]["mlp"]["in_kernel"][0], p["blocks"]["mlp"]["in_kernel"][1])
  assert np.all(p["blocks"]["ln_1"]["scale"] == 1) and np.all(p["blocks"]["attn"]["qkv_bias"] == 0)


def test_scan_and_unrolled_agree(params):
  tokens = _tokens()
  scanned = cpm.forward(params, tokens, TINY)
  unrolled = cpm.forward(params, tokens, cpm.CPMConfig(**{**TINY.__dict__, "scan_layers": False}))
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5)


def test_causal_prefix_is_unchanged_by_later_tokens(params):
  tokens = _tokens()
  full = cpm.forward(params, tokens, TINY)
  prefix = cpm.forward(params, tokens[:, :10], TINY)
  np.testing.assert_allclose(full[:, :10], prefix, atol=1e-5)


def test_packed_documents_do_not_see_each_other(params):
  doc_a, doc_b = _tokens(1, 10, seed=2), _tokens(1, 14, seed=3)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.array([[1] * 10 + [2] * 14])
  positions = jnp.array([list(range(10)) + list(range(14))])
  packed_logits = cpm.forward(params, packed, TINY, segment_ids=segment_ids, positions=positions)
  alone_a = cpm.forward(params, doc_a, TINY)
  alone_b = cpm.forward(params, doc_b, TINY)
  np.testing.assert_allclose(packed_logits[:, :10], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed_logits[:, 10:], alone_b, atol=1e-5)


def test_attention_implementations_agree(params):
  tokens = _tokens()
  segment_ids = jnp.array([[1] * 12 + [2] * 12, [1] * 20 + [0] * 4])
  positions = jnp.array([list(range(12)) * 2, list(range(24))])
  xla = cpm.forward(params, tokens, TINY, segment_ids=segment_ids, positions=positions)
  via_jax = cpm.forward(params, tokens, cpm.CPMConfig(**{**TINY.__dict__, "attention_impl": "jax"}),
                           segment_ids=segment_ids, positions=positions)
  np.testing.assert_allclose(xla, via_jax, atol=1e-5)


def _dropout_grads(params, remat_policy):
  batch = {"inputs": _tokens(), "targets": _tokens(seed=4), "weights": jnp.ones((2, 24))}
  model = cpm.CPMLanguageModel(cpm.CPMConfig(**{**TINY.__dict__, "remat_policy": remat_policy, "dropout_rate": 0.1}))
  return jax.grad(lambda p: model.loss(p, batch, jax.random.key(3))[0])(params)


@pytest.fixture(scope="module")
def grads_keeping_everything(params):
  return _dropout_grads(params, "none")


@pytest.mark.parametrize("policy", ["elementwise", "full", "dots", "dots_no_batch"])
def test_remat_keeps_gradients(params, grads_keeping_everything, policy):
  """Every policy gives the gradients of keeping everything ("none"), dropout masks included."""
  reference = grads_keeping_everything
  remat = _dropout_grads(params, policy)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32(params):
  tokens = _tokens()
  f32 = cpm.forward(params, tokens, TINY)
  bf16_config = cpm.CPMConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
  bf16 = cpm.forward(params, tokens, bf16_config)
  assert bf16.dtype == jnp.float32  # logits always float32 for the loss
  np.testing.assert_allclose(bf16, f32, atol=0.05)
  assert not np.allclose(bf16, f32, atol=1e-6)  # really computed in bfloat16


def test_dropout_only_with_rng():
  config = cpm.CPMConfig(**{**TINY.__dict__, "dropout_rate": 0.1})
  p = cpm.init(config, jax.random.key(0))
  tokens = _tokens()
  a = cpm.forward(p, tokens, config)
  b = cpm.forward(p, tokens, config)
  c = cpm.forward(p, tokens, config, dropout_rng=jax.random.key(1))
  d = cpm.forward(p, tokens, config, dropout_rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(c, d)
  assert np.abs(a - c).max() > 1e-3


def test_decode_layout_is_per_layer_with_out_major_weights(params):
  decode = cpm.decode_layout(params).tree
  assert len(decode["blocks"]) == TINY.num_layers and "qkv_kernel" not in decode["blocks"][1]["attn"]
  attn, mlp, stacked = decode["blocks"][1]["attn"], decode["blocks"][1]["mlp"], params["blocks"]
  # Each kernel becomes a matrix [out, in], torch.nn.Linear's order; its input dims are those its bias lacks. The
  # fused QKV outputs [3, heads, head_dim] go heads first.
  qkv = stacked["attn"]["qkv_kernel"][1]  # [embed, 3, heads, head_dim]
  np.testing.assert_array_equal(attn["qkv_weight"], jnp.transpose(qkv, (2, 1, 3, 0)).reshape(-1, TINY.embed_dim))
  np.testing.assert_array_equal(attn["out_weight"], stacked["attn"]["out_kernel"][1].reshape(-1, TINY.embed_dim).T)
  np.testing.assert_array_equal(mlp["in_weight"], stacked["mlp"]["in_kernel"][1].T)
  np.testing.assert_array_equal(mlp["out_weight"], stacked["mlp"]["out_kernel"][1].T)
  np.testing.assert_array_equal(decode["blocks"][2]["ln_2"]["scale"], stacked["ln_2"]["scale"][2])


def test_cached_forward_matches_full(params):
  tokens = _tokens()
  full = cpm.forward(params, tokens, TINY)
  decode = cpm.decode_layout(params)
  cache = cpm.init_cache(TINY, 2, 32)

  def logits(tokens, cache):
    hidden, cache = cpm.cached_hidden_states(decode, tokens, TINY, cache)
    return cpm.logits_from_hidden(decode.tree, hidden, TINY), cache

  first, cache = logits(tokens[:, :16], cache)
  steps = [first]
  for t in range(16, 24):
    step, cache = logits(tokens[:, t:t + 1], cache)
    steps.append(step)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)
  assert int(cache["index"]) == 24
