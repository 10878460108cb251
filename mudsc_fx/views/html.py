"""One self-contained HTML page for a permutation graph or a merge result.

The page inlines the picture as SVG (folded and unfolded when folding changes anything), its
data as JSON, and its script and style: it loads nothing at view time. Clicking or hovering a
box shows its spaces (members, taps, why free or fixed, the matching of a merge); the search
box finds a parameter and shows where it lives and why.
"""
from __future__ import annotations

import json
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..ir.graph import PermutationGraph
from ..ir.layout import describe, spaces_of
from .arrange import arrange
from .explain import param_index, space_status, structure
from .fold import fold as fold_items, should_fold
from .matching import describe_config, space_matches
from .names import chain
from .outline import Item, Outline, item_title, outline
from .svg import to_svg

_KIND_TEXT = {
    "space": "a hidden space local to its block",
    "group": "blocks (heads or groups) that move together, and the spaces they order",
    "link": "a producer that writes a band without a space of its own",
    "barrier": "a node the inference stops at: the spaces it touches stay fixed",
    "band": "a space read and written along the model (residual stream) or read further on",
}


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _band_title(ol: Outline, band: Item) -> str:
    return f"S{band.spaces[0]} {band.note}"


def _item_record(ol: Outline, it: Item) -> dict:
    return {"kind": it.kind, "kind_text": _KIND_TEXT[it.kind],
            "title": _band_title(ol, it) if it.kind == "band" else item_title(ol, it),
            "spaces": list(it.spaces), "copies": [list(c) for c in it.copies], "blocks": list(it.blocks),
            "note": it.note, "reads": list(it.reads), "writes": list(it.writes),
            "block": it.block, "stage": it.stage}


def _space_records(pg: PermutationGraph, ol: Outline, elements: dict, matches: Optional[dict]) -> list:
    taps: dict[int, list] = {}
    for direction, tap_list in (("in", pg.in_taps), ("out", pg.out_taps)):
        for t in tap_list:
            proj = None if t.proj is None else f"{t.proj[0]}[{t.proj[2]}:{t.proj[3]}]"
            for s in dict.fromkeys(spaces_of(t.layout)):
                taps.setdefault(s, []).append({"dir": direction, "node": t.node, "axis": t.axis,
                                               "layout": describe(t.layout), "proj": proj})
    ties = pg.ties()
    where = {s: chain(it.modules, limit=6) for it in ol.items for s in it.spaces}
    where.update({s: b.note for b in ol.bands for s in b.spaces})
    out = []
    for sp in pg.spaces:
        m = None if matches is None else matches.get(sp.id)
        out.append({
            "id": sp.id, "size": sp.size, "kind": sp.kind, "free": pg.is_free(sp.id),
            "why": space_status(pg, sp.id).why, "structure": structure(pg, sp.id),
            "fixed_by": sorted(sp.fixed_by), "blocks": list(sp.blocks) if sp.blocks else None,
            "head": sp.head, "within": sp.within, "ties": list(ties.get(sp.id, ())),
            "title": where.get(sp.id, ""),
            "element": {view: elements[view].get(sp.id) for view in elements},
            "members": [{"param": mm.fqn, "axis": mm.axis, "role": mm.role, "layout": describe(mm.layout)}
                        for mm in sp.members],
            "taps": taps.get(sp.id, []),
            "match": None if m is None else {"method": m.method, "similarity": m.similarity, "within": m.within,
                                             "merged": m.merged, "dead": m.dead},
        })
    return out


