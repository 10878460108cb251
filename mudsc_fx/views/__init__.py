"""Views of a permutation graph (or of a merge result): text, JSON, DOT, a picture and an
interactive HTML page, all naming spaces the same way and saying why each is or is not free.

>>> # import mudsc_fx as mf
>>> # pg = mf.infer(model, example)
>>> # print(pg.explain("layer2.0.conv1.weight"))       # its spaces and why
>>> # mf.views.render(pg, "graph.png")                   # the picture (.png / .svg / .pdf)
>>> # mf.views.write_html(pg, "graph.html")              # the page (zoom, search, details)
>>> # mf.views.write_html(mf.Merger(models, data).merge("zipit"), "merge.html")
"""
from .explain import param_facts, param_report, space_status
from .html import to_html, write_html
from .picture import build as build_scene, draw, render
from .text import explain, summary, to_dict, to_dot, to_json, to_networkx

__all__ = ["render", "draw", "build_scene", "write_html", "to_html", "write", "summary", "explain", "to_dict",
           "to_json", "to_dot", "to_networkx", "param_facts", "param_report", "space_status", "FILE_SUFFIXES"]

#: what :func:`write` can make from a graph or a merge result
FILE_SUFFIXES = (".html", ".htm", ".png", ".svg", ".pdf")


def write(source, path, **kw):
    """The page (.html) or the picture (.png, .svg, .pdf) of a permutation graph or a merge
    result, by the suffix of ``path``."""
    from pathlib import Path
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        return write_html(source, path, **kw)
    if suffix in (".png", ".svg", ".pdf"):
        return render(source, path, **kw)
    raise ValueError(f"cannot write a view to {str(path)!r}: use one of {', '.join(FILE_SUFFIXES)}")
