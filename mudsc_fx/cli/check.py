"""``mudsc-fx check``: prove permutation graphs of one model or a whole zoo."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from .common import example_input, fail, parse_shape

_COLS = ["model", "spaces", "free", "coverage", "max_abs_err", "barriers", "status", "seconds"]


def add_parser(sub) -> None:
    s = sub.add_parser("check", help="prove the permutation graph by a functional-equivalence check")
    s.add_argument("models", nargs="*")
    s.add_argument("--zoo", choices=("torchvision", "timm"))
    s.add_argument("--only", help="comma-separated zoo members")
    s.add_argument("--input-shape", type=parse_shape, default=(1, 3, 64, 64))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", help="also write the table as JSON")
    s.set_defaults(func=run)


def _print_header() -> None:
    print(" ".join(f"{c:>12}" if c != "model" else f"{c:<26}" for c in _COLS))


def _print_table(rows: list[dict]) -> None:
    cols = _COLS
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c == "model":
                cells.append(f"{str(v):<26}")
            elif isinstance(v, float):
                cells.append(f"{v:>12.3g}" if c == "max_abs_err" else f"{v:>12.3f}")
            else:
                cells.append(f"{str(v):>12}")
        print(" ".join(cells), flush=True)


def run_check(entries, seed: int = 0):
    """Yield one row per zoo entry (checked, skipped or errored); never raises for one model."""
    import mudsc_fx as mf
    for e in entries:
        if e.skip:
            yield {"model": e.name, "status": "skipped", "reason": e.skip}
            continue
        t0 = time.perf_counter()
        try:
            model = e.build().eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = mf.check(model, example_input(e.input_shape), seed=seed, name=e.name)
            row = rep.row()
            row["input"] = "x".join(map(str, e.input_shape))
        except Exception as ex:  # one broken model must not hide the others
            row = {"model": e.name, "status": "error", "error": f"{type(ex).__name__}: {ex}"[:500],
                   "seconds": round(time.perf_counter() - t0, 2)}
        yield row


def run(args) -> int:
    from ..sources import ZooEntry, load_model, zoo
    if args.zoo:
        entries = zoo(args.zoo)
        if args.only:
            entries = [e for e in entries if e.name in set(args.only.split(","))]
    elif args.models:
        entries = [ZooEntry(m, (lambda m=m: load_model(m)), args.input_shape) for m in args.models]
    else:
        return fail("give MODEL specs or --zoo torchvision|timm")
    _print_header()
    rows = []
    for row in run_check(entries, seed=args.seed):
        rows.append(row)
        _print_table([row])
    done = [r for r in rows if r["status"] in ("ok", "FAIL", "error")]
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    print(f"\n{len(done)} checked, {len(done) - len(bad)} ok, {len(bad)} failed, {len(skipped)} skipped")
    for r in skipped:
        print(f"  skipped {r['model']}: {r['reason']}")
    for r in bad:
        print(f"  {r['status']} {r['model']}: {r.get('error') or 'outputs differ'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0
