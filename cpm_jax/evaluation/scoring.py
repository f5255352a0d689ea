"""Scoring continuations by log-likelihood: a pure function over batches, and batching of requests.

A request is (context ids, continuation ids): the score is log p(continuation | context), summed over the
continuation's tokens (with an empty context the first token has no predictor and is not scored).
Batches use the LM pipeline's format: inputs, targets, weights, segment_ids, positions, [batch, length].
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding
from cpm_jax.evaluation import batching

Request = tuple[Sequence[int], Sequence[int]]
ScoreFn = Callable[[Any, dict], dict]  # (params, batch) -> {"total": [batch], "count": [batch]}


def continuation_log_likelihood(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
  """Per-row total log-likelihood of the weighted targets, their count and mean (float32)."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_ll = target_logits - jax.nn.logsumexp(logits, axis=-1)
  weights = weights.astype(jnp.float32)
  total, count = (token_ll * weights).sum(-1), weights.sum(-1)
  return {"total": total, "count": count, "mean": total / jnp.maximum(count, 1.0)}


def make_batch(requests: Sequence[Request], width: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded LM batch of (context, continuation) requests, each at most width + 1 tokens."""
  batch = {name: np.zeros((len(requests), width), np.int32) for name in ("inputs", "targets", "segment_ids",
                                                                          "positions")}
  batch["inputs"][:] = pad_id
  batch["weights"] = np.zeros((len(requests), width), np.float32)
  for row, (context, continuation) in enumerate(requests):
    sequence = list(context) + list(continuation)
    n = len(sequence) - 1
    if n < 1:
      continue
    batch["inputs"][row, :n] = sequence[:-1]
    batch["targets"][row, :n] = sequence[1:]
    batch["segment_ids"][row, :n] = 1
    batch["positions"][row, :n] = np.arange(n)
    batch["weights"][row, max(len(context) - 1, 0):n] = 1.0
  return batch


def truncate(request: Request, max_length: int, where: str, strict: bool) -> tuple[Request, int]:
  """Cuts a request to max_length + 1 tokens from the left (context first); returns it and the tokens cut.

  Raises a ValueError naming `where` instead when strict.
  """
  context, continuation = list(request[0]), list(request[1])
  excess = len(context) + len(continuation) - 1 - max_length
  if excess <= 0:
    return (context, continuation), 0
  if strict:
    raise ValueError(f"{where}: {len(context) + len(continuation)} tokens exceed the model's {max_length} "
                     "positions (+1 predicted); shorten the input or run without strict mode.")
  cut_context = min(excess, len(context))
  return (context[cut_context:], continuation[excess - cut_context:]), excess


def score_requests(score_fn: ScoreFn, params: Any, requests: Sequence[Request], *, max_length: int,
                   batch_size: int, pad_id: int, strict: bool = False, progress: bool = False,
                   names: Sequence[str] | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Total log-likelihood and scored-token count of every request, in input order.

  Requests are sorted by length and batched with power-of-two widths (few compiled shapes); the last
  batch is padded with empty rows. `names` label requests in warnings and errors; `mesh`: run under it.
  """
  cut = [truncate(r, max_length, names[i] if names else f"request {i}", strict) for i, r in enumerate(requests)]
  requests = [request for request, _ in cut]
  long = [i for i, (_, excess) in enumerate(cut) if excess]
  if long:
    first = names[long[0]] if names else f"request {long[0]}"
    logging.warning("%d of %d requests exceed the model's %d positions and lose tokens from the left (the "
                    "first: %s, %d tokens cut); strict mode makes this an error.", len(long), len(requests),
                    max_length, first, cut[long[0]][1])
  order = np.argsort([-(len(c) + len(t) - 1) for c, t in requests], kind="stable")

  def score(batch: list[Request]) -> list[tuple[float, float]]:
    width = decoding.bucket_width(max(len(c) + len(t) - 1 for c, t in batch), max_length, minimum=16)
    result = score_fn(params, make_batch(batch, width, pad_id))
    return list(zip(np.asarray(result["total"]), np.asarray(result["count"])))

  scored = batching.in_batches([requests[i] for i in order], batch_size, score, pad=((), ()), desc="scoring",
                               progress=progress, mesh=mesh)
  totals, counts = np.zeros(len(requests), np.float64), np.zeros(len(requests), np.int64)
  if scored:
    totals[order] = [total for total, _ in scored]
    counts[order] = np.rint([count for _, count in scored])
  return totals, counts
