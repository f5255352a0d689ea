"""cpm.LabelPromptData: each example is the prompt LabelPromptTask scores with its gold label words, the loss on
those words only; batches cover the splits as the train loop expects."""

import json

import numpy as np

from _data_helpers import small_tokenizer  # noqa: F401  (session fixture)
from cpm_jax.evaluation import interface, tasks
from cpm_jax.models import cpm

REVIEWS = [("质量很好，物流也快，非常满意。", 1), ("东西坏了，客服不理人。", 0), ("还行吧。", 1),
           ("包装破损，" * 30 + "退货。", 0)]


def test_rows_are_the_scored_prompts_with_loss_on_the_label_only(tmp_path, small_tokenizer):  # noqa: F811
  for split in ("train", "validation"):
    (tmp_path / f"{split}.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n" for t, label in REVIEWS),
        encoding="utf-8")
  data = cpm.LabelPromptData(tokenizer_path=small_tokenizer.model_path, dataset=str(tmp_path / "{split}.jsonl"),
                             seq_len=48, global_batch_size=4)
  rows = next(data.eval_batches())
  assert {k: v.shape for k, v in rows.items()} == {k: (4, 48) for k in rows}

  # What the evaluation task scores for each example's gold label, through a model that records its requests.
  requests = []

  def score(batch, names):
    requests.extend(batch)
    return np.zeros(len(batch)), np.ones(len(batch))
  task = tasks.LabelPromptTask(name="t", templates=[["{text}\n总体评价：", "{label}"]], label_map={0: "差评", 1: "好评"})
  task.evaluate(interface.LanguageModel(small_tokenizer, score, None), [{"text": t, "label": label}
                                                                       for t, label in REVIEWS])
  for row, (_, label) in enumerate(REVIEWS):
    context, continuation = requests[2 * row + label]  # labels in map order: 差评 (0), 好评 (1)
    tokens = (context + continuation)[-49:]  # the long review keeps its last tokens, as the scorer's prompt
    length = len(tokens) - 1
    np.testing.assert_array_equal(rows["inputs"][row, :length], tokens[:-1])
    np.testing.assert_array_equal(rows["targets"][row, :length], tokens[1:])
    weighted = rows["targets"][row][rows["weights"][row] > 0]
    assert weighted.tolist() == continuation and small_tokenizer.decode(continuation) == ["差评", "好评"][label]
    assert rows["weights"][row, length:].sum() == 0 and rows["segment_ids"][row, length:].sum() == 0
  assert length == 48  # the long review fills its row

  train = data.train_iterator(seed=0)
  label_tokens = {t for _, continuation in requests for t in continuation}
  for batch in (next(train) for _ in range(3)):  # repeats for ever, full batches, loss on label words only
    assert batch["inputs"].shape == (4, 48) and set(batch["targets"][batch["weights"] > 0].tolist()) <= label_tokens


def test_eval_max_examples_spreads_over_a_label_sorted_split(tmp_path, small_tokenizer):  # noqa: F811
  """review_sentiment's splits hold every negative before every positive: a limited validation pass must see both."""
  texts = [(f"差{i}。", 0) for i in range(30)] + [(f"好{i}。", 1) for i in range(30)]
  for split in ("train", "validation"):
    (tmp_path / f"{split}.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n" for t, label in texts),
        encoding="utf-8")
  data = cpm.LabelPromptData(tokenizer_path=small_tokenizer.model_path, dataset=str(tmp_path / "{split}.jsonl"),
                             seq_len=16, global_batch_size=4, eval_max_examples=8)
  rows = np.concatenate([batch["inputs"] for batch in data.eval_batches()])
  seen = [small_tokenizer.decode([t for t in row.tolist() if t != small_tokenizer.pad_id]) for row in rows]
  assert len(seen) == 8 and [text[0] for text in seen] == ["差"] * 4 + ["好"] * 4, seen
