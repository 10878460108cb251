"""Speed and memory of the merge pipeline, stage by stage, against the cost of a forward pass.

For each case, N = 2 models of one architecture (different seeds, RANDOM INITIALISATION: the
trained state does not change the amount of work, and the timings do not depend on it) are
merged with each method, and every stage of the pipeline is timed:

    trace       mf.trace(model0, first batch)             (as mf.merge does)
    infer       mf.infer(model0, first batch, gm=gm)
    statistics  mf.collect_stats(models, pg, data)        (one streaming pass over the data)
    solve       mf.solve(pg, stats, tensors, mf.method_config(method))
    rewrite     mf.rewrite(models, pg, alignment)
    reset_bn    mf.reset_bn(merged, data)

The floor is the bare forward passes of the N models over the same calibration data
(torch.no_grad, eval), timed in the same process before and after the merge (their mean).
Reported: median seconds over the repeats, and the median over repeats of
total merge time / floor.

Each (case, repeat) runs in a fresh subprocess. trace, infer and statistics do not depend on
the method: they run once per repeat; solve, rewrite and reset_bn run per method in a forked
child, so every method starts from the same state and gets its own peak memory. Peak memory
is read from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, reset to the current RSS before each
stage (``/proc/self/clear_refs``), as a delta against the RSS when the stage began (and, for
the whole merge, against the RSS before trace: models and data already loaded).

Threads: torch, OpenMP and the BLAS libraries are limited to ``--threads`` (default 1: on a
shared 2-core machine two threads thrash as soon as another process is busy).

Also reported: statistics / floor per case with the work the statistics add (FLOPs torch counts
on the first batch), and the distributed statistics rows (benchmarks/speed_dist.py: 1 rank vs
2 gloo ranks on ResNet-20 x4, and whether the merged models agree). Tables and targets are
in benchmarks/speed_report.py.

    python benchmarks/speed.py              # full: four cases x 3 methods, 3 repeats, distributed rows, scaling
    python benchmarks/speed.py --quick      # small data, 1 repeat, under 2 minutes
    python benchmarks/speed.py --cases resnet20x4 --methods zipit --repeats 5
    python benchmarks/speed.py --tree /tmp/old  # time another checkout's mudsc_fx (before/after)
    python benchmarks/speed.py --combine a.json b.json   # merge runs made in parallel processes
    python benchmarks/speed.py --distributed-only --update  # redo only the distributed rows
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import speed_dist  # noqa: E402  (the distributed rows)
from speed_report import METHODS, SEEDS, markdown, summarise, targets  # noqa: E402  (tables, targets)
RESULTS = HERE / "results"

# name -> how to build the models and the calibration data; quick: smaller data, fewer methods
CASES = {
    "resnet20x4": dict(source="zoo", arch="resnet20", kwargs={"width": 4}, dataset="mnist",
                       images=5000, batch=250, quick_images=250,
                       title="ResNet-20 x4 (MNIST)"),
    "vit": dict(source="zoo", arch="vit", kwargs={}, dataset="mnist", images=5000, batch=250,
                quick_images=250, title="small ViT (MNIST)"),
    "resnet50": dict(source="torchvision", arch="resnet50", images=256, batch=32, quick_images=None,
                     title="torchvision resnet50 (224x224)"),
    "vit_b_16": dict(source="torchvision", arch="vit_b_16", images=256, batch=32, quick_images=None,
                     title="torchvision vit_b_16 (224x224)"),
}


# ---------------------------------------------------------------------------- measurement

def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _maxrss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset ru_maxrss / VmHWM to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Stage:
    """Times a block and records its peak memory: RSS high-water during it minus RSS at start."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        gc.collect()
        self.resettable = _reset_peak()
        self.rss0 = _rss_kb()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.record[self.name + "_s"] = time.perf_counter() - self.t0
        peak = _maxrss_kb()
        self.record[self.name + "_peak_mb"] = (peak - self.rss0) / 1024 if self.resettable else None
        self.record[self.name + "_hwm_mb"] = peak / 1024
        return False


def _limit_threads(threads: int):
    import torch
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        threadpool_limits(threads)
        pools = [{"api": p["internal_api"], "threads": p["num_threads"]} for p in threadpool_info()]
    except ImportError:  # the environment variables set by the parent still apply
        pools = []
    return {"torch": torch.get_num_threads(), "pools": pools}


