"""``mudsc-fx``: inspect, check, merge, demo. Parses, validates, calls the library, prints."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated integers, got {text!r}") from None


def _example(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _fail(msg: str) -> int:
    print(f"mudsc-fx: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    import mudsc_fx as mf
    from .sources import load_model
    model = load_model(args.model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pg = mf.infer(model, _example(args.input_shape))
    if args.format == "text":
        text = pg.summary()
    elif args.format == "json":
        text = pg.to_json()
    else:
        text = pg.to_dot()
    if args.output:
        out = Path(args.output)
        if args.format == "dot" and out.suffix in (".png", ".svg", ".pdf"):
            from .viz import render_graph
            render_graph(pg, out)
        else:
            out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------- check
_COLS = ["model", "spaces", "free", "coverage", "max_abs_err", "barriers", "status", "seconds"]


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
                rep = mf.check(model, _example(e.input_shape), seed=seed, name=e.name)
            row = rep.row()
            row["input"] = "x".join(map(str, e.input_shape))
        except Exception as ex:  # one broken model must not hide the others
            row = {"model": e.name, "status": "error", "error": f"{type(ex).__name__}: {ex}"[:500],
                   "seconds": round(time.perf_counter() - t0, 2)}
        yield row


def cmd_check(args) -> int:
    from .sources import ZooEntry, load_model, zoo
    if args.zoo:
        entries = zoo(args.zoo)
        if args.only:
            entries = [e for e in entries if e.name in set(args.only.split(","))]
    elif args.models:
        entries = [ZooEntry(m, (lambda m=m: load_model(m)), args.input_shape) for m in args.models]
    else:
        return _fail("give MODEL specs or --zoo torchvision|timm")
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


# ---------------------------------------------------------------------------------------- merge
def _load_state(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path} does not hold a state dict")
    return sd


def _load_data(spec: Optional[str]):
    if spec is None:
        return None
    if spec.endswith(".pt"):
        x = torch.load(spec, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"data file {spec} must hold one tensor of inputs")
        return list(torch.split(x, 128))
    import importlib
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)()


def _save_state(model: torch.nn.Module, out: str) -> None:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        seen, unique = set(), {}
        for k, v in sd.items():  # safetensors refuses shared storage (tied weights)
            key = v.data_ptr()
            unique[k] = v.clone() if key in seen else v
            seen.add(key)
        save_file(unique, out)
    else:
        torch.save(sd, out)


def cmd_merge(args) -> int:
    import mudsc_fx as mf
    from .sources import load_model
    models = []
    for ck in args.checkpoints:
        m = load_model(args.arch)
        sd = _load_state(ck)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if missing or unexpected:
            return _fail(f"checkpoint {ck} does not fit {args.arch}: missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
        models.append(m.eval())
    data = _load_data(args.data)
    t0 = time.perf_counter()
    if args.method in ("emr", "task_arithmetic", "ties"):
        if not args.base:
            return _fail(f"--method {args.method} needs --base BASE_CHECKPOINT")
        base = load_model(args.arch)
        base.load_state_dict(_load_state(args.base))
        example = next(iter(data)) if data is not None else _example(args.input_shape)
        heads = mf.infer(base.eval(), example).output_params()  # task heads stay per task
        if args.method == "emr":
            emr = mf.emr_merge(base, models, keep=heads)
            emr.save(args.output)
            print(f"wrote EMR artifact with {len(emr)} tasks to {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)")
            return 0
        merged = mf.task_arithmetic(base, models, lam=args.lam) if args.method == "task_arithmetic" \
            else mf.ties_merge(base, models, lam=args.lam)
        print(f"kept from the base (swap in each task's own): {', '.join(heads) or 'nothing'}")
    else:
        example = None if data is not None else _example(args.input_shape)
        merged = mf.merge(models, data, method=args.method, alpha=args.alpha, seed=args.seed,
                          example_inputs=example, progress=True)
    _save_state(merged, args.output)
    print(f"merged {len(models)} models with {args.method} in {time.perf_counter() - t0:.1f}s -> {args.output}")
    return 0


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from .merge import PRESETS
    p = argparse.ArgumentParser(prog="mudsc-fx", description="Merge neural networks without training.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("inspect", help="print or export the permutation graph of a model")
    s.add_argument("model", help="torchvision:NAME, timm:NAME, file.py:factory or package.module:factory")
    s.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224))
    s.add_argument("--format", choices=("text", "json", "dot"), default="text")
    s.add_argument("-o", "--output", help="write here (.png/.svg with --format dot renders a picture)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("check", help="prove the permutation graph by a functional-equivalence check")
    s.add_argument("models", nargs="*")
    s.add_argument("--zoo", choices=("torchvision", "timm"))
    s.add_argument("--only", help="comma-separated zoo members")
    s.add_argument("--input-shape", type=_shape, default=(1, 3, 64, 64))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", help="also write the table as JSON")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("merge", help="merge checkpoints of one architecture")
    s.add_argument("--arch", required=True)
    s.add_argument("--checkpoints", nargs="+", required=True)
    s.add_argument("--method", default="mudsc_zip", choices=list(PRESETS) + ["emr", "task_arithmetic", "ties"])
    s.add_argument("--alpha", type=float)
    s.add_argument("--data", help="a .pt tensor of inputs, or module:function returning an iterable of batches")
    s.add_argument("--base", help="base checkpoint for emr / task_arithmetic / ties")
    s.add_argument("--lam", type=float, default=0.3)
    s.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("demo", help="train two small models on disjoint tasks of bundled real data and merge them")
    s.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    s.add_argument("--out", default="mudsc_fx_demo", help="output folder (table, permutation graph picture)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=lambda a: __import__("mudsc_fx.demo", fromlist=["main"]).main(a))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
