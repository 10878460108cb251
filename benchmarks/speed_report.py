"""Tables and targets of benchmarks/speed.py: per-case summaries of the runs, the markdown
report and the targets of the round (the runner is speed.py)."""
from __future__ import annotations

import statistics

import speed_dist

SEEDS = (1, 2)
METHODS = ("zipit", "act_align", "mudsc_zip")
TARGET_RATIO = 1.5          # total merge time / floor for ResNet-20 x4
TARGET_STATS_RATIO = 1.3    # statistics / floor, every case
TARGET_VIT_B_RATIO = 2.5    # vit_b_16 mudsc_zip merge time / floor ...
TARGET_VIT_B_PEAK_MB = 3 * 1024  # ... and its peak RSS
TARGET_R50_SOLVE_S = 30.0   # resnet50 mudsc_zip solve
TARGET_ZIP_4096_S = 5.0     # zip fast at n = 4096
TARGET_ZIP_SPEEDUP = 20.0   # reference / fast at n = 2048


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


STAGES = ("trace", "infer", "statistics", "solve", "rewrite", "reset_bn")


def summarise(runs: list[dict], methods) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "no runs"}
    summary = {"repeats": len(ok), "images": ok[0]["images"], "batch": ok[0]["batch"],
               "free_spaces": ok[0]["free_spaces"], "max_space": ok[0]["max_space"],
               "floor_s": _median([statistics.mean(r["floor_s"]) for r in ok]),
               "floor_drift": _median([r["floor_s"][1] / r["floor_s"][0] for r in ok]),
               "statistics_s": _median([r["statistics_s"] for r in ok]),
               "statistics_over_floor": _median([r["statistics_s"] / statistics.mean(r["floor_s"]) for r in ok]),
               "statistics_peak_mb": _median([r.get("statistics_peak_mb") for r in ok]),
               "work": next((r["work"] for r in ok if "work" in r), None),
               "methods": {}}
    for m in methods:
        rows = [r for r in ok if m in r["methods"] and "error" not in r["methods"][m]]
        if not rows:
            errs = [r["methods"].get(m, {}).get("error") for r in ok]
            summary["methods"][m] = {"error": next((e for e in errs if e), "not run")}
            continue
        per = {}
        for st in STAGES:
            src = [(r["methods"][m] if st in ("solve", "rewrite", "reset_bn") else r) for r in rows]
            per[st + "_s"] = _median([x[st + "_s"] for x in src])
            per[st + "_peak_mb"] = _median([x.get(st + "_peak_mb") for x in src])
        totals = [sum((r["methods"][m] if st in ("solve", "rewrite", "reset_bn") else r)[st + "_s"] for st in STAGES)
                  for r in rows]
        ratios = [t / statistics.mean(r["floor_s"]) for t, r in zip(totals, rows)]
        per["total_s"] = _median(totals)
        per["ratio_to_floor"] = _median(ratios)
        per["ratios"] = ratios
        per["ratio_without_reset_bn"] = _median([
            (t - r["methods"][m]["reset_bn_s"]) / statistics.mean(r["floor_s"]) for t, r in zip(totals, rows)])
        per["statistics_over_floor"] = _median([r["statistics_s"] / statistics.mean(r["floor_s"]) for r in rows])
        per["merge_peak_mb"] = _median([r["methods"][m]["merge_peak_mb"] for r in rows])
        per["sweeps"] = _median([r["methods"][m]["sweeps"] for r in rows])
        summary["methods"][m] = per
    return summary


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    lines = [f"# Speed and memory ({'quick' if result['quick'] else 'full'} run)", "",
             f"N = {len(SEEDS)} models (seeds {SEEDS}), random initialisation (timing does not depend on "
             f"training). Threads: {result['threads']}. Seconds are medians over the repeats; "
             "ratio = total merge time / floor, median over repeats; floor = bare forward passes of "
             "the N models over the same calibration data (mean of one run before and one after the merge).",
             "Peak MB: RSS high-water minus RSS at the start (whole merge: models and data already "
             "loaded). trace, infer and statistics are shared by the methods.", ""]
    head = ("| case | method | images | floor | trace | infer | statistics | solve | rewrite | reset_bn | "
            "total | ratio | peak MB (stats / solve / merge) | sweeps |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in result["cases"].items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error'][:200]} |" + " |" * 12)
            continue
        for m, p in s["methods"].items():
            if "error" in p:
                lines.append(f"| {name} | {m} | error: {p['error'][:200]} |" + " |" * 11)
                continue
            lines.append(
                f"| {name} ({s['repeats']} run{'s' if s['repeats'] > 1 else ''}) | {m} | {s['images']} | {_f(s['floor_s'])} | {_f(p['trace_s'])} | {_f(p['infer_s'])} | "
                f"{_f(p['statistics_s'])} | {_f(p['solve_s'])} | {_f(p['rewrite_s'])} | {_f(p['reset_bn_s'])} | "
                f"{_f(p['total_s'])} | **{_f(p['ratio_to_floor'])}** | {_f(p['statistics_peak_mb'], '{:.0f}')} / "
                f"{_f(p['solve_peak_mb'], '{:.0f}')} / {_f(p['merge_peak_mb'], '{:.0f}')} | {_f(p['sweeps'], '{:.0f}')} |")
    lines += ["", "## Statistics against the floor", "",
              "statistics / floor: median over repeats (the same process). Work: FLOPs torch counts (GEMMs and "
              "convolutions) in the statistics pass over the first batch, against the bare forward passes of that "
              "batch: 1 + the products the statistics add. With the products at the forward's speed, statistics / "
              "floor cannot go below the work ratio.", "",
              "| case | floor | statistics | statistics / floor | work (statistics pass / forward) | peak MB |",
              "|---|---|---|---|---|---|"]
    for name, s in result["cases"].items():
        if "error" in s:
            continue
        if "statistics_over_floor" not in s:  # a result from before the case-level summary
            first = next((p for p in s["methods"].values() if "error" not in p), None)
            if first is None:
                continue
            s = dict(s, statistics_s=first["statistics_s"], statistics_over_floor=first["statistics_over_floor"],
                     statistics_peak_mb=first["statistics_peak_mb"])
        w = s.get("work")
        work = "-" if not w else f"{w['statistics_gflop'] / w['forward_gflop']:.2f} ({w['forward_gflop']:.0f} GFLOP forward)"
        lines.append(f"| {name} | {_f(s['floor_s'])} | {_f(s['statistics_s'])} | **{_f(s['statistics_over_floor'])}** | "
                     f"{work} | {_f(s.get('statistics_peak_mb'), '{:.0f}')} |")
    lines += speed_dist.markdown(result.get("distributed"))
    sc = result.get("solver_scaling")
    if sc and "rows" in sc:
        lines += ["", f"## Solver scaling (N = {sc['n_models']}, seconds, median of {sc['repeats']})", "",
                  "| n | align | zip fast | zip reference | reference / fast | zip rank-1 | group_align |",
                  "|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            ratio = r["ratio_reference_over_fast"]
            lines.append(f"| {r['n']} | {_f(r['align_s'], '{:.3f}')} | {_f(r['zip_fast_s'], '{:.3f}')} | "
                         f"{_f(r['zip_reference_s'], '{:.3f}')} | {_f(ratio, '{:.1f}x')} | "
                         f"{_f(r['zip_fast_rank1_s'], '{:.3f}')} | {_f(r['group_align_s'], '{:.3f}')} |")
    elif sc:
        lines += ["", f"Solver scaling: {sc.get('error')}"]
    lines += ["", "## Targets", ""]
    for t in result["targets"]:
        lines.append(f"- {'PASS' if t['ok'] else ('FAIL' if t['ok'] is False else 'n/a')}: {t['what']} "
                     f"(measured {t['measured']})")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[dict]:
    out = []
    rn = result["cases"].get("resnet20x4", {})
    quick = result.get("case_meta", {}).get("resnet20x4", {}).get("quick", result["quick"])
    for m in METHODS:
        p = rn.get("methods", {}).get(m)
        r = None if not p or "error" in p else p["ratio_to_floor"]
        what = f"ResNet-20 x4, {m}: merge time / floor <= {TARGET_RATIO}"
        if quick:  # one batch: the trace's forward of the first batch alone is a quarter of the floor
            what += " (quick run: not assessed, the data is too small)"
        out.append({"what": what, "measured": _f(r), "ok": None if r is None or quick else r <= TARGET_RATIO})
    for name, case in result["cases"].items():
        r = case.get("statistics_over_floor", next((p.get("statistics_over_floor") for p in case.get("methods", {}).values()), None))
        quick = result.get("case_meta", {}).get(name, {}).get("quick", result["quick"])
        out.append({"what": f"{name}: statistics / floor <= {TARGET_STATS_RATIO}" + (" (quick run)" if quick else ""),
                    "measured": _f(r), "ok": None if r is None or quick else r <= TARGET_STATS_RATIO})
    vb = result["cases"].get("vit_b_16", {}).get("methods", {}).get("mudsc_zip")
    if vb and "error" not in vb:
        out.append({"what": f"vit_b_16 mudsc_zip: merge time / floor <= {TARGET_VIT_B_RATIO}, peak RSS <= "
                            f"{TARGET_VIT_B_PEAK_MB} MB", "measured": f"{_f(vb['ratio_to_floor'])}, "
                                                             f"{_f(vb['merge_peak_mb'], '{:.0f}')} MB",
                    "ok": vb["ratio_to_floor"] <= TARGET_VIT_B_RATIO and vb["merge_peak_mb"] <= TARGET_VIT_B_PEAK_MB})
    r50 = result["cases"].get("resnet50", {}).get("methods", {}).get("mudsc_zip")
    if r50 and "error" not in r50:
        out.append({"what": f"resnet50 mudsc_zip: solve <= {TARGET_R50_SOLVE_S:.0f} s",
                    "measured": f"{_f(r50['solve_s'])} s", "ok": r50["solve_s"] <= TARGET_R50_SOLVE_S})
    out += speed_dist.targets(result.get("distributed"))
    rows = {r["n"]: r for r in result.get("solver_scaling", {}).get("rows", [])}
    z = rows.get(4096, {}).get("zip_fast_s")
    out.append({"what": f"zip at n = 4096 < {TARGET_ZIP_4096_S} s", "measured": _f(z, "{:.2f} s"),
                "ok": None if z is None else z < TARGET_ZIP_4096_S})
    q = rows.get(2048, {}).get("ratio_reference_over_fast")
    out.append({"what": f"zip fast >= {TARGET_ZIP_SPEEDUP:.0f}x the reference at n = 2048",
                "measured": _f(q, "{:.1f}x"), "ok": None if q is None else q >= TARGET_ZIP_SPEEDUP})
    return out


TITLES = {"resnet20x4": "ResNet-20 x4, MNIST", "vit": "small ViT, MNIST", "resnet50": "torchvision resnet50, 224 px",
          "vit_b_16": "torchvision vit_b_16, 224 px"}


def readme_table(result: dict, taskvec: dict | None = None) -> str:
    """The README's speed table (between its speed-table markers): one row per case, then the
    distributed rows and, with ``taskvec`` (benchmarks/results/taskvec_scale.json), the
    out-of-core task-vector rows."""
    lines = ["| case | images | floor s | statistics s (/ floor) | solve s (zipit / act_align / mudsc_zip) | "
             "reset_bn s | merge / floor (zipit / act_align / mudsc_zip) | peak MB (mudsc_zip) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in result["cases"].items():
        if "error" in c:
            lines.append(f"| {TITLES.get(name, name)} | error: {c['error'][:100]} | | | | | | |")
            continue
        ms = [c["methods"].get(m, {}) for m in METHODS]
        ok = [m for m in ms if "error" not in m and m]
        solve = " / ".join(_f(m.get("solve_s")) for m in ms)
        ratio = " / ".join(_f(m.get("ratio_to_floor")) for m in ms)
        zp = c["methods"].get("mudsc_zip", {})
        st = c.get("statistics_s", ok[0].get("statistics_s") if ok else None)  # older results: per method
        st_ratio = c.get("statistics_over_floor", ok[0].get("statistics_over_floor") if ok else None)
        runs = f"{c['repeats']} run{'s' if c['repeats'] > 1 else ''}"
        lines.append(f"| {TITLES.get(name, name)} ({runs}) | {c['images']} | {_f(c['floor_s'], '{:.1f}')} | "
                     f"{_f(st, '{:.1f}')} ({_f(st_ratio)}) | {solve} | "
                     f"{_f(ok[0].get('reset_bn_s') if ok else None, '{:.1f}')} | {ratio} | "
                     f"{_f(zp.get('merge_peak_mb'), '{:.0f}')} |")
    d = result.get("distributed")
    if d and "error" not in d:
        ag = d.get("agreement") or {}
        worst = max((a["output_max_rel_diff"] for a in ag.get("methods", {}).values()), default=None)
        lines += ["", f"| distributed statistics ({d['case']}, {d['images']} images, gloo, 1 thread per rank) | 1 rank s | "
                      f"{d['world']} ranks s | speedup | merged outputs, max rel diff |", "|---|---|---|---|---|",
                  f"| statistics pass | {d['one_rank_s']:.1f} | {d['many_ranks_s']:.1f} | **{d['speedup']:.2f}x** | "
                  f"{_f(worst, '{:.1e}')} |"]
    if taskvec:
        gb = taskvec["checkpoint"]["bytes"] / 1e9
        lines += ["", f"| out of core (N = {taskvec['n']} x {taskvec['checkpoint']['params'] / 1e6:.0f}M-parameter "
                      f"safetensors, one checkpoint {gb:.2f} GB) | streamed peak GB (/ one checkpoint) | "
                      "in memory | before streaming |", "|---|---|---|---|"]
        by = {}
        for r in taskvec["rows"]:
            by.setdefault(r["label"], {})[r["impl"]] = r
        for label, rows in by.items():
            cell = {k: (f"{v['peak_rss'] / 1e9:.2f} ({v['ratio']:.2f}x)" if "peak_rss" in v else "-") for k, v in rows.items()}
            lines.append(f"| {label} | **{cell.get('stream', '-')}** | {cell.get('in-memory', '-')} | {cell.get('old', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python benchmarks/speed_report.py speed.json [taskvec_scale.json]: the README table
    import json
    import sys
    res = json.load(open(sys.argv[1]))
    tv = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else None
    print(readme_table(res, tv), end="")
