"""Lay an outline out as a picture: items left to right in model order under headers naming
their stage and block, wrapped into rows; under each row the bands (residual streams, shared
features) in lanes, with a connector from every item that reads or writes them.

Everything here is geometry: the result is a :class:`scene.Scene` of rectangles, paths and
labels that ``svg.py`` and ``picture.py`` draw without further decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .explain import space_status
from .matching import SpaceMatch
from .names import common_prefix, relative
from .outline import Item, Outline, group_word
from .scene import (HEIGHT, Label, Path, Rect, Scene, arrow_head, clip, text_width, union_box,
                    wrap)

FONT, SMALL, TITLE = 11.0, 9.5, 14.0
PAD = 6.0
MAXC = 30                 # characters per line inside an item
MARGIN = 16.0
LANE, BAND_H = 17.0, 13.0
HEADER = 17.0
ARROW = " \u2192 "

COLORS = {
    "free_fill": "#e4f3e1", "free_edge": "#3d8b40", "free_text": "#2e7d32",
    "fixed_fill": "#ececec", "fixed_edge": "#8c8c8c", "fixed_text": "#9b2d20",
    "head_fill": "#e8eefb", "head_edge": "#3f62b5", "cell": "#9db8ea", "cell_fixed": "#c9c9c9",
    "stream": "#3f7fbf", "shared": "#9cc5ea", "band_fixed": "#a3a3a3",
    "link_fill": "#ffffff", "link_edge": "#6b6b6b", "barrier_fill": "#fbe1dc", "barrier_edge": "#c0392b",
    "text": "#222222", "muted": "#555555", "wire": "#7a7a7a", "header": "#34495e",
}


@dataclass
class _Text:
    text: str
    size: float
    color: str
    bold: bool = False


@dataclass
class _Cells:
    n: int
    free: bool


@dataclass
class _Measured:
    item: Item
    rows: list
    w: float
    h: float
    fill: str
    stroke: str
    dash: bool = False


def _row_h(row) -> float:
    return 12.0 if isinstance(row, _Cells) else row.size * 1.35


def _status_rows(why: str) -> list[_Text]:
    if why.startswith("free"):
        return [_Text("free", SMALL, COLORS["free_text"])]
    return [_Text(t, SMALL, COLORS["fixed_text"]) for t in wrap(why, MAXC + 4, 2)]


def _space_tag(ol: Outline, it: Item, t: int, word: str, tied: Sequence[int]) -> str:
    pg = ol.pg
    if word == "heads" and len(tied) == 2:
        return "v" if any(m.role == "in" for m in pg.spaces[t].members) else "q\u00b7k"
    writers = [m.fqn.rpartition(".")[0] for m in pg.spaces[t].members if m.role == "out"]
    return relative(writers[0], it.block) if writers else f"S{t}"


def _measure(ol: Outline, it: Item, matches: Optional[Mapping[int, SpaceMatch]]) -> _Measured:
    pg = ol.pg
    C = COLORS
    folded = f" \u00b7 \u00d7{len(it.copies)}" if len(it.copies) > 1 else ""
    rows: list = []
    if it.kind == "barrier":
        node, _, reason = it.note.partition(": ")
        rows.append(_Text("barrier", FONT, C["barrier_edge"], True))
        rows += [_Text(t, SMALL, C["text"]) for t in wrap(node, MAXC + 4, 2)]
        rows += [_Text(t, SMALL, C["fixed_text"]) for t in wrap(reason, MAXC + 4, 3)]
        fill, stroke, dash = C["barrier_fill"], C["barrier_edge"], False
    elif it.kind == "link":
        src = ", ".join(f"S{s}" for s in it.reads) or "(fixed)"
        dst = ", ".join(f"S{s}" for s in it.writes)
        name = relative(it.modules[0], it.block) if it.modules[0] else "(function)"
        if name.split(".")[-1].isdigit():  # a Sequential index says little: add the layer's class
            try:
                name += f" {type(pg.gm.get_submodule(it.modules[0])).__name__}"
            except AttributeError:
                pass
        rows.append(_Text(wrap(name, MAXC, 1)[0], FONT, C["text"], True))
        rows.append(_Text(clip(f"{src}{ARROW}{dst}{folded}", (MAXC + 4) * 0.61 * SMALL, SMALL), SMALL, C["muted"]))
        fill, stroke, dash = C["link_fill"], C["link_edge"], True
    elif it.kind == "group":
        h, tied = it.spaces[0], it.spaces[1:]
        G = pg.spaces[h].size
        word = group_word(pg, it)
        prefix = relative(common_prefix(it.modules), it.block) if common_prefix(it.modules) else ""
        title = f"{prefix} \u00b7 {word} \u00d7{G}" if prefix else f"{word} \u00d7{G}"
        rows += [_Text(t, FONT, C["text"], True) for t in wrap(title, MAXC, 2)]
        rows.append(_Text(f"S{h} \u00b7 {G} {word.split()[-1]}{folded}", SMALL, C["muted"]))
        for t in tied:
            sp = pg.spaces[t]
            g = sp.blocks[1] if sp.blocks else sp.size
            kept = " \u00b7 order kept" if sp.within != "free" else ""
            tag = _space_tag(ol, it, t, word, tied)
            rows.append(_Text(clip(f"{tag} S{t} \u00b7 {sp.size} = {G}\u00d7{g}{kept}", (MAXC + 4) * 0.61 * SMALL, SMALL),
                              SMALL, C["text"]))
            rows.append(_Cells(G, pg.is_free(t)))
            if matches is not None and t in matches:
                rows.append(_Text(clip(matches[t].short(), (MAXC + 4) * 0.61 * SMALL, SMALL), SMALL, C["muted"]))
        whys = [space_status(pg, s).why for s in it.spaces]
        rows += _status_rows(next((w for w in whys if not w.startswith("free")), "free"))
        free = any(pg.is_free(s) for s in it.spaces)
        fill, stroke, dash = (C["head_fill"], C["head_edge"], False) if free else (C["fixed_fill"], C["fixed_edge"], False)
    else:
        s = it.spaces[0]
        sp = pg.spaces[s]
        label = it.label.replace(" -> ", ARROW) or f"space S{s}"
        rows += [_Text(t, FONT, C["text"], True) for t in wrap(label, MAXC, 2)]
        struct = f" = {sp.blocks[0]}\u00d7{sp.blocks[1]}" if sp.blocks else ""
        unit = " heads" if sp.kind == "head" else ""
        rows.append(_Text(f"S{s} \u00b7 {sp.size}{unit}{struct}{folded}", SMALL, C["muted"]))
        if sp.blocks:
            rows.append(_Cells(sp.blocks[0], pg.is_free(s)))
        rows += _status_rows(space_status(pg, s).why)
        if matches is not None and s in matches and matches[s].method != "fixed":
            rows.append(_Text(clip(matches[s].short(), (MAXC + 4) * 0.61 * SMALL, SMALL), SMALL, C["muted"]))
        free = pg.is_free(s)
        fill, stroke = (C["free_fill"], C["free_edge"]) if free else (C["fixed_fill"], C["fixed_edge"])
        dash = False
    w = max([text_width(r.text, r.size) for r in rows if isinstance(r, _Text)] +
            [min(r.n, 64) * 4.0 for r in rows if isinstance(r, _Cells)] + [56.0]) + 2 * PAD
    h = sum(_row_h(r) for r in rows) + 2 * PAD - 0.18 * SMALL
    return _Measured(it, rows, w, h, fill, stroke, dash)


def _gap(prev: Optional[Item], it: Item) -> float:
    if prev is None:
        return 0.0
    if prev.block and prev.block == it.block:
        return 20.0
    if prev.stage and prev.stage == it.stage:
        return 28.0
    return 36.0


def _item_primitives(m: _Measured, x: float, y: float, rects, labels) -> None:
    it = m.item
    if len(it.copies) > 1:  # folded: a second outline behind says "more than one"
        rects.append(Rect(x - 3, y - 3, m.w + 6, m.h + 6, "none", m.stroke, 1.0, True, 5.0, it.key, 1, "fold"))
    rects.append(Rect(x, y, m.w, m.h, m.fill, m.stroke, 1.3, m.dash, 3.0, it.key, 2, "box"))
    cy = y + PAD
    for r in m.rows:
        if isinstance(r, _Cells):
            n = min(r.n, 64)
            cw = (m.w - 2 * PAD) / n
            for c in range(n):
                rects.append(Rect(x + PAD + c * cw, cy + 1, max(cw - 1.0, 1.0), 9.0,
                                  COLORS["cell"] if r.free else COLORS["cell_fixed"], "none", 0, False, 0.5, it.key, 3, "cell"))
        else:
            labels.append(Label(x + PAD, cy, r.text, r.size, r.color, r.bold, it.key))
        cy += _row_h(r)


def _band_text(ol: Outline, band: Item, matches) -> str:
    pg = ol.pg
    s = band.spaces[0]
    sp = pg.spaces[s]
    kind = band.note.partition(":")[0].partition(" (")[0]
    parts = [t for t in band.spaces if pg.spaces[t].kind == "unit"]
    if len(parts) > 1:
        total = sum(pg.spaces[t].size for t in parts)
        text = f"S{parts[0]}+\u2026+S{parts[-1]} \u00b7 cat of {len(parts)} \u00b7 {total} \u00b7 {kind}"
    else:
        text = f"S{s} \u00b7 {sp.size} \u00b7 {kind}"
    if sp.blocks:
        text += f" \u00b7 {sp.blocks[0]}\u00d7{sp.blocks[1]} groups"
    if not pg.is_free(s):
        text += " \u00b7 " + space_status(pg, s).why
    if matches is not None and s in matches and matches[s].method != "fixed":
        text += " \u00b7 " + matches[s].short()
    return text


def _lanes(segments: list[tuple[float, float, int]]) -> dict[int, int]:
    """First-fit lanes for [x0, x1] segments (keyed by band), leftmost first."""
    ends: list[float] = []
    out = {}
    for x0, x1, b in sorted(segments):
        for lane, end in enumerate(ends):
            if end + 10 < x0:
                ends[lane] = x1
                out[b] = lane
                break
        else:
            out[b] = len(ends)
            ends.append(x1)
    return out


def arrange(ol: Outline, items: Sequence[Item], *, title: str = "", subtitle: str = "",
            matches: Optional[Mapping[int, SpaceMatch]] = None, row_width: float = 1400.0,
            legend: bool = True) -> Scene:
    """The picture of ``items`` (the outline's items, folded or not)."""
    C = COLORS
    items = list(items)
    measured = [_measure(ol, it, matches) for it in items]
    rects: list[Rect] = []
    paths: list[Path] = []
    labels: list[Label] = []
    boxes: dict[str, list] = {}

    y = MARGIN
    if title:
        labels.append(Label(MARGIN, y, title, TITLE, C["text"], True))
        y += TITLE * 1.45
    if subtitle:
        for line in wrap(subtitle, int((min(row_width, 1000.0) - 2 * MARGIN) / (0.61 * FONT)), 3):
            labels.append(Label(MARGIN, y, line, FONT, C["muted"]))
            y += FONT * 1.4
    y += 8

    # rows: greedy, breaking between items
    rows: list[list[tuple[int, float]]] = []
    x = MARGIN
    cur: list[tuple[int, float]] = []
    for k, m in enumerate(measured):
        gap = _gap(items[k - 1] if cur else None, m.item)
        if cur and x + gap + m.w > row_width - MARGIN:
            rows.append(cur)
            cur, x, gap = [], MARGIN, 0.0
        cur.append((k, x + gap))
        x += gap + m.w
    if cur:
        rows.append(cur)

    bands = {b.spaces[0]: b for b in ol.bands}
    touch: dict[int, list[int]] = {b: [] for b in bands}
    for k, it in enumerate(items):
        for b in set(it.reads) | set(it.writes):
            if b in touch:
                touch[b].append(k)
    for b, ks in touch.items():  # a band nothing visible touches: anchor it at its model position
        if not ks and items:
            ks.append(min(range(len(items)), key=lambda k: abs(items[k].pos - bands[b].pos)))
    width = 0.0

    for row in rows:
        first, last = row[0][0], row[-1][0]
        right = max(x + measured[k].w for k, x in row)
        has_stage = any(items[k].stage for k, _ in row)
        has_block = any(items[k].block for k, _ in row)
        y_stage = y
        y_block = y + (HEADER if has_stage else 0)
        top = y_block + (HEADER if has_block else 0) + 4
        for level, y_h in (("stage", y_stage), ("block", y_block)):
            k0 = 0
            while k0 < len(row):
                key = getattr(items[row[k0][0]], level)
                k1 = k0
                while k1 + 1 < len(row) and getattr(items[row[k1 + 1][0]], level) == key:
                    k1 += 1
                if key:
                    x0 = row[k0][1]
                    x1 = row[k1][1] + measured[row[k1][0]].w
                    it = items[row[k0][0]]
                    text = key if level == "stage" else relative(key, it.stage) if it.stage else key
                    if level == "block" and len(it.blocks) > 1:
                        text = (f"{relative(it.blocks[0], it.stage)} \u2026 {relative(it.blocks[-1], it.stage)}"
                                f" \u00b7 \u00d7{len(it.blocks)} folded")
                    size = SMALL if level == "block" else FONT
                    labels.append(Label(x0, y_h, clip(text, x1 - x0, size), size, C["header"], level == "stage"))
                    ly = y_h + HEIGHT * size + 2
                    paths.append(Path(((x0, ly + 3), (x0, ly), (x1, ly), (x1, ly + 3)), C["header"], 1.0, z=1))
                k0 = k1 + 1
        H = 0.0
        for k, x in row:
            m = measured[k]
            _item_primitives(m, x, top, rects, labels)
            boxes.setdefault(m.item.key, []).append((x, top, m.w, m.h))
            H = max(H, m.h)
        for (k, x), (k2, x2) in zip(row, row[1:]):  # a local space feeding the next item
            if set(items[k].feeds) & set(items[k2].spaces):
                ay = top + 10
                x_end = x + measured[k].w
                paths.append(Path(((x_end + 1, ay), (x2 - 1, ay)), C["wire"], 1.2, z=4))
                paths.append(Path(arrow_head(x2 - 1, ay, 1, 0), C["wire"], 1.0, C["wire"], z=4))

        # bands of this row: the part between the first and last item that touches them
        conn: dict[int, list[tuple[int, float, str]]] = {}
        for k, x in row:
            it, w = items[k], measured[k].w
            for i, b in enumerate(it.reads):
                conn.setdefault(b, []).append((k, x + 9 + 7 * i, "read"))
            for i, b in enumerate(it.writes):
                conn.setdefault(b, []).append((k, x + w - 9 - 7 * i, "write"))
        segs = []
        for b, ks in touch.items():
            before = any(k < first for k in ks)
            after = any(k > last for k in ks)
            xs = [cx for _, cx, _ in conn.get(b, [])]
            if not xs and not (before and after):
                if not any(first <= k <= last for k in ks):
                    continue
                k = next(k for k in ks if first <= k <= last)
                xs = [dict(row)[k] + measured[k].w / 2]
            x0 = MARGIN - 6 if before else (min(xs) - 8 if xs else MARGIN - 6)
            x1 = right + 6 if after else (max(xs) + 8 if xs else right + 6)
            if before and not after:  # a stream ending early in this row: room for its id at least
                x1 = max(x1, x0 + text_width(f"S{b}", SMALL) + 16)
            segs.append((x0, x1, b))
        lanes = _lanes(segs)
        lane_top = top + H + 14
        for x0, x1, b in segs:
            band = bands[b]
            by = lane_top + lanes[b] * LANE
            s = band.spaces[0]
            color = C["band_fixed"] if not ol.pg.is_free(s) else C["stream"] if band.note.startswith("stream") else C["shared"]
            rects.append(Rect(x0, by, x1 - x0, BAND_H, color, "none", 0, False, 6.0, band.key, 0, "band"))
            boxes.setdefault(band.key, []).append((x0, by, x1 - x0, BAND_H))
            dark = color == C["stream"]
            text = clip(_band_text(ol, band, matches), x1 - x0 - 12, SMALL)
            if text:
                tx = x0 + 6
                labels.append(Label(tx, by + (BAND_H - HEIGHT * SMALL) / 2, text, SMALL,
                                    "#ffffff" if dark else C["text"], False, band.key, 2))
            for k, cx, how in conn.get(b, []):
                bottom = top + measured[k].h
                if how == "write":
                    paths.append(Path(((cx, bottom), (cx, by - 1)), C["wire"], 1.1, key=band.key, z=-1))
                    paths.append(Path(arrow_head(cx, by - 0.5, 0, 1, 4.5), C["wire"], 1.0, C["wire"], z=4))
                else:
                    paths.append(Path(((cx, by), (cx, bottom + 1)), C["wire"], 1.1, key=band.key, z=-1))
                    paths.append(Path(arrow_head(cx, bottom + 0.5, 0, -1, 4.5), C["wire"], 1.0, C["wire"], z=4))
        n_lanes = (max(lanes.values()) + 1) if lanes else 0
        y = lane_top + n_lanes * LANE + 22
        width = max(width, right + MARGIN)

    if legend:  # as wide as the rows (a narrow model gets a narrow picture), at least 720 px
        y = _legend(y, min(row_width, max(width, 720.0)), rects, labels,
                    folded=any(len(it.copies) > 1 for it in items))
    width = max([width] + [lab.box[0] + lab.box[2] + MARGIN for lab in labels])
    boxes = {k: [union_box(v)] if k.startswith("b") else v for k, v in boxes.items()}
    rects.sort(key=lambda r: r.z)
    paths.sort(key=lambda p: p.z)
    labels.sort(key=lambda lab: lab.z)
    return Scene(width, y + MARGIN, tuple(rects), tuple(paths), tuple(labels), boxes, title)


def _legend(y: float, row_width: float, rects: list, labels: list, folded: bool) -> float:
    C = COLORS
    entries = [
        ("free space (permutable)", C["free_fill"], C["free_edge"], False),
        ("fixed space (with reason)", C["fixed_fill"], C["fixed_edge"], False),
        ("heads / groups: blocks move together", C["head_fill"], C["head_edge"], False),
        ("stream: several layers write it (residual add, gate)", C["stream"], "none", False),
        ("shared features (read further on)", C["shared"], "none", False),
        ("fixed band", C["band_fixed"], "none", False),
        ("writes a band, no own space", C["link_fill"], C["link_edge"], True),
        ("barrier (no rule / not permutable)", C["barrier_fill"], C["barrier_edge"], False),
    ]
    if folded:
        entries.append(("\u00d7k: k identical blocks drawn once", "none", C["free_edge"], True))
    x = MARGIN
    y += 4
    for text, fill, stroke, dash in entries:
        w = 16 + 6 + text_width(text, SMALL)
        if x + w > row_width - MARGIN:
            x, y = MARGIN, y + 18
        rects.append(Rect(x, y + 1, 16, 10, fill, stroke, 1.0, dash, 2.0, "", 2))
        labels.append(Label(x + 22, y, text, SMALL, C["text"]))
        x += w + 18
    arrows = "\u25b2 item reads the band   \u25bc item writes the band   \u2192 feeds the next item"
    if x + text_width(arrows, SMALL) > row_width - MARGIN:
        x, y = MARGIN, y + 18
    labels.append(Label(x, y, arrows, SMALL, C["muted"]))
    return y + 18
