"""The picture of a permutation graph: a Scene drawn to .png / .pdf with matplotlib, or
written as .svg directly. No graphviz needed."""
from __future__ import annotations

from pathlib import Path as FilePath
from typing import Any, Optional

from .scene import Scene

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def draw(scene: Scene, path: str | FilePath, dpi: int = 110) -> FilePath:
    """Write ``scene`` to ``path`` (.svg by hand; .png/.pdf through matplotlib's Agg)."""
    path = FilePath(path)
    if path.suffix not in PICTURE_SUFFIXES:
        raise ValueError(f"cannot draw a picture to {path.name}: use one of {', '.join(PICTURE_SUFFIXES)}")
    if path.suffix == ".svg":
        from .svg import to_svg
        path.write_text(to_svg(scene))
        return path
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Polygon
    from matplotlib.patches import Rectangle as MplRect

    px = 72.0 / dpi  # points per pixel: sizes in the scene are pixels
    # unhinted glyphs advance 0.602 em as the scene assumes; hinting rounds them up to whole pixels
    with matplotlib.rc_context({"text.hinting": "no_hinting", "text.hinting_factor": 1}):
        _draw_mpl(scene, path, dpi, px, plt, FancyBboxPatch, Polygon, MplRect)
    return path


def _draw_mpl(scene, path, dpi, px, plt, FancyBboxPatch, Polygon, MplRect) -> None:
    fig = plt.figure(figsize=(scene.width / dpi, scene.height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, scene.width)
    ax.set_ylim(scene.height, 0)
    ax.axis("off")
    prims = [(r.z, 0, i, r) for i, r in enumerate(scene.rects)]
    prims += [(p.z, 1, i, p) for i, p in enumerate(scene.paths)]
    prims += [(t.z, 2, i, t) for i, t in enumerate(scene.labels)]
    prims.sort(key=lambda p: (p[0], p[1], p[2]))
    for order, (_, kind, _, prim) in enumerate(prims):
        if kind == 0:
            r = prim
            kw = dict(facecolor=r.fill if r.fill != "none" else "none",
                      edgecolor=r.stroke if r.stroke != "none" else "none",
                      linewidth=r.width * px if r.stroke != "none" else 0,
                      linestyle=(0, (4, 3)) if r.dash else "solid", zorder=order)
            if r.radius > 1 and r.w > 2 * r.radius and r.h > 2 * r.radius:
                patch = FancyBboxPatch((r.x + r.radius, r.y + r.radius), r.w - 2 * r.radius, r.h - 2 * r.radius,
                                       boxstyle=f"round,pad={r.radius}", **kw)
            else:
                patch = MplRect((r.x, r.y), r.w, r.h, **kw)
            ax.add_patch(patch)
        elif kind == 1:
            p = prim
            if p.fill != "none":
                ax.add_patch(Polygon(p.points, closed=True, facecolor=p.fill, edgecolor=p.stroke,
                                     linewidth=p.width * px, zorder=order))
            else:
                xs, ys = zip(*p.points)
                ax.plot(xs, ys, color=p.stroke, linewidth=p.width * px * 1.2,
                        linestyle=(0, (4, 3)) if p.dash else "solid", zorder=order, solid_capstyle="butt")
        else:
            t = prim
            ax.text(t.x, t.baseline, t.text, fontsize=t.size * px, color=t.color, family="DejaVu Sans Mono",
                    fontweight="bold" if t.bold else "normal", va="baseline", ha="left", zorder=order)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)


def render(source: Any, path: str | FilePath, *, title: str = "", fold: str = "auto",
           row_width: float = 1400.0, dpi: int = 110) -> FilePath:
    """Draw a permutation graph (or a merge result, whose per-space matching is shown) to
    ``path`` (.png, .svg or .pdf)."""
    return draw(build(source, title=title, fold=fold, row_width=row_width), path, dpi=dpi)


def build(source: Any, *, title: str = "", fold: str = "auto", row_width: float = 1400.0,
          matches: Optional[dict] = None) -> Scene:
    """The Scene for a PermutationGraph or a merge result (anything with ``.graph`` and
    ``.alignment``)."""
    from .arrange import arrange
    from .fold import fold as fold_items, should_fold
    from .matching import describe_config, space_matches
    from .outline import outline

    pg, result = (source.graph, source) if hasattr(source, "alignment") else (source, None)
    if result is not None and matches is None:
        matches = space_matches(result)
    ol = outline(pg)
    items = fold_items(pg, ol.items) if should_fold(ol.items, fold) else ol.items
    subtitle = (f"{len(pg.spaces)} spaces ({len(pg.free_spaces)} free), {len(pg.members)} members, "
                f"{len(pg.barriers)} barriers, coverage {pg.coverage():.3f} (hidden units that can move)")
    if result is not None:
        subtitle += f"; merged with {describe_config(result)}: per space method, mean matched correlation, " \
                    "units zipped within one model"
        cut = getattr(result, "cut", None)
        if cut is not None:
            subtitle += f"; partial merge: trunk merged up to {cut.stop!r}, spaces after it kept per model (separate)"
    return arrange(ol, items, title=title or "permutation graph", subtitle=subtitle, matches=matches,
                   row_width=row_width)