def _build(case: dict, quick: bool):
    """(models, list of input batches) for one case; random init, fixed seeds."""
    import torch
    n_images = case["quick_images"] if quick else case["images"]
    if case["source"] == "zoo":
        from mudsc_fx import zoo
        ds = zoo.load_dataset(case["dataset"])
        x = torch.cat([ds.x_train, ds.x_test])[:n_images]
        models = [zoo.build(case["arch"], ds, seed=s, **case["kwargs"]).eval() for s in SEEDS]
    else:
        import torchvision
        models = []
        for s in SEEDS:
            torch.manual_seed(s)
            models.append(getattr(torchvision.models, case["arch"])(weights=None).eval())
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_images, 3, 224, 224, generator=g)
    b = case["batch"]
    data = [x[i:i + b].contiguous() for i in range(0, len(x), b)]
    return models, data, len(x)


def _floor(models, data) -> float:
    import torch
    t = time.perf_counter()
    with torch.no_grad():
        for m in models:
            m.eval()
            for batch in data:
                m(batch)
    return time.perf_counter() - t


def _work(models, pg, data) -> dict:
    """FLOPs torch counts (GEMMs, convolutions; not every attention kernel) for the bare
    forward passes and for the statistics pass over the same batch: how much work the
    statistics add, whatever the speed of either."""
    import mudsc_fx as mf
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        _floor(models, data)
    forward = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        mf.collect_stats(models, pg, data)
    return {"forward_gflop": forward / 1e9, "statistics_gflop": fc.get_total_flops() / 1e9}


def _method_child(conn_w, models, pg, stats, data, method: str):
    """Runs in a forked child: solve, rewrite, reset_bn of one method; writes JSON to conn_w."""
    import mudsc_fx as mf
    from mudsc_fx.passes.apply import named_tensors
    rec: dict = {}
    try:
        rss_start = _rss_kb()
        _reset_peak()
        with Stage(rec, "solve"):
            al = mf.solve(pg, stats, [named_tensors(m) for m in models], mf.method_config(method), 0)
        with Stage(rec, "rewrite"):
            merged = mf.rewrite(list(models), pg, al)
        with Stage(rec, "reset_bn"):
            mf.reset_bn(merged, data)
        rec["sweeps"] = al.sweeps
        rec["rss_at_fork_mb"] = rss_start / 1024
        rec["hwm_mb"] = max(rec[k] for k in ("solve_hwm_mb", "rewrite_hwm_mb", "reset_bn_hwm_mb"))
    except BaseException as e:  # report, never hang the parent
        rec = {"error": f"{type(e).__name__}: {e}"}
    os.write(conn_w, json.dumps(rec).encode())
    os.close(conn_w)


def _run_method(models, pg, stats, data, method: str) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            _method_child(w, models, pg, stats, data, method)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"method child exited with status {status} and no result"}
    return json.loads(b"".join(chunks))


def worker(spec: dict) -> dict:
    """One (case, repeat) in this fresh process."""
    threads = _limit_threads(spec["threads"])
    import mudsc_fx as mf
    case = CASES[spec["case"]]
    models, data, n_images = _build(case, spec["quick"])
    out = {"case": spec["case"], "repeat": spec["repeat"], "images": n_images, "batch": case["batch"],
           "n_batches": len(data), "threads": threads, "mudsc_fx": os.path.dirname(mf.__file__)}
    _floor(models, data[:1])  # warm-up: first-call allocations and kernel selection
    rec: dict = {}
    with Stage(rec, "floor"):
        f1 = _floor(models, data)
    rss_merge0 = _rss_kb()
    _reset_peak()
    with Stage(rec, "trace"):
        gm = mf.trace(models[0], (data[0],))
    with Stage(rec, "infer"):
        pg = mf.infer(models[0], (data[0],), gm=gm)
    with Stage(rec, "statistics"):
        stats = mf.collect_stats(models, pg, data)
    if spec["repeat"] == 0:
        out["work"] = _work(models, pg, data[:1])
    out["free_spaces"] = len(pg.free_spaces)
    out["max_space"] = max((pg.size(s) for s in pg.free_spaces), default=0)
    shared_hwm = max(rec[k] for k in ("trace_hwm_mb", "infer_hwm_mb", "statistics_hwm_mb"))
    out["methods"] = {}
    for method in spec["methods"]:
        r = _run_method(models, pg, stats, data, method)
        if "error" not in r:
            r["merge_peak_mb"] = max(shared_hwm, r["hwm_mb"]) - rss_merge0 / 1024
        out["methods"][method] = r
    del stats, pg, gm
    gc.collect()
    f2 = _floor(models, data)
    out.update({k: v for k, v in rec.items() if not k.startswith("floor_")})
    out["floor_s"] = [f1, f2]
    out["floor_peak_mb"] = rec["floor_peak_mb"]
    out["rss_before_merge_mb"] = rss_merge0 / 1024
    return out


