"""``mudsc-fx inspect``: print or export the permutation graph of a model."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from .common import example_input, parse_shape


def add_parser(sub) -> None:
    s = sub.add_parser("inspect", help="print or export the permutation graph of a model")
    s.add_argument("model", help="torchvision:NAME, timm:NAME, file.py:factory or package.module:factory")
    s.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224))
    s.add_argument("--format", choices=("text", "json", "dot"), default="text")
    s.add_argument("-o", "--output", help="write here (.png/.svg with --format dot renders a picture)")
    s.set_defaults(func=run)


def run(args) -> int:
    import mudsc_fx as mf
    from ..sources import load_model
    model = load_model(args.model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pg = mf.infer(model, example_input(args.input_shape))
    if args.format == "text":
        text = pg.summary()
    elif args.format == "json":
        text = pg.to_json()
    else:
        text = pg.to_dot()
    if args.output:
        out = Path(args.output)
        if args.format == "dot" and out.suffix in (".png", ".svg", ".pdf"):
            from ..viz import render_graph
            render_graph(pg, out)
        else:
            out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0
