"""Reading a run's TensorBoard scalars back (for plots in notebooks), without TensorBoard installed.

The train loop writes tensorboardX event files under `workdir/tensorboard`: TFRecord files (a little-endian uint64
length, its masked CRC, the record, its masked CRC) of `Event` protos whose summaries carry `simple_value` scalars.
"""

from __future__ import annotations

import collections
import os
import pathlib
import struct

from tensorboardX.proto import event_pb2


def _records(path: pathlib.Path):
  with open(path, "rb") as f:
    while header := f.read(12):
      if len(header) < 12:
        raise ValueError(f"{path}: truncated record header")
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length + 4)[:length]
      if len(data) < length:
        raise ValueError(f"{path}: truncated record of {length} bytes")
      yield data


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] in step order, from every event file under `logdir` (e.g. WORKDIR/tensorboard);
  a step logged twice (a resumed run) keeps its last value."""
  files = sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*"))
  if not files:
    raise FileNotFoundError(f"read_scalars: no TensorBoard event files under {logdir}")
  by_tag: dict[str, dict[int, float]] = collections.defaultdict(dict)
  for path in files:
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          by_tag[value.tag][int(event.step)] = float(value.simple_value)
  return {tag: sorted(points.items()) for tag, points in sorted(by_tag.items())}
