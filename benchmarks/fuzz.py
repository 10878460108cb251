"""Fuzz the permutation inference with many seeded random models and write a summary.

Every model (tests/fuzz_models.py) is inferred and proven by ``mf.check``; every free space
is also permuted alone; every ``--merge-every``-th model is merged with a randomly permuted
copy of itself (``act_align``), which must give the model back. Failures are shrunk to a
minimal program and grouped by kind; the summary counts models, proven, with barriers,
clear errors, unclear errors, wrong proofs, wrong merges, seconds, and how often each op of
the catalogue and each row of the rule table was exercised.

    flock /tmp/mudsc_heavy.lock python benchmarks/fuzz.py --models 10000 --jobs 2

writes ``benchmarks/results/fuzz.json`` and ``fuzz.md``.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

def _run_chunk(args: tuple) -> list[dict]:
    seeds, merge_every = args
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from fuzz_harness import Options, run_seed

    out = []
    for seed in seeds:
        opts = Options(check_seeds=(0, 1), merge=merge_every > 0 and seed % merge_every == 0)
        try:
            program, o = run_seed(seed, opts)
        except Exception as e:  # a bug of the fuzzer itself: recorded, the run goes on
            out.append(dict(seed=seed, status="harness_error", detail=f"{type(e).__name__}: {e}", ops=[], families=[],
                            n_free=0, n_barriers=0, coverage=0.0, rule_keys=[], seconds=0.0, merged=opts.merge))
            continue
        out.append(dict(seed=seed, status=o.status, detail=o.detail, ops=list(o.ops), families=list(o.families),
                        n_free=o.n_free, n_barriers=o.n_barriers, coverage=o.coverage, rule_keys=list(o.rule_keys),
                        seconds=o.seconds, merged=opts.merge))
    return out


def _signature(r: dict) -> str:
    """Failures of one kind: the status and the detail without numbers."""
    words = [w for w in r["detail"].replace(":", " ").split() if not any(c.isdigit() for c in w)]
    return r["status"] + ": " + " ".join(words[:12])


def _shrunk(seed: int, merged: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from fuzz_harness import Options, describe, run_seed, shrink

    opts = Options(check_seeds=(0, 1), merge=merged)
    program, o = run_seed(seed, opts)
    small, so = shrink(program, o, opts)
    return dict(seed=seed, status=so.status, detail=so.detail, program=describe(small), repro=f"build({small!r})")


def run(n_models: int, seed0: int, jobs: int, merge_every: int, max_shrinks: int) -> dict:
    seeds = list(range(seed0, seed0 + n_models))
    chunks = [(seeds[i:i + 50], merge_every) for i in range(0, len(seeds), 50)]
    t = time.perf_counter()
    rows: list[dict] = []
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            for part in pool.imap_unordered(_run_chunk, chunks):
                rows += part
                _progress(rows, n_models, t)
    else:
        for c in chunks:
            rows += _run_chunk(c)
            _progress(rows, n_models, t)
    seconds = time.perf_counter() - t
    rows.sort(key=lambda r: r["seed"])

    from fuzz_harness import FAILURES
    from fuzz_ops import OPS
    from mudsc_fx.rules import table as rule_table
    from fuzz_harness import key_name

    counts = collections.Counter(r["status"] for r in rows)
    failures = [r for r in rows if r["status"] in FAILURES]
    groups: dict[str, list[dict]] = {}
    for r in failures:
        groups.setdefault(_signature(r), []).append(r)
    shrunk = []
    for sig, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = rs[0]
        entry = dict(kind=sig, count=len(rs), seeds=[r["seed"] for r in rs[:20]])
        if len(shrunk) < max_shrinks and first["status"] != "harness_error":
            try:
                entry["minimal"] = _shrunk(first["seed"], first["merged"])
            except Exception as e:
                entry["minimal_error"] = f"{type(e).__name__}: {e}"
        shrunk.append(entry)
    op_models = collections.Counter(op for r in rows for op in set(r["ops"]))
    op_failed = collections.Counter(op for r in failures for op in set(r["ops"]))
    keys_hit = collections.Counter(k for r in rows for k in r["rule_keys"])
    import torch
    # ATen overloads serve torch.export graphs; fx graphs (what the fuzzer traces) use the others
    all_keys = sorted(key_name(k) for k in rule_table.all_keys() if not isinstance(k, torch._ops.OpOverload))
    per_model = [r["seconds"] for r in rows if r["seconds"]]
    merged = [r for r in rows if r["merged"]]
    return {
        "models": len(rows), "seed0": seed0, "jobs": jobs, "merge_every": merge_every,
        "proven": counts["proven"], "with_barriers": sum(1 for r in rows if r["n_barriers"] > 0),
        "with_free_spaces": sum(1 for r in rows if r["n_free"] > 0),
        "clear_errors": counts["clear_error"], "unclear_errors": counts["unclear_error"],
        "wrong_proofs": counts["wrong_proof"], "wrong_merges": counts["wrong_merge"],
        "missing_barriers": counts["missing_barrier"], "generator_failed": counts["generator_failed"],
        "harness_errors": counts["harness_error"],
        "merge_oracle_models": len(merged),
        "seconds": round(seconds, 1), "seconds_per_model_median": round(statistics.median(per_model), 4) if per_model else None,
        "mean_free_spaces": round(statistics.fmean(r["n_free"] for r in rows), 3),
        "mean_coverage": round(statistics.fmean(r["coverage"] for r in rows), 4),
        "failure_kinds": shrunk,
        "op_coverage": {op: {"models": op_models[op], "failed": op_failed[op]} for op in sorted(OPS)},
        "rule_keys_exercised": len(set(keys_hit) & set(all_keys)), "rule_keys_total": len(all_keys),
        "rule_key_counts": dict(sorted(keys_hit.items())),
        "rule_keys_never_exercised": sorted(set(all_keys) - set(keys_hit)),
        "environment": {"python": platform.python_version(), "torch": __import__("torch").__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
    }


def _progress(rows: list, total: int, t0: float) -> None:
    if len(rows) % 500 == 0 or len(rows) == total:
        c = collections.Counter(r["status"] for r in rows)
        print(f"  {len(rows):>6}/{total} models, {time.perf_counter() - t0:7.1f} s  {dict(c)}", flush=True)


def markdown(res: dict) -> str:
    lines = ["# Fuzzing the permutation inference", "",
             f"{res['models']} seeded random models (seeds {res['seed0']}..{res['seed0'] + res['models'] - 1}, "
             f"tests/fuzz_models.py), {res['jobs']} process(es), {res['seconds']} s "
             f"(median {res['seconds_per_model_median']} s per model). Each model: `mf.infer`, `mf.check` with two "
             "seeds, every free space permuted alone; every "
             f"{res['merge_every']}-th model ({res['merge_oracle_models']} models) also merged with a permuted copy "
             "of itself (`act_align`).", "",
             "| models | proven | with free spaces | with barriers | clear errors | unclear errors | wrong proofs | "
             "wrong merges | missing barriers | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {res['models']} | {res['proven']} | {res['with_free_spaces']} | {res['with_barriers']} | "
             f"{res['clear_errors']} | {res['unclear_errors']} | {res['wrong_proofs']} | {res['wrong_merges']} | "
             f"{res['missing_barriers']} | {res['seconds']} |", "",
             f"Rule table rows (fx keys) exercised: {res['rule_keys_exercised']} of {res['rule_keys_total']}; mean free spaces "
             f"per model {res['mean_free_spaces']}, mean coverage {res['mean_coverage']}.", ""]
    if res["failure_kinds"]:
        lines += ["## Failures by kind", ""]
        for f in res["failure_kinds"]:
            lines += [f"### {f['kind']} ({f['count']} models; seeds {', '.join(map(str, f['seeds'][:8]))})", ""]
            if "minimal" in f:
                m = f["minimal"]
                lines += [f"Minimal program (seed {m['seed']}): {m['status']}: {m['detail']}", "", "```",
                          m["program"], "```", ""]
    lines += ["## Ops of the catalogue", "", "| op | models | failed |", "|---|---:|---:|"]
    lines += [f"| {op} | {v['models']} | {v['failed']} |" for op, v in res["op_coverage"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--merge-every", type=int, default=10, help="merge oracle on every k-th model (0: never)")
    ap.add_argument("--max-shrinks", type=int, default=12, help="failure kinds shrunk to a minimal program")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    a = ap.parse_args(argv)
    res = run(a.models, a.seed0, a.jobs, a.merge_every, a.max_shrinks)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    a.out.with_suffix(".md").write_text(md)
    print(md.split("## Ops")[0])
    return 1 if res["wrong_proofs"] or res["unclear_errors"] or res["missing_barriers"] or res["harness_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
