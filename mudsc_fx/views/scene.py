"""Primitives of a picture, in pixels: rectangles, paths and text labels.

The layout (``layout.py``) produces a :class:`Scene`; ``svg.py`` and ``picture.py`` only draw
it. Text is set in a monospace font, so a label's box is known exactly from its length (the
advance of DejaVu Sans Mono, the font matplotlib ships, is 0.602 em): the layout keeps labels
inside their boxes and :meth:`Scene.overlaps` checks that no two labels intersect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

CHAR = 0.61           # advance of one character, in em (DejaVu Sans Mono 0.602, with slack)
ASCENT = 0.80         # baseline below the top of a label's box, in em
HEIGHT = 1.17         # height of a label's box (ascent + descent), in em
FONT_FAMILY = "DejaVu Sans Mono, Menlo, Consolas, Liberation Mono, monospace"


def text_width(text: str, size: float) -> float:
    return len(text) * CHAR * size


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str
    stroke: str = "none"
    width: float = 1.0
    dash: bool = False
    radius: float = 3.0
    key: str = ""                 # the item or band it belongs to (interactive page)
    z: int = 0
    role: str = ""                # box | cell | band | fold (the page styles them)


@dataclass(frozen=True)
class Path:
    points: tuple[tuple[float, float], ...]
    stroke: str
    width: float = 1.0
    fill: str = "none"
    dash: bool = False
    key: str = ""
    z: int = 1


@dataclass(frozen=True)
class Label:
    x: float                      # left edge
    y: float                      # top edge (baseline at y + ASCENT * size)
    text: str
    size: float
    color: str = "#222222"
    bold: bool = False
    key: str = ""
    z: int = 3

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x, self.y, text_width(self.text, self.size), HEIGHT * self.size

    @property
    def baseline(self) -> float:
        return self.y + ASCENT * self.size


@dataclass(frozen=True)
class Scene:
    width: float
    height: float
    rects: tuple[Rect, ...]
    paths: tuple[Path, ...]
    labels: tuple[Label, ...]
    boxes: dict = field(default_factory=dict)   # key -> [(x, y, w, h)] of the item or band
    title: str = ""

    def overlaps(self) -> list[tuple[Label, Label]]:
        """Pairs of labels whose boxes intersect (an empty list for a readable picture)."""
        boxes = [(lab.box, lab) for lab in self.labels if lab.text.strip()]
        boxes.sort(key=lambda b: b[0][0])
        out = []
        active: list[tuple[tuple, Label]] = []
        for box, lab in boxes:
            x, y, w, h = box
            active = [(b, other) for b, other in active if b[0] + b[2] > x]
            for b, other in active:
                if b[1] < y + h and y < b[1] + b[3] and b[0] < x + w and x < b[0] + b[2]:
                    out.append((other, lab))
            active.append((box, lab))
        return out

    def outside(self) -> list[Label]:
        """Labels that stick out of the canvas."""
        return [lab for lab in self.labels
                if lab.box[0] < 0 or lab.box[1] < 0 or lab.box[0] + lab.box[2] > self.width + 0.5
                or lab.box[1] + lab.box[3] > self.height + 0.5]


def wrap(text: str, chars: int, lines: int) -> list[str]:
    """Break ``text`` into at most ``lines`` lines of at most ``chars`` characters, at arrows,
    semicolons or spaces; the last line ends in an ellipsis when text is left over."""
    chars = max(chars, 4)
    words = text.replace(" \u2192 ", " \u2192\u00a0").split(" ")
    out: list[str] = []
    cur = ""
    for w in words:
        w = w.replace("\u00a0", " ")
        cand = w if not cur else cur + " " + w
        if len(cand) <= chars:
            cur = cand
            continue
        if cur:
            out.append(cur)
        cur = w
        while len(cur) > chars:
            out.append(cur[:chars])
            cur = cur[chars:]
    if cur:
        out.append(cur)
    out = [line.rstrip() for line in out]
    if len(out) > lines:
        out = out[:lines]
        last = out[-1]
        out[-1] = (last[:chars - 1] if len(last) >= chars else last) + "\u2026"
    return out


def clip(text: str, width: float, size: float) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels; '' when not even 2 chars fit."""
    n = int(width / (CHAR * size))
    if len(text) <= n:
        return text
    return text[:n - 1] + "\u2026" if n >= 3 else ""


def arrow_head(x: float, y: float, dx: float, dy: float, size: float = 5.0) -> tuple:
    """Triangle points for an arrow ending at (x, y) travelling along (dx, dy) (unit)."""
    px, py = -dy, dx
    return ((x, y), (x - dx * size + px * size * 0.55, y - dy * size + py * size * 0.55),
            (x - dx * size - px * size * 0.55, y - dy * size - py * size * 0.55), (x, y))


def union_box(boxes) -> Optional[tuple[float, float, float, float]]:
    if not boxes:
        return None
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return x0, y0, x1 - x0, y1 - y0
