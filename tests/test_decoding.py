"""Decoding: cached steps equal full recomputation (one device and a tensor x data mesh), sampling
order and statistics, beam search against exhaustive search, prompt handling."""

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import decoding, partitioning
from cpm_jax.models import cpm

CONFIG = cpm.CPMConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, max_positions=64,
                       dropout_rate=0.0)
EOD, PAD = 7, 5
PROMPTS = [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [], [40]]
STEPS = 6


@pytest.fixture(scope="module")
def params():
  return jax.jit(cpm.init, static_argnums=0)(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def decode_params(params):
  return cpm.decode_layout(params)


@jax.jit
def _forward_padded(params, tokens, segment_ids):
  return cpm.forward(params, tokens, CONFIG, segment_ids=segment_ids)


def full_logits(params, tokens):
  """Logits of one row recomputed from scratch without a cache: [len, vocab] (one compiled shape)."""
  width = 32
  padded = np.full((1, width), PAD, np.int32)
  padded[0, :len(tokens)] = tokens
  segment_ids = (np.arange(width) < len(tokens)).astype(np.int32)[None]
  return np.asarray(_forward_padded(params, padded, segment_ids)[0, :len(tokens)])


def recording_step_fn(step_fn):
  """Wraps a step function so that the cache also keeps the logits of every step."""
  def step(params, tokens, cache):
    logits, inner = step_fn(params, tokens, cache["inner"])
    recorded = jax.lax.dynamic_update_slice_in_dim(cache["logits"], logits, cache["t"], axis=1)
    return logits, {"inner": inner, "logits": recorded, "t": cache["t"] + 1}
  return step


def greedy_with_logits(params, tokens, lengths):
  """Runs prefill + the generic sample_loop; returns the tokens and the logits each step produced."""
  greedy = decoding.SamplingConfig(max_new_tokens=STEPS, greedy=True, min_length=0)
  cache, last = cpm.prefill(params, tokens, lengths, CONFIG, tokens.shape[1] - 1 + STEPS)
  cache = {"inner": cache, "logits": jnp.zeros((tokens.shape[0], STEPS, CONFIG.vocab_size)), "t": 0}
  out, _, cache = decoding.sample_loop(recording_step_fn(cpm.step_fn(CONFIG)), params, cache, last,
                                       greedy, eod_id=-1, pad_id=PAD, vocab_size=CONFIG.vocab_size,
                                       rng=jax.random.key(0))
  return out, cache["logits"], cache["inner"]["lm"]["k"]


def assert_matches_recomputation(params, out, logits):
  for row, prompt in enumerate(PROMPTS):
    prompt = prompt or [EOD]
    reference = full_logits(params, prompt + out[row].tolist())[len(prompt) - 1:-1]
    np.testing.assert_allclose(logits[row], reference, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(out[row], reference.argmax(-1))


def test_cached_decoding_equals_full_recomputation_every_step(params, decode_params):
  tokens, lengths = decoding.prepare_prompts(PROMPTS, CONFIG.max_positions - STEPS, eod_id=EOD, pad_id=PAD)
  out, logits, _ = jax.jit(greedy_with_logits)(decode_params, tokens, lengths)
  assert_matches_recomputation(params, np.asarray(out), np.asarray(logits))


def test_cached_decoding_on_tensor_sharded_mesh(params, decode_params):
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=1, tensor=4))
  shardings = partitioning.tree_shardings(cpm.logical_axes(CONFIG), mesh, params)
  sharded = jax.device_put(params, shardings)
  assert sharded["blocks"]["attn"]["qkv_kernel"].sharding.spec[3] == "tensor"
  tokens, lengths = decoding.prepare_prompts(PROMPTS, CONFIG.max_positions - STEPS, eod_id=EOD, pad_id=PAD)
  sharded_decode = cpm.decode_layout(sharded)  # per-layer [out, in] weights: the layout `generate` uses
  # The conversion keeps the tensor-parallel split: qkv_weight's rows [heads * 3 * head_dim] are split over tensor.
  assert sharded_decode.tree["blocks"][0]["attn"]["qkv_weight"].sharding.spec[0] == "tensor"
  with partitioning.activate(mesh):
    out, logits, keys = jax.jit(greedy_with_logits)(sharded_decode, tokens, lengths)
  # The cache really is split: its [batch * heads] rows over `data` (batch) and `tensor` (heads).
  assert len(keys) == CONFIG.num_layers
  assert keys[0].shape == (len(PROMPTS) * CONFIG.num_heads, tokens.shape[1] - 1 + STEPS, CONFIG.head_dim)
  assert keys[0].sharding.spec[0] == ("data", "tensor")  # fsdp (size 1) dropped
  assert keys[0].addressable_shards[0].data.shape[0] == len(PROMPTS) * CONFIG.num_heads // 8
  assert_matches_recomputation(params, np.asarray(out), np.asarray(logits))
  # The public entry point gives the same tokens on the mesh as on one device.
  greedy = decoding.SamplingConfig(max_new_tokens=STEPS, greedy=True)
  assert (cpm.generate(sharded_decode, PROMPTS, CONFIG, greedy, eod_id=EOD, pad_id=PAD, mesh=mesh)
          == cpm.generate(decode_params, PROMPTS, CONFIG, greedy, eod_id=EOD, pad_id=PAD))


