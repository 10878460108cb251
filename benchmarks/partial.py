"""Partial zipping: Joint accuracy against cost, from the ensemble to the single merged model.

Regime 1 of the MuDSC protocol (two models from different inits on disjoint halves of the
classes, a shared frozen class head): the same trained pairs as ``benchmarks/quality.py`` (same
training cache). For each stop point the pair is merged with ``Merger.merge(method,
stop_at=...)``: the merged trunk runs once, each model's own tail runs on its unmerged view of
the trunk's features, and the two tails' predictions are combined like the ensemble's (sum of
softmax probabilities of the shared head). Costs come from ``MergeResult.cost`` (FLOPs and
parameters relative to one model). The endpoints are the ensemble (2x FLOPs) and the full
merge (1x).

    python benchmarks/partial.py            # ResNet-20x2 BN and the ViT, 3 pairs each
    python benchmarks/partial.py --quick    # digits, one pair

Writes ``benchmarks/results/partial.json``, ``partial.md`` and ``partial.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mudsc_fx as mf  # noqa: E402
from mudsc_fx import zoo  # noqa: E402

import quality as Q  # noqa: E402  (the trained pairs and their cache keys)
from common import arch_label  # noqa: E402
import quality_report as report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("zipit", "mudsc_zip")
FULL = [("mnist", "resnet20", {"width": 2}, ["layer1", "layer2.0", "layer2.1", "layer2", "layer3.0", "layer3.1", "layer3"]),
        ("mnist", "vit", {}, ["blocks.0", "blocks.1", "blocks.2", "blocks.3"])]
QUICK = [("digits", "resnet20", {"width": 2}, ["layer1", "layer2", "layer3"])]


def run(cfgs, pairs: int, log) -> list[dict]:
    records = []
    for name, arch, kw, stops in cfgs:
        ds = zoo.load_dataset(name)
        head = zoo.ClassHead(ds.num_classes, seed=Q.HEAD_SEED)
        rec = zoo.recipe(arch, ds)
        label = arch_label(arch, kw)
        for p in range(pairs):
            tasks = zoo.split_classes(ds.num_classes, 2, seed=p)
            seeds = [100 * p + 1, 100 * p + 2]
            models = [Q.trained(ds, head, arch, kw, tasks[i], seeds[i], rec, log)[0] for i in range(2)]
            calib = zoo.calibration_batches(ds.x_train, Q.CALIB_BS, Q.CALIB_BATCHES, shuffle=True, seed=p)
            base = {"dataset": name, "arch": label, "pair": p}

            def ev(m, tasks=tasks):
                return zoo.evaluate(m, head, ds.x_test, ds.y_test, tasks)

            def add(kind, r, **extra):
                records.append({**base, "kind": kind, "joint": r["joint"], "avg": r["avg"], **extra})
                log(f"  {label} pair {p} {kind:<28} joint {r['joint']:5.1f} avg {r['avg']:5.1f} "
                    + " ".join(f"{k} {v}" for k, v in extra.items()))

            add("ensemble", ev(list(models)), flops_vs_one=2.0, params_vs_one=2.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merger = mf.Merger(models, calib)
            for method in METHODS:
                t = time.perf_counter()
                full = merger.merge(method)
                add(f"{method} full", ev(full.model), flops_vs_one=1.0, params_vs_one=1.0,
                    seconds=round(time.perf_counter() - t, 2))
                for stop in stops:
                    t = time.perf_counter()
                    res = merger.merge(method, stop_at=stop)
                    r = ev(res.model)  # the tails' probabilities summed, like the ensemble
                    add(f"{method} stop {stop}", r, method=method, stop=stop,
                        flops_vs_one=round(res.cost["flops_vs_one"], 3),
                        params_vs_one=round(res.cost["params_vs_one"], 3), seconds=round(time.perf_counter() - t, 2))
    return records


def summarise(records: list[dict]) -> list[dict]:
    keys: dict[tuple, list[dict]] = {}
    for r in records:
        keys.setdefault((r["dataset"], r["arch"], r["kind"]), []).append(r)
    out = []
    for (ds, arch, kind), rs in keys.items():
        out.append({"dataset": ds, "arch": arch, "kind": kind, "pairs": len(rs),
                    "joint": round(statistics.mean(r["joint"] for r in rs), 1),
                    "avg": round(statistics.mean(r["avg"] for r in rs), 1),
                    "flops_vs_one": rs[0]["flops_vs_one"], "params_vs_one": rs[0]["params_vs_one"]})
    return out


def markdown(summary: list[dict], seconds: float) -> str:
    return "\n".join(["# Partial zipping: accuracy against cost", ""] + report.partial_section(summary, seconds))


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    archs = list(dict.fromkeys(s["arch"] for s in summary))
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = [s for s in summary if s["arch"] == arch]
        ens = next(s for s in rows if s["kind"] == "ensemble")
        for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
            pts = sorted([s for s in rows if s["kind"].startswith(method)], key=lambda s: s["flops_vs_one"])
            pts = pts + [ens]
            ax.plot([s["flops_vs_one"] for s in pts], [s["joint"] for s in pts], "o-", color=colour, label=method)
        ax.plot([ens["flops_vs_one"]], [ens["joint"]], "k*", markersize=12, label="ensemble")
        ax.set_xlabel("FLOPs relative to one model")
        ax.set_ylabel("Joint accuracy (%)")
        ax.set_title(f"{rows[0]['dataset']} {arch}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--archs", default="", help="comma list of architectures to run (e.g. resnet20); default all")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfgs, pairs = (QUICK, 1) if args.quick else (FULL, 3)
    if args.archs:
        cfgs = [c for c in cfgs if c[1] in args.archs.split(",")]
    pairs = args.pairs or pairs
    t0 = time.perf_counter()
    records = run(cfgs, pairs, lambda s: print(s, flush=True))
    summary = summarise(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - t0
    (out / "partial.json").write_text(json.dumps({"records": records, "summary": summary,
                                                  "seconds": round(seconds, 1)}, indent=1))
    (out / "partial.md").write_text(markdown(summary, seconds))
    plot(summary, out / "partial.png")
    print(markdown(summary, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
