"""A procedural image-caption set: coloured shapes in the quadrants of a small image, with Chinese captions and
questions, rendered deterministically with numpy from a seed.

Each scene holds one to three shapes (圆形, 正方形, 三角形 in 红色, 绿色, 蓝色 or 黄色), at most one per quadrant
(左上角, 右上角, 左下角, 右下角), 60-90% of the quadrant wide, its centre jittered, anti-aliased, on a noisy light
background. The caption names
every shape in reading order ("左上角有一个红色的圆形，右下角有一个蓝色的三角形。"); one question per scene, of one
of five kinds (QUESTION_TYPES), with a short answer ("图中有几个三角形？" -> "一个").
"""

from __future__ import annotations

import dataclasses

import numpy as np

POSITIONS = ("左上角", "右上角", "左下角", "右下角")  # quadrants in reading order: (row, col) = divmod(index, 2)
COLORS = {"红色": (215, 40, 40), "绿色": (40, 160, 60), "蓝色": (40, 80, 215), "黄色": (225, 195, 30)}
SHAPES = ("圆形", "正方形", "三角形")
COUNTS = ("零个", "一个", "两个", "三个", "四个")
QUESTION_TYPES = ("count_shape", "count_all", "color_at", "shape_at", "has_color")
MAX_SHAPES = 3


@dataclasses.dataclass(frozen=True)
class Shape:
  position: int  # index into POSITIONS
  color: str
  kind: str


@dataclasses.dataclass(frozen=True)
class Scene:
  image: np.ndarray  # uint8 [size, size, 3]
  shapes: tuple[Shape, ...]  # sorted by position
  caption: str
  question: str
  answer: str
  question_type: str


def _mask(kind: str, dy: np.ndarray, dx: np.ndarray, extent: float) -> np.ndarray:
  """Pixels inside a shape of full width/height `extent`, offsets dy, dx from its centre (y down)."""
  half = extent / 2
  if kind == "圆形":
    return dy ** 2 + dx ** 2 <= half ** 2
  if kind == "正方形":
    return (np.abs(dy) <= half) & (np.abs(dx) <= half)
  return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)  # 三角形: apex up, base at the bottom


def caption(shapes: tuple[Shape, ...]) -> str:
  return "，".join(f"{POSITIONS[s.position]}有一个{s.color}的{s.kind}" for s in shapes) + "。"


def question(shapes: tuple[Shape, ...], rng: np.random.Generator) -> tuple[str, str, str]:
  """(question, answer, question type) about the shapes, the type drawn uniformly from QUESTION_TYPES."""
  kind = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
  if kind == "count_shape":
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return f"图中有几个{shape}？", COUNTS[sum(s.kind == shape for s in shapes)], kind
  if kind == "count_all":
    return "图中一共有几个图形？", COUNTS[len(shapes)], kind
  if kind == "has_color":
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    return f"图中有{color}的图形吗？", "有" if any(s.color == color for s in shapes) else "没有", kind
  target = shapes[int(rng.integers(len(shapes)))]
  if kind == "color_at":
    return f"{POSITIONS[target.position]}的图形是什么颜色？", target.color, kind
  return f"{POSITIONS[target.position]}是什么图形？", target.kind, kind


def render(rng: np.random.Generator, size: int = 32, supersample: int = 4) -> Scene:
  """One scene drawn from `rng` (same generator state, same scene). Shapes are drawn on a grid `supersample` times
  finer and averaged down, so their edges are anti-aliased (a circle of 10 pixels still looks round)."""
  count = int(rng.integers(1, MAX_SHAPES + 1))
  positions = np.sort(rng.choice(len(POSITIONS), count, replace=False))
  colors, kinds = list(COLORS), SHAPES
  shapes = tuple(Shape(int(p), colors[int(rng.integers(len(colors)))], kinds[int(rng.integers(len(kinds)))])
                 for p in positions)
  image = 235.0 + rng.normal(0.0, 6.0, (size, size, 3))
  y, x = (np.mgrid[:size * supersample, :size * supersample] + 0.5) / supersample
  quadrant = size / 2
  for shape in shapes:
    extent = quadrant * rng.uniform(0.6, 0.9)
    slack = (quadrant - extent) / 2
    row, col = divmod(shape.position, 2)
    cy, cx = ((np.array([row, col]) + 0.5) * quadrant + rng.uniform(-slack, slack, 2))
    color = np.array(COLORS[shape.color]) + rng.normal(0.0, 8.0, 3)
    cover = _mask(shape.kind, y - cy, x - cx, extent).reshape(size, supersample, size, supersample).mean((1, 3))
    image = image * (1 - cover[:, :, None]) + color * cover[:, :, None]
  text, answer, question_type = question(shapes, rng)
  return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), shapes, caption(shapes), text, answer,
               question_type)