def test_generation_stops_at_eod_per_row(params, decode_params):
  prompts = [p for p in PROMPTS if p]
  greedy = decoding.SamplingConfig(max_new_tokens=STEPS, greedy=True)
  free = cpm.generate(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD)
  eod = free[0][2]  # make the third token of row 0 the end of document
  stopped = cpm.generate(decode_params, prompts, CONFIG, greedy, eod_id=eod, pad_id=PAD)
  assert len(stopped[0]) <= 2
  for row, full in zip(stopped, free):
    expected = full[:full.index(eod)] if eod in full else full
    assert row == expected


def test_sampling_is_seeded_and_top_k_1_is_greedy(params, decode_params):
  sample = lambda seed, **kw: cpm.generate(  # noqa: E731
      decode_params, PROMPTS, CONFIG, decoding.SamplingConfig(max_new_tokens=STEPS, seed=seed, **kw), eod_id=EOD,
      pad_id=PAD, batch_size=3)
  assert sample(1) == sample(1)
  assert sample(1) != sample(2)
  greedy = cpm.generate(decode_params, PROMPTS, CONFIG, decoding.SamplingConfig(max_new_tokens=STEPS, greedy=True),
                             eod_id=EOD, pad_id=PAD)
  assert sample(3, top_k=1) == greedy


def draw(logits, n=4000, **kw):
  config = decoding.SamplingConfig(**kw)
  batch = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
  return np.bincount(np.asarray(decoding.choose_tokens(batch, config, jax.random.key(0))),
                     minlength=len(logits)) / n


def test_sampling_frequencies_and_cpm_filter_order():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(draw(np.log(probs)), probs, atol=0.03)
  tempered = probs ** 0.5 / (probs ** 0.5).sum()
  np.testing.assert_allclose(draw(np.log(probs), temperature=2.0), tempered, atol=0.03)
  assert set(np.flatnonzero(draw(np.log(probs), top_k=2))) == {0, 1}
  # top-p keeps the smallest prefix reaching p: 0.5 < 0.7 needs token 1 too, not token 2.
  assert set(np.flatnonzero(draw(np.log(probs), top_p=0.7))) == {0, 1}
  assert set(np.flatnonzero(draw(np.log(probs), top_p=0.45))) == {0}
  # Temperature comes after top-p: a hot temperature must not widen the nucleus.
  assert set(np.flatnonzero(draw(np.log(probs), top_p=0.45, temperature=10.0))) == {0}
  # top-p renormalises over the top-k: of {0.5, 0.3} the nucleus at 0.6 is token 0 alone.
  assert set(np.flatnonzero(draw(np.log(probs), top_k=2, top_p=0.6))) == {0}


def test_repetition_penalty(params, decode_params):
  logits = jnp.array([[2.0, -2.0, 2.0, -2.0]])
  seen = jnp.array([[True, True, False, False]])
  np.testing.assert_allclose(decoding.apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 2.0, -2.0]])
  config = decoding.SamplingConfig(max_new_tokens=12, greedy=True, repetition_penalty=1e6)
  for prompt, new in zip(PROMPTS, cpm.generate(decode_params, PROMPTS, CONFIG, config, eod_id=-1, pad_id=PAD)):
    assert len(set(new)) == len(new) and not set(new) & set(prompt or [-1])


# ---- beam search -------------------------------------------------------------------------------

VOCAB, BEAM_EOD = 6, 1
TABLE = np.random.default_rng(0).standard_normal((VOCAB, 3, VOCAB)).astype(np.float32) * 2


def markov_logits(last, total):
  """A toy model whose logits depend on the last token and (sum of tokens fed) mod 3."""
  return TABLE[last, total % 3]


