"""``mudsc-fx demo``: the main job on bundled real data."""
from __future__ import annotations


def add_parser(sub) -> None:
    s = sub.add_parser("demo", help="train two small models on disjoint tasks of bundled real data and merge them")
    s.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    s.add_argument("--out", default="mudsc_fx_demo", help="output folder (table, permutation graph picture)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run)


def run(args) -> int:
    from ..demo import main
    return main(args)