def scaling_worker(spec: dict) -> dict:
    threads = _limit_threads(spec["threads"])
    sys.path.insert(0, str(HERE))
    import solver_scaling as ss
    sizes = [256, 512] if spec["quick"] else [256, 512, 1024, 2048, 4096]
    print(f"solver scaling: seconds, median of {spec['repeats']}; N = {ss.N}", flush=True)
    print(ss.HEADER, flush=True)
    rows = ss.run(sizes, spec["repeats"], ss.REFERENCE_MAX_N)
    return {"rows": rows, "repeats": spec["repeats"], "n_models": ss.N, "head_size": ss.HEAD,
            "reference_max_n": ss.REFERENCE_MAX_N, "threads": threads}


# ---------------------------------------------------------------------------- orchestration

def _spawn(spec: dict, tree, timeout) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(spec["threads"])
    # time this checkout's mudsc_fx (or --tree's), whatever is installed
    front = str(tree) if tree else str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join([front] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", res.name]
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=None if spec["kind"] == "scaling" else subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout} s"}
        text = res.read()
    if proc.returncode != 0 or not text:
        return {"error": f"worker exit {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(text)


def _git_commit(tree) -> str:
    """Commit of the timed code (with "+dirty" when its mudsc_fx has local changes)."""
    where = Path(tree) if tree else ROOT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mudsc_fx"], cwd=where, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return (head + ("+dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def combine(paths: list[Path], prefix: Path) -> None:
    """One result from several runs: cases, runs and their metadata side by side (a case in
    several files: the later file's), machine and scaling from the last file that has them."""
    parts = [json.loads(p.read_text()) for p in paths]
    result = {k: v for k, v in parts[0].items() if k not in ("cases", "runs", "case_specs", "case_meta")}
    rank = {name: i for i, name in enumerate(CASES)}
    for key in ("cases", "runs", "case_specs", "case_meta"):
        merged = {k: v for part in parts for k, v in part.get(key, {}).items()}
        result[key] = dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    for key in ("solver_scaling", "machine", "distributed"):
        found = [part[key] for part in parts if key in part]
        if found:
            result[key] = found[-1]
    result["repeats"] = sorted({m.get("repeats") for m in result["case_meta"].values()} - {None})
    result["combined_from"] = [str(p) for p in paths]
    result["notes"] = list(dict.fromkeys(n for part in parts for n in part.get("notes", [])))
    result["targets"] = targets(result)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(str(prefix) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(str(prefix) + ".md").write_text(markdown(result))
    print(markdown(result))
    print(f"combined {len(paths)} runs into {prefix}.json and {prefix}.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data, 1 repeat (< 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-scaling", action="store_true", help="skip the solver scaling table")
    ap.add_argument("--no-distributed", action="store_true", help="skip the distributed statistics rows")
    ap.add_argument("--distributed-only", action="store_true",
                    help="only the distributed statistics rows (keeps the other results with --update)")
    ap.add_argument("--dist-world", type=int, default=2, help="ranks of the distributed rows (default 2)")
    ap.add_argument("--dist-case", default=speed_dist.DEFAULT_CASE, help="case of the distributed rows")
    ap.add_argument("--dist-images", type=int, default=None, help="images of the distributed rows (default: the case's)")
    ap.add_argument("--tree", type=Path, default=None,
                    help="directory holding another mudsc_fx package to time (e.g. an older checkout)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per worker")
    ap.add_argument("--out", type=Path, default=None,
                    help="output prefix (writes PREFIX.json and PREFIX.md); default benchmarks/results/speed, "
                         "or a temporary file with --quick")
    ap.add_argument("--update", action="store_true",
                    help="keep the cases (and solver scaling) of an existing PREFIX.json that this run does not redo")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="only merge earlier runs (e.g. cases run in parallel processes with --out) into "
                         "PREFIX.json/.md: their cases, later files first, and the solver scaling of the "
                         "last file that has one")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        if spec["kind"] == "dist":
            res = speed_dist.worker(spec)
        else:
            res = scaling_worker(spec) if spec["kind"] == "scaling" else worker(spec)
        Path(args.worker_out).write_text(json.dumps(res))
        return

    if args.combine:
        combine(args.combine, args.out or RESULTS / "speed")
        return
    repeats = args.repeats or (1 if args.quick else 3)
    methods = [m for m in args.methods.split(",") if m]
    if args.distributed_only:
        names = []
    elif args.cases:
        names = args.cases.split(",")
    else:
        names = [n for n, c in CASES.items() if not args.quick or c["quick_images"]]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    prefix = args.out or (Path(tempfile.gettempdir()) / "mudsc_fx_speed_quick" if args.quick else RESULTS / "speed")
    run_dist = args.distributed_only or (not args.no_distributed and (not args.cases or args.dist_case in names))
    started = time.time()
    result = {"benchmark": "speed", "quick": args.quick, "repeats": repeats, "threads": args.threads,
              "methods": methods, "n_models": len(SEEDS), "seeds": SEEDS,
              "weights": "random initialisation (timing does not depend on the trained state)",
              "tree": str(args.tree) if args.tree else None,
              "case_specs": {n: {k: v for k, v in CASES[n].items()} for n in names},
              "cases": {}, "runs": {}, "notes": []}
    if args.quick:
        result["notes"].append("quick run: small data, 1 repeat; torchvision cases skipped unless named "
                               "with --cases")
    json_path = Path(str(prefix) + ".json")
    if args.update and json_path.exists():
        old = json.loads(json_path.read_text())
        for key in ("cases", "runs", "case_specs", "case_meta"):
            result.setdefault(key, {})
            result[key] = {**{k: v for k, v in old.get(key, {}).items() if k not in names}, **result[key]}
        if (args.no_scaling or args.distributed_only) and "solver_scaling" in old:
            result["solver_scaling"] = old["solver_scaling"]
        if (args.no_distributed or not run_dist) and "distributed" in old:
            result["distributed"] = old["distributed"]
    result.setdefault("case_meta", {})
    commit = _git_commit(args.tree)

    def save():
        result["targets"] = targets(result)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        Path(str(prefix) + ".md").write_text(markdown(result))

    for name in names:
        load0 = os.getloadavg()
        runs = []
        for r in range(repeats):
            t = time.perf_counter()
            spec = {"kind": "case", "case": name, "repeat": r, "quick": args.quick, "threads": args.threads,
                    "methods": methods}
            run = _spawn(spec, args.tree, args.timeout)
            runs.append(run)
            if "error" in run:
                print(f"{name} repeat {r}: {run['error']}", flush=True)
            else:
                ms = ", ".join(f"{m} {v['solve_s']:.2f}s" if "error" not in v else f"{m} ERROR {v['error']}"
                               for m, v in run["methods"].items())
                print(f"{name} repeat {r}: floor {run['floor_s'][0]:.2f}/{run['floor_s'][1]:.2f}s, "
                      f"trace {run['trace_s']:.2f}s, infer {run['infer_s']:.2f}s, statistics "
                      f"{run['statistics_s']:.2f}s, solve: {ms} ({time.perf_counter() - t:.0f}s)", flush=True)
        result["runs"][name] = runs
        result["cases"][name] = summarise(runs, methods)
        result["case_meta"][name] = {"repeats": repeats, "threads": args.threads, "quick": args.quick,
                                     "tree": str(args.tree) if args.tree else None, "commit": commit,
                                     "load_average_start": load0, "load_average_end": os.getloadavg(),
                                     "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        save()
    if run_dist:
        result["distributed"] = speed_dist.run(
            lambda spec, timeout: _spawn(spec, args.tree, timeout), args.dist_case, args.dist_world, repeats,
            args.threads, args.quick, args.dist_images, args.timeout)
        save()
    if not args.no_scaling and not args.distributed_only:
        spec = {"kind": "scaling", "quick": args.quick, "repeats": 1 if args.quick else (args.repeats or 3),
                "threads": args.threads}
        result["solver_scaling"] = _spawn(spec, args.tree, args.timeout)
    result["targets"] = targets(result)
    import numpy
    import scipy
    import torch
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                         "numpy": numpy.__version__, "scipy": scipy.__version__,
                         "load_average_at_end": os.getloadavg(), "wall_s": time.time() - started}
    save()
    print()
    print(markdown(result))
    print(f"wrote {prefix}.json and {prefix}.md ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
