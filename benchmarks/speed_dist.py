"""Distributed statistics rows of benchmarks/speed.py: the statistics of one case computed by
1 rank and by W gloo ranks (one thread each, spawned with torch.multiprocessing on this
machine), and whether the merged models agree.

Each (world, repeat) runs in a fresh worker process (speed.py's ``_spawn``), which spawns the
ranks. Every rank builds the same models and data, runs ``mf.Merger`` (infer, verify), then
times ``merger.statistics()`` between two barriers (its shard of the batches plus the
all-reduce); rank 0 then merges with each method (it solves, the others receive the
alignment; reset_bn is sharded) and saves the merged state, the statistics and the merged
model's outputs on the first batch. Runs alternate 1 rank, W ranks, 1 rank, ... so that a
change in machine load hits both. Reported: median seconds, speedup = median over repeats
of (1-rank seconds / W-rank seconds) of the same repeat, and the agreement of the results.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_CASE = "resnet20x4"
METHODS = ("zipit", "mudsc_zip")
TARGET_SPEEDUP = 1.6


def _rank_main(rank: int, world: int, spec: dict, out_dir: str) -> None:
    import speed  # the benchmark's helpers (this file's directory is on sys.path)
    speed._limit_threads(spec["threads"])
    import torch
    import torch.distributed as dist
    import mudsc_fx as mf
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    try:
        case = dict(speed.CASES[spec["case"]])
        if spec.get("images"):
            case["images"] = case["quick_images"] = spec["images"]
        models, data, n_images = speed._build(case, spec["quick"])
        merger = mf.Merger(models, data)
        dist.barrier()
        t = time.perf_counter()
        stats = merger.statistics()
        dist.barrier()
        seconds = time.perf_counter() - t
        rec = {"rank": rank, "world": world, "statistics_s": seconds, "images": n_images,
               "batches": len(data), "methods": {}}
        for method in spec["methods"]:
            t = time.perf_counter()
            res = merger.merge(method)
            rec["methods"][method] = {"merge_s": time.perf_counter() - t, "solve_s": res.seconds.get("solve")}
            if rank == 0:
                with torch.no_grad():
                    y = res.model(data[0])
                torch.save({"state": res.model.state_dict(), "output": y,
                            "M": {s: [torch.as_tensor(m) for m in ms] for s, ms in res.alignment.M.items()}},
                           Path(out_dir) / f"{method}.pt")
        if rank == 0:
            torch.save({s: torch.from_numpy(c) for s, c in stats.corr.items()}, Path(out_dir) / "corr.pt")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rec))
    finally:
        dist.destroy_process_group()


def worker(spec: dict) -> dict:
    """One (world, repeat): spawn the ranks, collect their records."""
    import torch.multiprocessing as mp
    out_dir = spec["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_rank_main, args=(spec["world"], spec, out_dir), nprocs=spec["world"], join=True)
    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(spec["world"])]
    return {"world": spec["world"], "repeat": spec["repeat"], "out_dir": out_dir, "ranks": ranks,
            "statistics_s": max(r["statistics_s"] for r in ranks), "images": ranks[0]["images"],
            "batches": ranks[0]["batches"]}


def speed_batch(case: str) -> int:
    import speed
    return speed.CASES[case]["batch"]


def _agreement(dir_one: str, dir_many: str, methods) -> dict:
    """How far the W-rank results are from the 1-rank ones (statistics, alignments, models)."""
    import torch
    a, b = torch.load(Path(dir_one) / "corr.pt"), torch.load(Path(dir_many) / "corr.pt")
    out = {"corr_max_abs_diff": max(float((a[s] - b[s]).abs().max()) for s in a), "methods": {}}
    for m in methods:
        x, y = torch.load(Path(dir_one) / f"{m}.pt"), torch.load(Path(dir_many) / f"{m}.pt")
        same = [all(torch.equal(p, q) for p, q in zip(x["M"][s], y["M"][s])) for s in x["M"]]
        params = [k for k, v in x["state"].items() if v.is_floating_point()]
        out["methods"][m] = {
            "spaces_same_alignment": f"{sum(same)}/{len(same)}",
            "param_max_abs_diff": max(float((x["state"][k] - y["state"][k]).abs().max()) for k in params),
            "output_max_rel_diff": float((x["output"] - y["output"]).abs().max() / x["output"].abs().max()),
        }
    return out


def run(spawn, case: str, world: int, repeats: int, threads: int, quick: bool, images, timeout: float) -> dict:
    """The distributed section of the result; ``spawn(spec)`` runs a worker process."""
    if quick and not images:  # a few batches, so that every rank has a shard
        images = 4 * speed_batch(case)
    runs = {1: [], world: []}
    agreement = None
    with tempfile.TemporaryDirectory(prefix="mudsc_speed_dist_") as tmp:
        for r in range(repeats):
            for w in (1, world):
                spec = {"kind": "dist", "case": case, "world": w, "repeat": r, "threads": threads, "quick": quick,
                        "images": images, "methods": list(METHODS), "out_dir": os.path.join(tmp, f"w{w}_r{r}")}
                t = time.perf_counter()
                res = spawn(spec, timeout)
                runs[w].append(res)
                if "error" in res:
                    print(f"distributed {case} world {w} repeat {r}: {res['error']}", flush=True)
                else:
                    print(f"distributed {case} world {w} repeat {r}: statistics {res['statistics_s']:.2f}s "
                          f"({time.perf_counter() - t:.0f}s)", flush=True)
        ok = [(x, y) for x, y in zip(runs[1], runs[world]) if "error" not in x and "error" not in y]
        if ok:
            agreement = _agreement(ok[0][0]["out_dir"], ok[0][1]["out_dir"], METHODS)
    for w in runs:
        for res in runs[w]:
            res.pop("out_dir", None)
    if not ok:
        return {"case": case, "world": world, "error": next(r["error"] for rs in runs.values() for r in rs
                                                           if "error" in r), "runs": runs}
    return {"case": case, "world": world, "threads": threads, "quick": quick, "repeats": len(ok),
            "images": ok[0][0]["images"],
            "batches": ok[0][0]["batches"],
            "one_rank_s": statistics.median(x["statistics_s"] for x, _ in ok),
            "many_ranks_s": statistics.median(y["statistics_s"] for _, y in ok),
            "speedup": statistics.median(x["statistics_s"] / y["statistics_s"] for x, y in ok),
            "speedups": [x["statistics_s"] / y["statistics_s"] for x, y in ok],
            "agreement": agreement, "runs": {str(k): v for k, v in runs.items()}}


def markdown(section: dict) -> list[str]:
    if not section:
        return []
    if "error" in section:
        return ["", f"Distributed statistics: {section['error'][:300]}"]
    w = section["world"]
    lines = ["", f"## Distributed statistics ({section['case']}, {section['images']} images in "
                 f"{section['batches']} batches, {section['threads']} thread per rank, gloo, "
                 f"{section['repeats']} run{'s' if section['repeats'] > 1 else ''})", "",
             "Seconds of `merger.statistics()` between barriers (the rank's shard and the all-reduce), median; "
             "speedup: median over repeats of 1 rank / "
             f"{w} ranks in the same repeat (runs alternate).", "",
             f"| 1 rank | {w} ranks | speedup | max abs diff of the correlations |", "|---|---|---|---|",
             f"| {section['one_rank_s']:.2f} | {section['many_ranks_s']:.2f} | **{section['speedup']:.2f}x** | "
             f"{section['agreement']['corr_max_abs_diff']:.1e} |", "",
             f"| method | spaces with the same alignment (1 vs {w} ranks) | max abs diff of merged parameters | "
             "max rel diff of merged outputs |", "|---|---|---|---|"]
    for m, a in section["agreement"]["methods"].items():
        lines.append(f"| {m} | {a['spaces_same_alignment']} | {a['param_max_abs_diff']:.1e} | "
                     f"{a['output_max_rel_diff']:.1e} |")
    return lines


def targets(section: dict) -> list[dict]:
    if not section:
        return []
    w = section.get("world", 2)
    sp = section.get("speedup")
    out = [{"what": f"{w} gloo ranks compute the {section.get('case')} statistics >= {TARGET_SPEEDUP}x faster "
                    "than 1 rank (one thread each)",
            "measured": "-" if sp is None else f"{sp:.2f}x",
            "ok": None if sp is None or section.get("quick") else sp >= TARGET_SPEEDUP}]
    if section.get("quick"):
        out[0]["what"] += " (quick run: not assessed)"
    ag = section.get("agreement")
    if ag:
        same = all(a["spaces_same_alignment"].split("/")[0] == a["spaces_same_alignment"].split("/")[1]
                   for a in ag["methods"].values())
        worst = max(a["output_max_rel_diff"] for a in ag["methods"].values())
        out.append({"what": f"the merged models of 1 and {w} ranks agree (same alignments, outputs within 1e-4)",
                    "measured": f"same alignments: {same}, max rel output diff {worst:.1e}",
                    "ok": same and worst <= 1e-4})
    return out
