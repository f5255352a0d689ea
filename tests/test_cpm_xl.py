"""CPM-XL (Transformer-XL's segment recurrence in a CPM-shaped decoder): with no memory it is causal attention with
Transformer-XL's relative positions (a numpy reference of the paper's four terms), cached generation equals the
forward pass, memory never crosses documents, and it trains through the shared train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _params_helpers import randomised
from cpm_jax import decoding, partitioning, training
from cpm_jax.models import cpm
from cpm_jax.models.cpm import xl, xl_decode

CONFIG = xl.CPMXLConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, segment_length=4, memory_length=3,
                        dropout_rate=0.0)
PAD, EOD = 5, 7


def random_params(config, seed=0):
  return randomised(cpm.XL_FAMILY.abstract_params(config), seed, scale=0.3)


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


forward = jax.jit(xl.forward, static_argnums=2)


def numpy_reference_logits(params, tokens, config):
  """One segment, no memory, from the Transformer-XL paper: A_ij = (a) q_i.k_j + (b) q_i.W_R R_{i-j} + (c) u.k_j
  + (d) v.W_R R_{i-j} over j <= i, R_d = [sin(d / 10000^(2k/e)), cos(d / 10000^(2k/e))]; then CPM's pre-LN block."""
  p = jax.tree.map(np.asarray, params)
  e, heads = config.embed_dim, config.num_heads
  d = e // heads
  n = len(tokens)

  def ln(x, q):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + config.layer_norm_eps) * q["scale"] \
        + q["bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  relative = np.array([[np.sin(dist / 10000 ** (2 * k / e)) for k in range(e // 2)]
                       + [np.cos(dist / 10000 ** (2 * k / e)) for k in range(e // 2)] for dist in range(n)])
  x = p["embed"]["wte"][tokens]
  for layer in range(config.num_layers):
    b = jax.tree.map(lambda a, layer=layer: a[layer], p["blocks"])
    a = b["attn"]
    h = ln(x, b["ln_1"])
    qkv = np.einsum("te,enhk->tnhk", h, a["qkv_kernel"]) + a["qkv_bias"]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    w_r = np.einsum("de,ehk->dhk", relative, a["rel_projection"])
    scores = np.full((heads, n, n), -np.inf)
    for i in range(n):
      for j in range(i + 1):
        scores[:, i, j] = ((q[i] * k[j]).sum(-1) + (q[i] * w_r[i - j]).sum(-1) + (a["content_bias"] * k[j]).sum(-1)
                           + (a["position_bias"] * w_r[i - j]).sum(-1)) / np.sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("hij,jhk->ihk", weights, v)
    x = x + np.einsum("thk,hke->te", attended, a["out_kernel"]) + a["out_bias"]
    h = gelu(ln(x, b["ln_2"]) @ b["mlp"]["in_kernel"] + b["mlp"]["in_bias"])
    x = x + h @ b["mlp"]["out_kernel"] + b["mlp"]["out_bias"]
  return ln(x, p["ln_f"]) @ p["embed"]["wte"].T


def test_no_memory_is_causal_attention_with_relative_positions_per_segment():
  config = xl.CPMXLConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, segment_length=6,
                          memory_length=0, dropout_rate=0.0)
  params = random_params(config, 1)
  tokens = np.random.default_rng(0).integers(8, 64, (1, 12))
  logits = np.asarray(forward(params, tokens, config))
  for start in (0, 6):  # without memory the two segments are read independently
    np.testing.assert_allclose(logits[0, start:start + 6], numpy_reference_logits(params, tokens[0, start:start + 6],
                                                                                    config), atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_the_forward_pass(params):
  decode_params = xl_decode.decode_layout(params, CONFIG)
  prompts = [[11, 12, 13, 14, 15], [20, 21]]
  steps = 11  # positions up to 15: four segments, well past memory + segment (7)
  tokens, lengths = xl_decode.prepare_prompts(prompts, CONFIG, eod_id=EOD, pad_id=PAD)
  assert tokens.shape[1] % CONFIG.segment_length == 0
  cache, last = jax.jit(xl_decode.prefill, static_argnums=3)(decode_params, tokens, lengths, CONFIG)
  step = jax.jit(xl_decode.step_fn(CONFIG))
  stepped, fed = [], [[] for _ in prompts]
  for _ in range(steps):
    logits, cache = step(decode_params, last[:, None], cache)
    stepped.append(np.asarray(logits[:, 0]))
    last = jnp.argmax(logits[:, 0], -1)
    for row, token in enumerate(np.asarray(last)):
      fed[row].append(int(token))
  stepped = np.stack(stepped, 1)
  for row, prompt in enumerate(prompts):
    sequence = prompt + fed[row][:-1]
    full = np.asarray(forward(params, np.array([sequence + [PAD] * (20 - len(sequence))]), CONFIG))[0]
    np.testing.assert_allclose(stepped[row], full[len(prompt) - 1:len(sequence)], atol=1e-4, rtol=1e-4)
  greedy = decoding.SamplingConfig(max_new_tokens=steps, greedy=True)
  assert xl_decode.generate(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD) == fed
  assert np.stack(list(xl_decode.stream(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD)),
                  1).tolist() == fed


def test_memory_never_crosses_documents(params):
  # A packed row of 4 segments: document A (7 tokens), then document B (9 tokens, positions restarting).
  a, b = list(range(10, 17)), list(range(30, 39))
  segment_ids = np.array([[1] * 7 + [2] * 9])
  positions = np.array([list(range(7)) + list(range(9))])

  def logits(tokens):
    return np.asarray(jax.jit(xl.forward, static_argnums=2)(params, np.array([tokens]), CONFIG,
                                                            positions=positions, segment_ids=segment_ids))[0]

  base = logits(a + b)
  np.testing.assert_allclose(logits([t + 20 for t in a] + b)[7:], base[7:], atol=1e-6)  # A changed: B is not
  changed = logits(a + [b[0] + 1] + b[1:])
  assert np.abs(changed[12:] - base[12:]).max() > 1e-3  # B's later segments read B's first through the memory


def test_trains_through_the_shared_train_step():
  model = xl.CPMXLLanguageModel(CONFIG)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  optimizer = training.make_optimizer(training.learning_rate_schedule(peak=3e-3, warmup_steps=1, total_steps=10))
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  steps = training.make_sharded_steps(model, optimizer, mesh)
  tokens = np.random.default_rng(0).integers(8, 64, (8, 17))
  batch = training.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                 "weights": np.ones((8, 16), np.float32)}, mesh)
  losses = []
  for _ in range(4):
    state, metrics = steps.train(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  with pytest.raises(ValueError, match="segment_length=4"):
    model.loss(state.params, {"inputs": jnp.zeros((1, 6), jnp.int32)})
