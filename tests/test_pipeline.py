"""The Grain LM pipeline: packing, no token lost or duplicated, per-process shares, seeded shuffle, exact resume."""

import collections
import json

import grain
import numpy as np
import pytest

from _data_helpers import CharTokenizer, demo_data_dir, small_tokenizer  # noqa: F401  (session fixtures)
from cpm_jax.data import pipeline, sources

SEQ_LEN = 64


@pytest.fixture(scope="module")
def documents(demo_data_dir):  # noqa: F811
  """400 real paragraphs (about 330 characters each, so most span several rows of SEQ_LEN)."""
  return sources.load_examples("peoples_daily_1998", "train", demo_data_dir)[:400]


def lm_batches(docs, epochs=1, **kwargs):
  kwargs = {"seq_len": SEQ_LEN, "global_batch_size": 8, "process_index": 0, "process_count": 1, **kwargs}
  return list(pipeline.make_lm_iterator(docs, CharTokenizer(), num_epochs=epochs, **kwargs))


def pieces_of(batches):
  """Every packed piece as its token sequence: inputs, then the last target."""
  pieces = []
  for batch in batches:
    for row in range(batch["inputs"].shape[0]):
      for segment in set(batch["segment_ids"][row].tolist()) - {0}:
        at = batch["segment_ids"][row] == segment
        pieces.append((*batch["inputs"][row][at].tolist(), int(batch["targets"][row][at][-1])))
  return pieces


def expected_pieces(docs, seq_len=SEQ_LEN):
  """A document (tokens + <eod>) covers windows [k*seq_len, (k+1)*seq_len] (seq_len inputs + one more target)."""
  pieces = []
  for doc in docs:
    tokens = [ord(c) for c in doc["text"]] + [CharTokenizer.eod_id]
    pieces += [tuple(tokens[start:start + seq_len + 1]) for start in range(0, len(tokens) - 1, seq_len)]
  return pieces


def test_batches_hold_packed_documents(documents):
  batches = lm_batches(documents)
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, SEQ_LEN), np.int32), "targets": ((8, SEQ_LEN), np.int32),
        "weights": ((8, SEQ_LEN), np.float32), "segment_ids": ((8, SEQ_LEN), np.int32),
        "positions": ((8, SEQ_LEN), np.int32)}
    seg, pos = batch["segment_ids"], batch["positions"]
    np.testing.assert_array_equal(batch["weights"], seg > 0)
    assert not batch["inputs"][seg == 0].any() and not batch["targets"][seg == 0].any()
    for row in range(8):
      used = int((seg[row] > 0).sum())
      assert (seg[row][used:] == 0).all()  # padding only at the end
      assert (np.diff(seg[row][:used]) >= 0).all() and (not used or seg[row][0] == 1)
      for s in set(seg[row].tolist()) - {0}:
        at = seg[row] == s
        np.testing.assert_array_equal(pos[row][at], np.arange(at.sum()))  # positions restart per document
        np.testing.assert_array_equal(batch["targets"][row][at][:-1], batch["inputs"][row][at][1:])
  assert pipeline.non_pad_fraction(batches) > 0.95


def test_an_epoch_holds_every_token_exactly_once(documents):
  got = pieces_of(lm_batches(documents))
  assert sorted(got) == sorted(expected_pieces(documents))
  inputs = collections.Counter(t for p in got for t in p[:-1])
  targets = collections.Counter(t for p in got for t in p[1:])
  tokens = [[ord(c) for c in d["text"]] + [CharTokenizer.eod_id] for d in documents]
  assert inputs == collections.Counter(t for doc in tokens for t in doc[:-1])
  assert targets == collections.Counter(t for doc in tokens for t in doc[1:])


def test_each_process_gets_its_share(documents):
  shares = [lm_batches(documents, process_index=p, process_count=2) for p in range(2)]
  for batches in shares:
    assert all(b["inputs"].shape == (4, SEQ_LEN) for b in batches)
  assert pieces_of(shares[0]) and pieces_of(shares[1])
  assert sorted(pieces_of(shares[0]) + pieces_of(shares[1])) == sorted(expected_pieces(documents))
  assert sorted(pieces_of(shares[0])) == sorted(expected_pieces(documents[0::2]))  # documents p, p + 2, ...