def markov_step(params, tokens, cache):
  del params
  total = cache["total"] + tokens[:, 0]
  return jnp.asarray(TABLE)[tokens[:, 0], total % 3][:, None], {"total": total}


def exhaustive_best(first, steps, alpha, min_length):
  best = (-np.inf, None)
  for n in range(1, steps + 1):
    for seq in itertools.product(range(VOCAB), repeat=n):
      if BEAM_EOD in seq[:-1] or (seq[-1] != BEAM_EOD and n < steps):
        continue
      last, total, logp = first, first, 0.0
      for t, token in enumerate(seq):
        logits = markov_logits(last, total)
        log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        if token == BEAM_EOD and t < min_length:
          logp = -np.inf
        logp += log_probs[token]
        last, total = token, total + token
      score = logp / ((5 + n) / 6) ** alpha
      if score > best[0]:
        best = (score, list(seq))
  return best


@pytest.mark.parametrize("alpha,min_length", [(0.6, 1), (0.0, 0), (2.0, 2)])
def test_beam_search_finds_the_exhaustive_optimum(alpha, min_length):
  steps, first = 3, jnp.array([2, 4])
  config = decoding.BeamSearchConfig(max_new_tokens=steps, beam_size=36, length_penalty=alpha,
                                     min_length=min_length)
  tokens, lengths, scores = jax.jit(lambda cache, first: decoding.beam_search_loop(
      markov_step, None, cache, {"total": ("batch",)}, first, config, eod_id=BEAM_EOD, pad_id=0))(
          {"total": jnp.zeros(2, jnp.int32)}, first)
  for row in range(2):
    score, seq = exhaustive_best(int(first[row]), steps, alpha, min_length)
    assert scores[row] == pytest.approx(score, rel=1e-5)
    assert tokens[row, :len(seq)].tolist() == seq
    assert lengths[row] == len(seq) - (seq[-1] == BEAM_EOD)


def test_beam_search_on_cpm_scores_its_own_output(params, decode_params):
  prompts = [p for p in PROMPTS if p]
  config = decoding.BeamSearchConfig(max_new_tokens=5, beam_size=3, length_penalty=0.6, min_length=2)
  tokens, lengths = decoding.prepare_prompts(prompts, CONFIG.max_positions - 5, eod_id=EOD, pad_id=PAD)

  @jax.jit
  def run(params, tokens, lengths):
    cache, last = cpm.prefill(params, tokens, lengths, CONFIG, tokens.shape[1] + 4)
    return decoding.beam_search_loop(cpm.step_fn(CONFIG), params, cache, cpm.cache_logical_axes(CONFIG), last,
                                     config, eod_id=EOD, pad_id=PAD)
  out, out_lengths, scores = run(decode_params, tokens, lengths)
  for row, prompt in enumerate(prompts):
    new = out[row].tolist()
    new = new[:new.index(EOD) + 1] if EOD in new else new
    logits = full_logits(params, prompt + new)[len(prompt) - 1:-1]
    log_probs = jax.nn.log_softmax(logits, -1)
    logp = float(sum(log_probs[t, token] for t, token in enumerate(new)))
    assert scores[row] == pytest.approx(logp / ((5 + len(new)) / 6) ** 0.6, rel=1e-4)
    assert out_lengths[row] >= 2
  # One beam without length penalty is greedy search.
  one = decoding.BeamSearchConfig(max_new_tokens=STEPS, beam_size=1, length_penalty=0.0, min_length=0)
  greedy = decoding.SamplingConfig(max_new_tokens=STEPS, greedy=True)
  assert (cpm.generate(decode_params, prompts, CONFIG, one, eod_id=EOD, pad_id=PAD)
          == cpm.generate(decode_params, prompts, CONFIG, greedy, eod_id=EOD, pad_id=PAD))


# ---- prompts -----------------------------------------------------------------------------------

def test_prompt_padding_truncation_and_strict_mode(caplog):
  tokens, lengths = decoding.prepare_prompts([[1, 2, 3], []], 10, eod_id=EOD, pad_id=PAD)
  assert tokens.shape == (2, 8) and lengths.tolist() == [3, 1]
  assert tokens[0, -3:].tolist() == [1, 2, 3] and tokens[1, -1] == EOD and (tokens[1, :-1] == PAD).all()
  with caplog.at_level(logging.WARNING):
    tokens, lengths = decoding.prepare_prompts([list(range(20))], 12, eod_id=EOD, pad_id=PAD)
  assert "Prompt 0 has 20 tokens" in caplog.text
  assert lengths.tolist() == [12] and tokens[0, -12:].tolist() == list(range(8, 20))
  with pytest.raises(ValueError, match="Prompt 0 has 20 tokens.*strict|shorten"):
    decoding.prepare_prompts([list(range(20))], 12, eod_id=EOD, pad_id=PAD, strict=True)
  with pytest.raises(ValueError, match="max_new_tokens"):
    cpm.generate(None, [[1]], CONFIG, decoding.SamplingConfig(max_new_tokens=64), eod_id=EOD, pad_id=PAD)


