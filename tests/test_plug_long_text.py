"""PLUG's long-text protocol (the released generate_plug.py): the output at every re-encode boundary equals plain
generation from the spliced context, computed from scratch."""

import jax.numpy as jnp

from _params_helpers import randomised
from cpm_jax import decoding
from cpm_jax.models import plug

CONFIG = plug.PlugConfig(vocab_size=256, num_encoder_layers=2, num_decoder_layers=2, embed_dim=32, num_heads=4,
                         mlp_dim=64, max_positions=32, num_relations=0, dropout_rate=0.0)
CLS, SEP, PAD = 101, 102, 0
LONG = plug.LongText(context_length=10, kept_length=12, chunk_length=4)
CONTEXTS = [list(range(110, 117)), list(range(130, 145))]  # shorter and longer than the 10 tokens read
NEW = 14  # chunks of 4, 4, 4 and 2: three re-encodes


def random_params(seed=0):
  return randomised(plug.abstract_params(CONFIG), seed, scale=0.3)


def test_long_text_output_at_each_reencode_equals_generation_from_the_spliced_context():
  params = plug.decode_layout(random_params())
  never_sep = decoding.SamplingConfig(max_new_tokens=NEW, greedy=True, min_length=NEW)
  out = plug.generate_long(params, CONTEXTS, CONFIG, never_sep, cls_id=CLS, sep_id=SEP, pad_id=PAD, long_text=LONG)
  assert [len(row) for row in out] == [NEW, NEW]
  assert len(set(out[0])) > 2  # the random model's output varies, so the comparison below can fail
  chunk = LONG.chunk_length
  for row, context in enumerate(CONTEXTS):
    for start in range(0, NEW, chunk):
      spliced = (context + out[row][:start])[-LONG.kept_length:][-LONG.context_length:]
      steps = min(chunk, NEW - start)
      reference, = plug.generate(params, [[CLS] + spliced + [SEP]], CONFIG,
                                 decoding.SamplingConfig(max_new_tokens=steps, greedy=True, min_length=steps),
                                 cls_id=CLS, sep_id=SEP, pad_id=PAD)
      assert out[row][start:start + steps] == reference, (row, start)


def test_long_text_sep_ends_the_text_only_after_the_fraction_of_the_requested_length():
  params = random_params(1)
  # Every decoder state becomes the final LayerNorm's bias, and [SEP]'s embedding points along it: [SEP] is the
  # most likely token at every step, so the text ends as soon as the protocol lets it.
  bias = params["decoder"]["ln_f"]["bias"]
  params["decoder"]["ln_f"]["scale"] = jnp.zeros_like(bias)
  params["embed"]["wte"] = params["embed"]["wte"].at[SEP].set(100.0 * bias)
  sampled = decoding.SamplingConfig(max_new_tokens=NEW, top_k=1)  # min_length None: the release's 80%
  out = plug.generate_long(plug.decode_layout(params), CONTEXTS, CONFIG, sampled, cls_id=CLS, sep_id=SEP,
                           pad_id=PAD, long_text=LONG)
  assert [len(row) for row in out] == [int(LONG.sep_fraction * NEW)] * 2
