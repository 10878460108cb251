"""A seeded random draw of timm architectures, each proven by ``mf.check`` (random weights,
eval mode, its default input size, batch 1). HEAVY (tens of CPU-minutes): run it under the
shared lock.

    flock /tmp/mudsc_heavy.lock python benchmarks/zoo_timm_draw.py --jobs 2   # draw + check, writes JSON
    python benchmarks/zoo_timm_draw.py --draw-only                             # just print the draw
    flock /tmp/mudsc_heavy.lock python benchmarks/zoo_timm_draw.py --only crossvit_9_240,mobilevit_xs --update

The draw: ``timm.list_models()`` (every architecture of the installed timm), sorted, shuffled
by ``random.Random(seed)``; the first ``n`` with fewer than ``max_params`` parameters (counted
on the meta device, no weights allocated) are taken. The draw depends on the timm version,
which the JSON records with the rule and the seed.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import multiprocessing as mp
import random
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mudsc_fx, installed or not
OUT = ROOT / "benchmarks/results/zoo_timm_draw.json"


def param_count(name: str) -> int:
    import timm
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def input_size(name: str) -> tuple[int, ...]:
    import timm
    cfg = timm.get_pretrained_cfg(name)
    return tuple(getattr(cfg, "input_size", None) or (3, 224, 224))


def draw(seed: int, n: int, max_params: float) -> list[dict]:
    import timm
    names = sorted(timm.list_models())
    random.Random(seed).shuffle(names)
    out = []
    for name in names:
        try:
            count = param_count(name)
        except Exception as e:  # a model that cannot even be built is not drawn; say so
            logging.warning("not drawable: %s (%s: %s)", name, type(e).__name__, e)
            continue
        if count < max_params:
            out.append({"model": name, "params": count, "input": list(input_size(name))})
            if len(out) == n:
                break
    return out


class _AdoptionLog(logging.Handler):
    """Collects what ``mudsc_fx.ir.conventions`` adopted while a model was traced."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def check_one(entry: dict, seed: int = 0) -> dict:
    import timm
    import mudsc_fx as mf
    name = entry["model"]
    row = {"model": name, "params": entry["params"], "input": "x".join(map(str, [1] + entry["input"]))}
    adopted = _AdoptionLog()
    conv_log = logging.getLogger("mudsc_fx.ir.conventions")
    conv_log.addHandler(adopted)
    conv_log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn((1,) + tuple(entry["input"]), generator=torch.Generator().manual_seed(seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = mf.check(model, x, seed=seed, name=name)
        row.update(rep.row())
        ops = collections.Counter(b.op for b in rep.barriers)
        row["barrier_ops"] = dict(ops.most_common(8))
    except mf.TraceError as e:
        row.update(status="untraceable", error=str(e).splitlines()[0][:300])
    except Exception as e:  # one broken model must not hide the others
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
    finally:
        conv_log.removeHandler(adopted)
    row["conventions"] = [line.split(" with ", 1)[-1] for line in adopted.lines]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _check_in_worker(job: tuple) -> dict:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return check_one(*job)


def _rows(todo: list[dict], seed: int, jobs: int):
    """Rows in draw order as they finish; with ``jobs`` > 1 each model runs in a fresh forked
    worker (no memory carried from one model to the next)."""
    if jobs == 1:
        for e in todo:
            yield check_one(e, seed)
        return
    with mp.get_context("fork").Pool(jobs, maxtasksperchild=1) as pool:
        yield from pool.imap(_check_in_worker, [(e, seed) for e in todo])


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    cov = sorted(r["coverage"] for r in ok)
    return {
        "drawn": len(rows), "proven": len(ok),
        "untraceable": sum(r["status"] == "untraceable" for r in rows),
        "equivalence_failures": sum(r["status"] == "FAIL" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "coverage_median": cov[len(cov) // 2] if cov else None,
        "coverage_mean": round(sum(cov) / len(cov), 4) if cov else None,
        "coverage_1.0": sum(c >= 0.9999 for c in cov),
        "with_conventions": sum(bool(r.get("conventions")) for r in rows),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--max-params", type=float, default=60e6)
    p.add_argument("--draw-only", action="store_true")
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    p.add_argument("--only", help="comma-separated drawn models to (re)check")
    p.add_argument("--update", action="store_true", help="merge the rows into the existing JSON")
    p.add_argument("--json", default=str(OUT))
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, one torch thread each, a fresh process per model (1: in this process, 2 threads)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(2 if args.jobs == 1 else 1)
    if args.render:
        Path(args.json).with_suffix(".md").write_text(markdown(json.loads(Path(args.json).read_text())))
        return 0
    import timm
    entries = draw(args.seed, args.n, args.max_params)
    if args.draw_only:
        for e in entries:
            print(f"{e['model']:<48} {e['params'] / 1e6:7.1f}M  {'x'.join(map(str, e['input']))}")
        return 0
    todo = entries if not args.only else [e for e in entries if e["model"] in set(args.only.split(","))]
    path = Path(args.json)
    old = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if args.update and path.exists() else {}
    for row in _rows(todo, args.seed, args.jobs):
        old[row["model"]] = row
        print(f"{row['model']:<44} {row['status']:<12} cov {row.get('coverage', '-')!s:<7} "
              f"barriers {row.get('barriers', '-')!s:<4} {row['seconds']:>6}s  {row.get('error') or ''}"[:220],
              flush=True)
        gc.collect()
    rows = [old[e["model"]] for e in entries if e["model"] in old]
    result = {
        "rule": f"sorted(timm.list_models()) shuffled by random.Random({args.seed}); the first {args.n} with "
                f"< {args.max_params / 1e6:.0f}M parameters; random init, eval mode, default input size, batch 1",
        "seed": args.seed, "timm": timm.__version__, "torch": torch.__version__,
        "draw": [e["model"] for e in entries], "summary": summarize(rows), "rows": rows,
    }
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result["summary"]))
    return 0


def markdown(result: dict) -> str:
    """The summary and one row per drawn model."""
    s = result["summary"]
    lines = [f"# timm: a seeded random draw of {s['drawn']} architectures", "",
             f"Draw: {result['rule']} (timm {result['timm']}, torch {result['torch']}).", "",
             f"**{s['proven']} of {s['drawn']} proven**, {s['equivalence_failures']} equivalence failures, "
             f"{s['untraceable']} untraceable, {s['errors']} errors; coverage median {s['coverage_median']}, "
             f"mean {s['coverage_mean']}, {s['coverage_1.0']} at 1.0; {s['with_conventions']} traced with "
             f"timm's conventions (leaf modules / wrapped functions).", "",
             "| model | params | input | status | coverage | barriers | barrier ops | conventions | s |",
             "|---|---:|---|---|---:|---:|---|---|---:|"]
    for r in result["rows"]:
        cov = f"{r['coverage']:.3f}" if r.get("coverage") is not None else ""
        ops = [f"{k} x{v}" for k, v in (r.get("barrier_ops") or {}).items()]
        ops = ", ".join(ops[:2]) + (f", +{len(ops) - 2} more" if len(ops) > 2 else "")
        conv = "; ".join(r.get("conventions") or [])
        status = r["status"] if r["status"] in ("ok", "FAIL") else f"{r['status']}: {(r.get('error') or '')[:120]}"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['input']} | {status} | {cov} | "
                     f"{r.get('barriers', '')} | {ops} | {conv} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