# ---- past the window: CPM's sliding window ------------------------------------------------------

WINDOW, STRIDE, WINDOW_STEPS = 16, 5, 30


def windowed_reference_logits(params, prompts, out, width):
  """Each step's logits recomputed from scratch, without a cache, over the window the batch rule leaves each row:
  the batch's slot counter starts at width - 1; when it reaches WINDOW every row keeps its last WINDOW - STRIDE
  cached tokens (fewer if it has fewer). Returns [rows, steps, vocab] and the number of moves."""
  slots, moves = width - 1, 0
  cached = [len(p or [EOD]) - 1 for p in prompts]
  reference = np.zeros((len(prompts), WINDOW_STEPS, CONFIG.vocab_size), np.float32)
  for step in range(WINDOW_STEPS):
    if slots == WINDOW:
      slots, moves = WINDOW - STRIDE, moves + 1
      cached = [min(c, WINDOW - STRIDE) for c in cached]
    for row, prompt in enumerate(prompts):
      sequence = (prompt or [EOD]) + out[row].tolist()
      end = len(prompt or [EOD]) + step
      reference[row, step] = full_logits(params, sequence[end - cached[row] - 1:end])[-1]
    slots += 1
    cached = [c + 1 for c in cached]
  return reference, moves


def test_sliding_window_equals_windowed_recomputation_without_cache(params, decode_params):
  window = cpm.SlidingWindow(length=WINDOW, stride=STRIDE)
  greedy = decoding.SamplingConfig(max_new_tokens=WINDOW_STEPS, greedy=True, min_length=0)
  tokens, lengths = decoding.prepare_prompts(PROMPTS, WINDOW, eod_id=EOD, pad_id=PAD)

  @jax.jit
  def run(params, tokens, lengths):
    program = cpm.decode_program(CONFIG, WINDOW_STEPS, window.resolve(CONFIG), True, False, (12, WINDOW))
    cache, last, _, _ = program.prefill(params, tokens, lengths)
    step = program.step
    cache = {"inner": cache, "logits": jnp.zeros((tokens.shape[0], WINDOW_STEPS, CONFIG.vocab_size)), "t": 0}
    out, _, cache = decoding.sample_loop(recording_step_fn(step), params, cache, last, greedy, eod_id=-1,
                                         pad_id=PAD, vocab_size=CONFIG.vocab_size, rng=jax.random.key(0))
    return out, cache["logits"], cache["inner"]["moves"]

  out, logits, moves = jax.device_get(run(decode_params, tokens, lengths))  # length-bucketed: spans 12, 16
  reference, expected_moves = windowed_reference_logits(params, PROMPTS, out, tokens.shape[1])
  # The window moved every STRIDE tokens once the cache was full, not on every token.
  assert moves == expected_moves == 1 + (WINDOW_STEPS - 2) // STRIDE
  np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-4)
  np.testing.assert_array_equal(out, reference.argmax(-1))
  # The public entry point generates the same tokens, and so does its streamed path (eod_id=-1: no stop; the
  # empty prompt, which would start from eod_id, is left out).
  rows = [row for row, prompt in enumerate(PROMPTS) if prompt]
  prompts = [PROMPTS[row] for row in rows]
  generated = cpm.generate(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD, window=window)
  assert generated == out[rows].tolist()
  streamed = list(cpm.stream(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD, window=window))
  assert np.stack(streamed, 1).tolist() == generated


def test_three_thousand_tokens_from_a_tiny_model(decode_params):
  window = cpm.SlidingWindow(length=CONFIG.max_positions, stride=16)
  greedy = decoding.SamplingConfig(max_new_tokens=3000, greedy=True)
  out, = cpm.generate(decode_params, [[11, 12, 13]], CONFIG, greedy, eod_id=-1, pad_id=PAD, window=window)
  assert len(out) == 3000 and 0 <= min(out) and max(out) < CONFIG.vocab_size
  with pytest.raises(ValueError, match="SlidingWindow.stride=64"):
    cpm.SlidingWindow(length=64, stride=64).resolve(CONFIG)
