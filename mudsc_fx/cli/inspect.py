"""``mudsc-fx inspect``: print or export the permutation graph of a model, or explain one
parameter."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

from .common import example_input, parse_shape

# output format -> the file suffixes it writes
FORMATS = {"text": (".txt",), "json": (".json",), "dot": (".dot", ".gv"), "html": (".html", ".htm"),
           "picture": (".png", ".svg", ".pdf")}


def add_parser(sub) -> None:
    s = sub.add_parser("inspect", help="print or export the permutation graph of a model",
                       description="Print or export the permutation graph of a model. The format follows the "
                                   "suffix of -o (.txt, .json, .dot, .html, .png/.svg/.pdf) unless --format says it.")
    s.add_argument("model", help="torchvision:NAME, timm:NAME, file.py:factory or package.module:factory")
    s.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224))
    s.add_argument("--format", choices=tuple(FORMATS),
                   help="text (the default on the terminal), json, dot (Graphviz text), html (one interactive "
                        "page), picture (.png/.svg/.pdf)")
    s.add_argument("-o", "--output", help="write here instead of printing; its suffix must fit the format")
    s.add_argument("--param", metavar="NAME",
                   help="print where parameter NAME lives: each axis's space and why it is or is not free")
    s.add_argument("--fold", choices=("auto", "always", "never"), default="auto",
                   help="draw runs of identical blocks once (picture and html; auto: for long models)")
    s.add_argument("--title", help="title of the picture or page (default: the model)")
    s.set_defaults(func=run)


def output_format(fmt: Optional[str], output: Optional[str]) -> str:
    """The format to write, checked against the output's suffix (a ValueError that says what
    would fit, raised before any model is loaded)."""
    if output is None:
        if fmt in ("html", "picture"):
            raise ValueError(f"--format {fmt} writes a file: give -o FILE{FORMATS[fmt][0]}")
        return fmt or "text"
    suffix = Path(output).suffix.lower()
    inferred = next((f for f, suffixes in FORMATS.items() if suffix in suffixes), None)
    if fmt is None:
        if inferred is None:
            known = ", ".join(s for suffixes in FORMATS.values() for s in suffixes)
            raise ValueError(f"cannot tell the format of {output!r} from its suffix: use one of {known}, or --format")
        return inferred
    if suffix not in FORMATS[fmt]:
        hint = f"; {suffix} is written by --format {inferred}" if inferred else ""
        raise ValueError(f"--format {fmt} writes {'/'.join(FORMATS[fmt])} files, not {output!r}{hint}")
    if not Path(output).resolve().parent.is_dir():
        raise ValueError(f"cannot write {output!r}: the directory {str(Path(output).parent)!r} does not exist")
    return fmt


def run(args) -> int:
    fmt = output_format(args.format, args.output)
    import mudsc_fx as mf
    from ..sources import load_model
    from .. import views
    model = load_model(args.model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pg = mf.infer(model, example_input(args.input_shape))
    if args.param:
        print(pg.explain(args.param))
        if not args.output:
            return _warn(caught)
    title = args.title or args.model
    text = None
    if fmt == "text":
        text = pg.summary()
    elif fmt == "json":
        text = pg.to_json()
    elif fmt == "dot":
        text = pg.to_dot()
    if args.output:
        out = Path(args.output)
        if fmt in ("html", "picture"):
            views.write(pg, out, title=title, fold=args.fold)
        else:
            out.write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
    return _warn(caught)


def _warn(caught) -> int:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0
