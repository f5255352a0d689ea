"""The decoding loops' bans against transformers' logits processors (same tokens, same logits): no-repeat n-gram
blocking (NoRepeatNGramLogitsProcessor) and suppressed tokens (SuppressTokensLogitsProcessor), in CPM's greedy and
sampled generation (a host loop of full recomputations with transformers' processors) and in beam search (against
exhaustive search over the sequences the bans allow)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

from cpm_jax import decoding, no_repeat_ngram
from cpm_jax.models import cpm

CONFIG = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, max_positions=48, dropout_rate=0.0)
EOD, PAD = 7, 5


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_banned_tokens_equal_transformers_processor(size):
  rng = np.random.default_rng(size)
  vocab, width = 5, 14  # a small vocab, so that rows repeat n-grams often
  tokens = rng.integers(0, vocab, (6, width)).astype(np.int32)
  tokens[5, width - size + 1:] = tokens[5, 2:1 + size]  # the last row ends as its n-gram at column 2 begins
  lengths = np.array([0, 1, size - 1, size, 9, width])
  valid = np.arange(width)[None, :] >= width - lengths[:, None]  # left padding, as the prompts are
  scores = rng.standard_normal((6, vocab)).astype(np.float32)
  banned = np.asarray(jax.jit(no_repeat_ngram.banned_tokens, static_argnums=(3, 4))(tokens, valid, width, size,
                                                                                   vocab))
  processor = logits_process.NoRepeatNGramLogitsProcessor(size)
  for row in range(6):
    sequence = torch.tensor(tokens[row, width - lengths[row]:][None], dtype=torch.long)
    expected = processor(sequence, torch.tensor(scores[row:row + 1])).numpy()[0]
    np.testing.assert_array_equal(banned[row], np.isneginf(expected), err_msg=f"row {row}: {sequence.tolist()}")
  assert banned[5, tokens[5, 1 + size]]  # the comparison covers a row with a ban


@pytest.fixture(scope="module")
def params():
  return jax.jit(cpm.init, static_argnums=0)(CONFIG, jax.random.key(3))


@jax.jit
def _forward(params, tokens, segment_ids):
  return cpm.forward(params, tokens, CONFIG, segment_ids=segment_ids)


def reference_greedy(params, prompt, steps, size, penalty, suppress=()):
  """Greedy continuation by full recomputation, each step's logits through transformers' processors; also how
  many steps the n-gram ban or the suppressed tokens changed the choice."""
  penalise = logits_process.RepetitionPenaltyLogitsProcessor(penalty)
  processors = [logits_process.SuppressTokensLogitsProcessor(list(suppress))] if suppress else []
  if size:
    processors.append(logits_process.NoRepeatNGramLogitsProcessor(size))
  ban = logits_process.LogitsProcessorList(processors)
  sequence, width, changed = list(prompt), CONFIG.max_positions, 0
  for _ in range(steps):
    padded = np.full((1, width), PAD, np.int32)
    padded[0, :len(sequence)] = sequence
    logits = np.asarray(_forward(params, padded, (np.arange(width) < len(sequence))[None].astype(np.int32)))
    ids = torch.tensor([sequence])
    scores = penalise(ids, torch.tensor(logits[:, len(sequence) - 1]))
    chosen = int(ban(ids, scores.clone()).argmax(-1))
    changed += chosen != int(scores.argmax(-1))
    sequence.append(chosen)
  return sequence[len(prompt):], changed


def test_suppressed_tokens_are_never_generated_as_in_transformers(params):
  prompts, steps = [[11, 12, 13, 11, 12], [20, 21]], 8
  decode_params = cpm.decode_layout(params)
  free = cpm.generate(decode_params, prompts, CONFIG, decoding.SamplingConfig(max_new_tokens=steps, greedy=True),
                      eod_id=-1, pad_id=PAD)
  suppress = tuple(sorted({row[0] for row in free} | {row[3] for row in free}))  # what the model chooses freely
  for size, penalty in [(0, 1.0), (2, 1.3)]:
    greedy = decoding.SamplingConfig(max_new_tokens=steps, greedy=True, repetition_penalty=penalty,
                                     no_repeat_ngram_size=size, suppress_tokens=suppress)
    out = cpm.generate(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD)
    streamed = np.stack(list(cpm.stream(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD)), 1)
    assert streamed.tolist() == out
    for prompt, new in zip(prompts, out):
      expected, changed = reference_greedy(params, prompt, steps, size, penalty, suppress)
      assert new == expected, (size, prompt)
      assert changed > 0 and not set(new) & set(suppress)
  sampled = decoding.SamplingConfig(max_new_tokens=steps, top_k=4, seed=2, suppress_tokens=suppress)
  out = cpm.generate(decode_params, prompts * 8, CONFIG, sampled, eod_id=-1, pad_id=PAD)
  assert not set(sum(out, [])) & set(suppress)


def test_suppressed_tokens_are_checked():
  with pytest.raises(ValueError, match=r"SamplingConfig.suppress_tokens=\[-1\]; expected token ids >= 0"):
    decoding.SamplingConfig(suppress_tokens=(-1,))
  config = decoding.BeamSearchConfig(max_new_tokens=2, beam_size=2, min_length=0, suppress_tokens=[VOCAB])
  assert config.suppress_tokens == (VOCAB,)  # a list from gin or flags is kept as a (hashable) tuple
  with pytest.raises(ValueError, match=r"BeamSearchConfig.suppress_tokens=\[4\]: the model's vocabulary has 4"):
    config.run(markov_step, None, {}, {}, jnp.array([1]), eod_id=BEAM_EOD, pad_id=0, vocab_size=VOCAB, rng=None)


def repeated_ngrams(sequence, size):
  grams = [tuple(sequence[i:i + size]) for i in range(len(sequence) - size + 1)]
  return len(grams) - len(set(grams))


def test_cpm_generation_bans_repeated_ngrams_as_transformers(params):
  prompts = [[11, 12, 13, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38, 30]]
  decode_params, steps = cpm.decode_layout(params), 10
  for size, penalty in [(2, 1.0), (3, 1.3)]:
    greedy = decoding.SamplingConfig(max_new_tokens=steps, greedy=True, repetition_penalty=penalty,
                                     no_repeat_ngram_size=size)
    out = cpm.generate(decode_params, prompts, CONFIG, greedy, eod_id=-1, pad_id=PAD)
    changed = 0
    for prompt, new in zip(prompts, out):
      expected, count = reference_greedy(params, prompt, steps, size, penalty)
      assert new == expected, (size, prompt)
      changed += count
    assert changed > 0  # the ban decided some steps (this model repeats n-grams without it)
  sampled = decoding.SamplingConfig(max_new_tokens=steps, top_k=8, no_repeat_ngram_size=2, seed=1)
  out = cpm.generate(decode_params, prompts * 4, CONFIG, sampled, eod_id=-1, pad_id=PAD)
  assert all(repeated_ngrams(p + new, 2) == repeated_ngrams(p, 2) for p, new in zip(prompts * 4, out))


VOCAB, BEAM_EOD = 4, 0
TABLE = np.random.default_rng(1).standard_normal((VOCAB, VOCAB)).astype(np.float32) * 2


def markov_step(params, tokens, cache):
  del params
  return jnp.asarray(TABLE)[tokens[:, 0]][:, None], cache


def constrained_best(history, steps, alpha, size, suppress=()):
  """The best sequence (log-prob / GNMT penalty) among those that repeat no n-gram of history + sequence and hold
  no suppressed token, each step's probabilities renormalised over the tokens the bans allow."""
  processor = logits_process.LogitsProcessorList([logits_process.NoRepeatNGramLogitsProcessor(size),
                                                  logits_process.SuppressTokensLogitsProcessor(list(suppress))])
  best = (-np.inf, None)
  for n in range(1, steps + 1):
    for seq in itertools.product(range(VOCAB), repeat=n):
      if BEAM_EOD in seq[:-1] or (seq[-1] != BEAM_EOD and n < steps):
        continue
      row, logp = list(history), 0.0
      for token in seq:
        logits = processor(torch.tensor([row]), torch.tensor(TABLE[row[-1]][None]))[0]
        logp += float(torch.log_softmax(logits, -1)[token])
        row.append(token)
      score = logp / ((5 + n) / 6) ** alpha
      if score > best[0]:
        best = (score, list(seq))
  return best


