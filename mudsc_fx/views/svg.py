"""Scene -> SVG text (standalone file, or inline in the HTML page)."""
from __future__ import annotations

from html import escape

from .scene import FONT_FAMILY, Label, Path, Rect, Scene


def _attr_key(key: str) -> str:
    return f' data-key="{escape(key)}"' if key else ""


def _rect(r: Rect) -> str:
    dash = ' stroke-dasharray="4 3"' if r.dash else ""
    stroke = f' stroke="{r.stroke}" stroke-width="{r.width:g}"' if r.stroke != "none" and r.width else ""
    cls = ' class="el"' if r.key else ""
    cls += f' data-role="{r.role}"' if r.role else ""
    return (f'<rect x="{r.x:.1f}" y="{r.y:.1f}" width="{r.w:.1f}" height="{r.h:.1f}" rx="{r.radius:g}" '
            f'fill="{r.fill}"{stroke}{dash}{cls}{_attr_key(r.key)}/>')


def _path(p: Path) -> str:
    d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in p.points)
    dash = ' stroke-dasharray="4 3"' if p.dash else ""
    return f'<path d="{d}" fill="{p.fill}" stroke="{p.stroke}" stroke-width="{p.width:g}"{dash}/>'


def _label(t: Label) -> str:
    weight = ' font-weight="bold"' if t.bold else ""
    return (f'<text x="{t.x:.1f}" y="{t.baseline:.1f}" font-size="{t.size:g}" fill="{t.color}"{weight}'
            f'{_attr_key(t.key)}>{escape(t.text)}</text>')


def to_svg(scene: Scene, standalone: bool = True, element_id: str = "") -> str:
    """The scene as SVG. ``standalone`` adds the XML namespace (a .svg file); the page inlines
    it without one (no URL in the page)."""
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    ident = f' id="{element_id}"' if element_id else ""
    out = [f'<svg{ns}{ident} viewBox="0 0 {scene.width:.0f} {scene.height:.0f}" width="{scene.width:.0f}" '
           f'height="{scene.height:.0f}" font-family="{FONT_FAMILY}">',
           f'<rect x="0" y="0" width="{scene.width:.0f}" height="{scene.height:.0f}" fill="#ffffff"/>']
    prims = [(r.z, 0, i, _rect(r)) for i, r in enumerate(scene.rects)]
    prims += [(p.z, 1, i, _path(p)) for i, p in enumerate(scene.paths)]
    prims += [(t.z, 2, i, _label(t)) for i, t in enumerate(scene.labels)]
    out += [p[3] for p in sorted(prims, key=lambda p: (p[0], p[1], p[2]))]
    out.append("</svg>")
    return "\n".join(out)