def test_shuffle_is_seeded(documents):
  first = lambda **kw: lm_batches(documents[:100], **kw)[0]["inputs"]
  np.testing.assert_array_equal(first(seed=1), first(seed=1))
  assert not np.array_equal(first(seed=1), first(seed=2))
  unshuffled = first(shuffle=False)
  first_doc = [ord(c) for c in documents[0]["text"]]
  assert unshuffled[0].tolist()[:len(first_doc)] == first_doc  # in source order


def test_restored_iterator_continues_exactly(documents):
  """Infinite epochs over 12 documents: 12 batches cross epoch boundaries (each epoch reshuffled)."""
  make = lambda: pipeline.make_lm_iterator(documents[:12], CharTokenizer(), seq_len=SEQ_LEN, global_batch_size=8,
                                           process_index=0, process_count=1, seed=3, num_packing_bins=16)
  uninterrupted = [next(it) for it in [make()] for _ in range(12)]
  assert sum(len(p) - 1 for p in expected_pieces(documents[:12])) < 3 * 8 * SEQ_LEN  # an epoch < 3 batches
  for k in (0, 5):
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = make()
    restored.set_state(state)
    for expected in uninterrupted[k:]:
      got = next(restored)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_state_round_trips_through_orbax_with_grains_handler(documents, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  make = lambda: pipeline.make_lm_iterator(documents[:40], CharTokenizer(), seq_len=SEQ_LEN, global_batch_size=8,
                                           process_index=0, process_count=1)
  it = make()
  next(it), next(it)
  manager = ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  restored = make()
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(next(restored)["inputs"], next(it)["inputs"])


def test_worker_processes_deliver_the_same_epoch(documents):
  got = pieces_of(lm_batches(documents[:120], worker_count=2))
  assert sorted(got) == sorted(expected_pieces(documents[:120]))


def test_eval_iterator_is_one_pass_split_by_rows(documents):
  docs = documents[:150]
  make = lambda p, n: list(pipeline.make_eval_iterator(docs, CharTokenizer(), seq_len=SEQ_LEN, global_batch_size=8,
                                                        process_index=p, process_count=n))
  whole, shares = make(0, 1), [make(p, 2) for p in range(2)]
  assert len(shares[0]) == len(shares[1]) == len(whole)  # every process sees the same number of batches
  for b, b0, b1 in zip(whole, *shares):
    for key in b:
      np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), b[key])
  assert sorted(pieces_of(whole)) == sorted(expected_pieces(docs))
  assert whole[-1]["inputs"].shape == (8, SEQ_LEN)  # the last batch is padded with empty rows


def test_real_tokenizer_end_to_end(small_tokenizer, demo_data_dir):  # noqa: F811
  tok = small_tokenizer
  source = sources.load_split("peoples_daily_1998", "validation", demo_data_dir)
  batches = list(pipeline.make_lm_iterator(source, tok, seq_len=1024, global_batch_size=4, num_epochs=1,
                                           max_documents=24, process_index=0, process_count=1))
  decoded = []
  for batch in batches:
    for row in range(4):
      for s in set(batch["segment_ids"][row].tolist()) - {0}:
        at = batch["segment_ids"][row] == s
        assert batch["targets"][row][at][-1] == tok.eod_id
        decoded.append(tok.decode(batch["inputs"][row][at]))
  texts = [source[i]["text"].decode() for i in range(24)]
  assert sorted(decoded) == sorted(tok.decode(tok.encode(t)) for t in texts)


def test_bad_arguments(documents):
  with pytest.raises(ValueError, match="global_batch_size 6 is not a positive multiple of the 4 processes"):
    lm_batches(documents, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="Process 2 of 3 gets no documents"):
    lm_batches(documents[:2], global_batch_size=6, process_index=2, process_count=3)
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, process_count=2\)"):
    lm_batches(documents, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="holds no documents"):
    lm_batches([])


def test_non_pad_fraction():
  batch = {"segment_ids": np.array([[1, 1, 2, 0], [1, 0, 0, 0]])}
  assert pipeline.non_pad_fraction([batch, batch]) == 4 / 8