def page_data(source: Any, *, title: str = "", fold: str = "auto", row_width: float = 1400.0) -> tuple[dict, dict]:
    """(data embedded in the page, {view name: Scene})."""
    pg, result = (source.graph, source) if hasattr(source, "alignment") else (source, None)
    if not isinstance(pg, PermutationGraph):
        raise TypeError(f"expected a PermutationGraph or a merge result, got {type(source).__name__}")
    matches = space_matches(result) if result is not None else None
    ol = outline(pg)
    subtitle = (f"{len(pg.spaces)} spaces ({len(pg.free_spaces)} free), {len(pg.members)} members, "
                f"{len(pg.barriers)} barriers, coverage {pg.coverage():.3f}")
    if result is not None:
        subtitle += f"; merged with {describe_config(result)}"
    title = title or "permutation graph"
    views: dict[str, tuple[Item, ...]] = {}
    folded = fold_items(pg, ol.items)
    if folded != ol.items and fold != "never":
        views["folded"] = folded
    views["full"] = ol.items
    default = "folded" if "folded" in views and should_fold(ol.items, fold) else "full"
    scenes = {v: arrange(ol, items, title=title, subtitle=subtitle, matches=matches, row_width=row_width)
              for v, items in views.items()}
    elements: dict[str, dict[int, str]] = {}
    for v, items in views.items():
        el: dict[int, str] = {}
        for it in list(items) + list(ol.bands):
            for copy in (it.copies or (it.spaces,)):
                for s in copy:
                    el.setdefault(s, it.key)
        elements[v] = el
    records = {v: {it.key: _item_record(ol, it) for it in list(items) + list(ol.bands)} for v, items in views.items()}
    data = {
        "title": title, "subtitle": subtitle, "views": list(views), "default_view": default,
        "coverage": pg.coverage(),
        "merge": None if result is None else {"config": describe_config(result)},
        "spaces": _space_records(pg, ol, elements, matches),
        "items": records,
        "params": param_index(pg),
        "barriers": [{"node": b.node, "op": b.op, "reason": b.reason} for b in pg.barriers],
        "boxes": {v: {k: [list(b) for b in boxes] for k, boxes in sc.boxes.items()} for v, sc in scenes.items()},
    }
    return data, scenes


def to_html(source: Any, *, title: str = "", fold: str = "auto", row_width: float = 1400.0) -> str:
    """The page as a string (see :func:`write_html`)."""
    data, scenes = page_data(source, title=title, fold=fold, row_width=row_width)
    svgs = []
    for v, sc in scenes.items():
        svg = to_svg(sc, standalone=False, element_id=f"view-{v}")
        svg = svg.replace("<svg ", f'<svg data-w="{sc.width:.0f}" data-h="{sc.height:.0f}" preserveAspectRatio="xMinYMin meet" '
                                   f'style="display:{"block" if v == data["default_view"] else "none"}" ', 1)
        svgs.append(svg)
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # no tag can end the script
    fold_toggle = ('<label><input type="checkbox" id="fold"> fold repeated blocks</label>'
                   if "folded" in scenes else "")
    colour = ('<select id="colour"><option value="status">colour: free / fixed</option>'
              '<option value="quality">colour: matching quality</option></select>'
              if data["merge"] is not None else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(data['title'])}</title>
<style>{_asset('page.css')}</style>
</head><body>
<header>
<h1>{escape(data['title'])}</h1><span class="stats">{escape(data['subtitle'])}</span>
<div class="controls">
<div id="searchbox"><input id="search" type="search" placeholder="find a parameter (or S12)" autocomplete="off" spellcheck="false">
<ul id="results"></ul></div>
{fold_toggle}{colour}
<button id="zin" title="zoom in">+</button><button id="zout" title="zoom out">&minus;</button><button id="fit">fit</button>
</div></header>
<main><div id="canvas">{''.join(svgs)}<div id="zoomhint">scroll: zoom &middot; drag: pan &middot; click a box: details</div></div>
<aside id="panel"></aside></main>
<div id="tip"></div>
<script type="application/json" id="graph-data">{payload}</script>
<script>{_asset('page.js')}</script>
</body></html>
"""


def write_html(source: Any, path: str | Path, **kw: Any) -> Path:
    """Write the page for ``source`` (a PermutationGraph, or a merge result with ``.graph``,
    ``.alignment`` and ``.stats``) to ``path``.

    >>> # mf.views.write_html(mf.infer(model, x), "graph.html")
    >>> # mf.views.write_html(mf.Merger(models, data).merge("zipit"), "merge.html")
    """
    path = Path(path)
    path.write_text(to_html(source, **kw), encoding="utf-8")
    return path
