"""Scaling of the matching solvers with width n (N = 2 models).

Times align, zip (fast and the naive reference, which must agree), zip on a rank-1 matrix (the
fast solver's hard case: every row prefers the same units) and group_align with heads of 64
units over two tied spaces. Medians of --repeats runs; prints a table and writes JSON.

    python benchmarks/solver_scaling.py            # n = 256 .. 4096, about 5 minutes
    python benchmarks/solver_scaling.py --quick    # n = 256, 512
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mudsc_fx.solvers import align, group_align, zip_match, zip_match_reference  # noqa: E402

N = 2
HEAD = 64
REFERENCE_MAX_N = 2048  # the O(n^3) loop takes minutes beyond this


def planted_similarity(n: int, rng: np.random.Generator, d: int = 256) -> np.ndarray:
    """Pearson correlation of two models' units: model 1 a permuted noisy copy of model 0,
    plus a shared factor with unit-specific loading, as real activations have."""
    F0 = rng.standard_normal((n, d))
    X = np.vstack([F0, F0[rng.permutation(n)] + 0.5 * rng.standard_normal((n, d))])
    X += rng.random((2 * n, 1)) * rng.standard_normal(d)
    return np.corrcoef(X)


def rank1_similarity(n: int, rng: np.random.Generator) -> np.ndarray:
    u = rng.random(N * n)
    A = np.outer(u, u) + 0.01 * rng.standard_normal((N * n, N * n))
    return (A + A.T) / 2


def timed(fn, repeats: int):
    """Median wall and CPU seconds of ``repeats`` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def run(sizes, repeats, reference_max_n):
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        C = planted_similarity(n, rng)
        row = {"n": n}
        row["align_s"], _, _ = timed(lambda: align(C, N), repeats)
        row["zip_fast_s"], row["zip_fast_cpu_s"], fast = timed(lambda: zip_match(C, N), repeats)
        if n <= reference_max_n:
            row["zip_reference_s"], _, ref = timed(lambda: zip_match_reference(C, N), repeats)
            if not np.array_equal(fast, ref):
                raise AssertionError(f"zip fast and reference labels differ at n = {n}")
            row["ratio_reference_over_fast"] = row["zip_reference_s"] / row["zip_fast_s"]
        else:
            row["zip_reference_s"] = row["ratio_reference_over_fast"] = None
        R = rank1_similarity(n, rng)
        row["zip_fast_rank1_s"], _, _ = timed(lambda: zip_match(R, N), repeats)
        del R
        G = n // HEAD
        row["group_align_s"], _, _ = timed(
            lambda: group_align([C, C], N, G, [HEAD, HEAD], [False, False]), repeats)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (f"{'n':>5} | {'align':>7} | {'zip fast':>8} | {'(cpu)':>7} | {'zip ref':>8} | "
          f"{'ref/fast':>8} | {'zip rank1':>9} | {'group_align':>11}")


def format_row(row) -> str:
    def s(x):
        return "skipped" if x is None else f"{x:.3f}"
    ratio = row["ratio_reference_over_fast"]
    return (f"{row['n']:>5} | {s(row['align_s']):>7} | {s(row['zip_fast_s']):>8} | "
            f"{s(row['zip_fast_cpu_s']):>7} | {s(row['zip_reference_s']):>8} | "
            f"{'-' if ratio is None else f'{ratio:.1f}x':>8} | "
            f"{s(row['zip_fast_rank1_s']):>9} | {s(row['group_align_s']):>11}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 256, 512 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "solver_scaling.json")
    args = parser.parse_args(argv)
    sizes = [256, 512] if args.quick else [256, 512, 1024, 2048, 4096]
    print(f"seconds, median of {args.repeats}; N = {N}; zip a = 0.5, b = 1; "
          f"group_align: 2 tied spaces, heads of {HEAD}")
    print(HEADER)
    print("-" * len(HEADER))
    rows = run(sizes, args.repeats, REFERENCE_MAX_N)
    notes = [f"zip reference skipped for n > {REFERENCE_MAX_N}: O(n^3), minutes per run"]
    if any(r["n"] > REFERENCE_MAX_N for r in rows):
        print(notes[0])
    result = {
        "benchmark": "solver_scaling", "n_models": N, "repeats": args.repeats,
        "quick": args.quick, "head_size": HEAD, "rows": rows, "notes": notes,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "scipy": scipy.__version__,
                    "load_average_at_end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
