"""Wall time of a zoo sweep with ``--jobs 1`` against ``--jobs J``, back to back in one run,
and the memory of its workers. Run it alone (it is a heavy job):

    flock /tmp/mudsc_heavy.lock python benchmarks/zoo_timing.py [--zoo torchvision] [--jobs 2] [--runs 1]

Prints a table and writes ``benchmarks/results/zoo_timing.json`` (and ``.md``): per pair of runs the serial
and parallel wall time and their ratio (the median pair is the headline), whether the rows
are identical (measurements aside), the largest worker RSS and the largest sum of RSS over
the whole process tree (this process and its workers) sampled every 0.2 s.
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mudsc_fx.sources import zoo  # noqa: E402
from mudsc_fx.zoo_check import ZooReport, check_zoo, rows_equal  # noqa: E402
from mudsc_fx.zoo_check.result import library_versions  # noqa: E402

OUT = ROOT / "benchmarks/results/zoo_timing.json"


class TreeRSS(threading.Thread):
    """Largest total RSS of this process and its children, sampled."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, sum(_rss(p) for p in [me] + _children(me)))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def sweep(spec: str, jobs: int):
    tree = TreeRSS()
    tree.start()
    t0 = time.perf_counter()
    results = check_zoo(zoo(spec), jobs=jobs)
    seconds = time.perf_counter() - t0
    tree.stop.set()
    tree.join()
    return results, seconds, tree.peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="torchvision")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="pairs of runs (serial, parallel)")
    ap.add_argument("-o", "--output", default=str(OUT))
    ap.add_argument("--report", help="also write the last parallel run's report (JSON) here")
    args = ap.parse_args()
    pairs = []
    for i in range(args.runs):
        serial, t1, tree1 = sweep(args.zoo, 1)
        parallel, tj, treej = sweep(args.zoo, args.jobs)
        worst = max((r for r in serial + parallel if r.peak_rss_mb), key=lambda r: r.peak_rss_mb)
        pair = {"serial_s": round(t1, 1), "parallel_s": round(tj, 1), "ratio": round(tj / t1, 3),
                "identical": rows_equal(serial, parallel), "peak_rss_mb": worst.peak_rss_mb,
                "peak_model": worst.model, "tree_rss_mb_serial": round(tree1 / 2**20),
                "tree_rss_mb_parallel": round(treej / 2**20),
                "cpu_s_serial": round(sum(r.seconds for r in serial), 1)}
        pairs.append(pair)
        print(f"pair {i + 1}: jobs=1 {t1:.0f} s, jobs={args.jobs} {tj:.0f} s, ratio {tj / t1:.3f}, "
              f"identical rows {pair['identical']}, worker peak {worst.peak_rss_mb:.0f} MB ({worst.model}), "
              f"process tree peak {tree1 / 2**30:.2f} / {treej / 2**30:.2f} GB", flush=True)
    if args.report:
        ZooReport(args.zoo, parallel, jobs=args.jobs, versions=library_versions(), seconds=tj).write(args.report)
    median = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
    result = {"zoo": args.zoo, "jobs": args.jobs, "date": date.today().isoformat(), "runs": len(pairs),
              "serial_s": statistics.median(p["serial_s"] for p in pairs),
              "parallel_s": statistics.median(p["parallel_s"] for p in pairs),
              "ratio": median["ratio"], "identical": all(p["identical"] for p in pairs),
              "peak_rss_mb": max(p["peak_rss_mb"] for p in pairs),
              "peak_model": max(pairs, key=lambda p: p["peak_rss_mb"])["peak_model"],
              "tree_rss_mb": max(p["tree_rss_mb_parallel"] for p in pairs),
              "load_avg_at_end": os.getloadavg()[0], "pairs": pairs}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result, serial, parallel)
    Path(args.output).with_suffix(".md").write_text(table)
    print("\n" + table)
    return 0


def markdown(result: dict, serial, parallel, top: int = 8) -> str:
    """The headline table, the pairs, and the models with the largest worker peaks."""
    j = result["jobs"]
    lines = [f"# Zoo sweep: `--jobs 1` against `--jobs {j}` ({result['zoo']}, {result['date']})", "",
             f"Back to back in one run (`benchmarks/zoo_timing.py`), on a shared 2-core machine under the "
             f"heavy-job lock; load average {result['load_avg_at_end']:.2f} at the end.", "",
             f"| zoo | jobs=1 s | jobs={j} s | ratio | identical rows | worker peak GB | process tree peak GB |",
             "|---|---:|---:|---:|---|---:|---:|",
             f"| {result['zoo']} | {result['serial_s']:.0f} | {result['parallel_s']:.0f} | {result['ratio']:.3f} | "
             f"{result['identical']} | {result['peak_rss_mb'] / 1024:.2f} ({result['peak_model']}) | "
             f"{result['tree_rss_mb'] / 1024:.2f} |", ""]
    if len(result["pairs"]) > 1:
        lines += ["| pair | jobs=1 s | jobs=J s | ratio |", "|---:|---:|---:|---:|"]
        lines += [f"| {i + 1} | {p['serial_s']} | {p['parallel_s']} | {p['ratio']} |" for i, p in enumerate(result["pairs"])]
        lines += [""]
    rows = sorted((r for r in parallel if r.peak_rss_mb), key=lambda r: -r.peak_rss_mb)[:top]
    serial_rss = {r.model: r.peak_rss_mb for r in serial}
    lines += [f"Largest worker peaks (last pair): RSS high-water mark of the worker that checked the model.", "",
              "| model | parameters | status | peak GB (jobs=1) | peak GB (jobs=J) | seconds (jobs=J) |",
              "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r.model} | {(r.n_params or 0) / 1e6:.1f}M | {r.status} | "
              f"{(serial_rss.get(r.model) or 0) / 1024:.2f} | {r.peak_rss_mb / 1024:.2f} | {r.seconds:.1f} |" for r in rows]
    counts = {s: sum(r.status == s for r in parallel) for s in ("ok", "FAIL", "error", "skipped")}
    lines += ["", f"Models: {len(parallel)} ({counts['ok']} ok, {counts['FAIL']} FAIL, {counts['error']} error, "
                  f"{counts['skipped']} skipped over the parameter limit)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