@pytest.mark.parametrize("suppress", [(), (1, 3)])
def test_beam_search_finds_the_best_sequence_the_bans_allow(suppress):
  steps, size = 4, 2
  history = [[1, 2, 3], [3, 3, 1]]  # the loop's first tokens are the histories' last
  config = decoding.BeamSearchConfig(max_new_tokens=steps, beam_size=16, length_penalty=0.6, min_length=0,
                                     no_repeat_ngram_size=size, suppress_tokens=suppress)
  fed = jnp.array([h[:-1] for h in history])
  tokens, _ = jax.jit(lambda first: config.run(markov_step, None, {}, {}, first, eod_id=BEAM_EOD, pad_id=0,
                                               vocab_size=VOCAB, rng=None,
                                               history=(fed, jnp.ones(fed.shape, bool))))(
                                                   jnp.array([h[-1] for h in history]))
  for row in range(2):
    _, seq = constrained_best(history[row], steps, 0.6, size, suppress)
    assert tokens[row, :len(seq)].tolist() == seq
    assert repeated_ngrams(history[row] + seq, size) == 0 and not set(seq) & set(suppress)
  if suppress:  # the suppressed tokens are in the best sequence of the first row without them
    assert set(constrained_best(history[0], steps, 0.6, size)[1]) & set(suppress)
