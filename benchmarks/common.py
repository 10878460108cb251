"""Helpers shared by the quality benchmark's runner (quality.py), its report
(quality_report.py) and the README table generator (readme_tables.py)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def one_thread_env() -> None:
    """BLAS pools of one thread (set before numpy / torch are imported; 1 is fastest on the
    shared 2-core machine, and the records do not depend on the thread count of BLAS)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def use_this_checkout() -> None:
    """Import mudsc_fx from this checkout, whatever is installed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def git_revision() -> str:
    """HEAD of this checkout, with "+dirty" when tracked files are modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def arch_label(arch: str, kw: dict) -> str:
    return arch + "".join(f" {k}={v}" for k, v in sorted(kw.items()))


def short_arch(dataset: str, arch: str, kw: dict) -> str:
    """Column names of the README table."""
    names = {("mnist", "mlp"): "MNIST MLP", ("mnist", "resnet20"): "ResNet-20x2 BN",
             ("mnist", "resnet20_gn"): "ResNet-20x2 GN", ("mnist", "vit"): "ViT", ("mnist1d", "mlp"): "MNIST-1D MLP"}
    return names.get((dataset, arch), f"{dataset} {arch_label(arch, kw)}")


def metrics(r: dict) -> dict:
    out = {"joint": r.get("joint"), "avg": r["avg"], "task_accs": r["task_accs"]}
    if len(r["task_accs"]) == 2:
        out["task_a"], out["task_b"] = r["task_accs"]
    return out


def config_key(r: dict) -> tuple:
    return r["dataset"], r["arch"], json.dumps(r["kw"], sort_keys=True)


def groups(records: list[dict], regime: str) -> dict:
    """(dataset, arch, kw json) -> records of ``regime``, in first-seen order."""
    out: dict = {}
    for r in records:
        if r["regime"] == regime:
            out.setdefault(config_key(r), []).append(r)
    return out


def fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def mean_std(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(vals) -> str:
    m, s = mean_std(vals)
    return "—" if m is None else f"{m:.1f} ± {s:.1f}"


def mean_of(rows: list[dict], method: str, metric: str = "joint"):
    vals = [r[metric] for r in rows if r["method"] == method and r.get(metric) is not None]
    return statistics.fmean(vals) if vals else None


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks on ties); nan when either side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
