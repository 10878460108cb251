"""The quality benchmark's report: records (JSON) -> quality.md, the alpha-sweep plot and the
target checks. ``python benchmarks/quality_report.py`` rebuilds them from
``results/quality.json`` without merging anything."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from common import (ALPHAS, RESULTS, arch_label, fmt, groups, mean_of, pm, short_arch, spearman)

DUALS = ("mudsc_align", "mudsc_zip")
SINGLE = {"mudsc_align": "act_align", "mudsc_zip": "zipit"}
FAMILY = {"mudsc_align": "align", "mudsc_zip": "zip"}


# --------------------------------------------------------------------------- tables
def table_pair(rows, cols) -> str:
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        vals = [r["joint"], r["avg"]] + list(r["task_accs"])
        name = r["method"] + (f" [alpha {r['alpha']:g}]" if "auto" in r["method"] else "")
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def table_agg(rows, two_tasks: bool) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_t = len(rows[0]["task_accs"])
    cols = ["Joint", "Avg"] + (["Task A", "Task B"] if two_tasks else [f"T{t + 1}" for t in range(n_t)])
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        vals = [pm([r["joint"] for r in rs]), pm([r["avg"] for r in rs])]
        vals += [pm([r["task_accs"][t] for r in rs]) for t in range(n_t)]
        alphas = [r["alpha"] for r in rs if "alpha" in r]
        name = m + (f" [alpha {', '.join(f'{a:g}' for a in alphas)}]" if alphas else "")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def regime1_summary(records) -> list[str]:
    """Joint / Avg, mean over pairs, one column per architecture (the README's table)."""
    g = groups(records, "disjoint")
    if not g:
        return []
    methods = ["ensemble", "average", "rebasin", "act_align", "mudsc_align", "mudsc_align (auto, label-free)",
               "mudsc_align (auto, labelled)", "zipit", "weight_zip", "mudsc_zip", "mudsc_zip (auto, label-free)",
               "mudsc_zip (auto, labelled)"]
    keys = list(g)
    lines = ["| method | " + " | ".join(short_arch(d, a, json.loads(k)) for d, a, k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for m in methods:
        cells = []
        for key in keys:
            j, a = mean_of(g[key], m, "joint"), mean_of(g[key], m, "avg")
            cells.append("—" if j is None else f"{j:.1f} / {a:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    alphas = []
    for m in ("mudsc_align (auto, label-free)", "mudsc_zip (auto, label-free)", "mudsc_align (auto, labelled)",
              "mudsc_zip (auto, labelled)"):
        cells = [", ".join(f"{r['alpha']:g}" for r in g[key] if r["method"] == m) or "—" for key in keys]
        alphas.append(f"| alpha chosen: {m.split(' ')[0]} {m[m.index('('):]} | " + " | ".join(cells) + " |")
    return lines + alphas


# --------------------------------------------------------------------------- alpha grid
def proxy_correlations(records) -> dict:
    """Spearman rank correlation of each label-free proxy (and of the labelled score) with
    the test Joint over the alpha grid, per (config, pair, family)."""
    out: dict = {}
    for key, rows in groups(records, "alpha_sweep").items():
        for pair in sorted({r["pair"] for r in rows}):
            for fam in ("align", "zip"):
                grid = sorted((r for r in rows if r["pair"] == pair and r["method"] == fam), key=lambda r: r["alpha"])
                if len(grid) < 3:
                    continue
                joint = [r["joint"] for r in grid]
                for name in grid[0]["proxies"]:
                    out.setdefault(name, {})[(key, pair, fam)] = spearman([r["proxies"][name] for r in grid], joint)
                out.setdefault("labelled (val Joint)", {})[(key, pair, fam)] = spearman([r["val_joint"] for r in grid],
                                                                                         joint)
    return out


def proxy_table(records, default: str) -> list[str]:
    corr = proxy_correlations(records)
    if not corr:
        return []
    keys = list(groups(records, "alpha_sweep"))
    head = "| score | " + " | ".join(f"{short_arch(d, a, json.loads(k))} {fam}" for d, a, k in keys
                                     for fam in ("align", "zip")) + " | mean |"
    lines = [head, "|---|" + "---:|" * (2 * len(keys) + 1)]
    for name, vals in corr.items():
        cells, allv = [], []
        for key in keys:
            for fam in ("align", "zip"):
                v = [x for (k, _, f), x in vals.items() if k == key and f == fam and not math.isnan(x)]
                allv += v
                cells.append(f"{statistics.fmean(v):.2f}" if v else "—")
        label = f"**{name}** (default)" if name == default else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.fmean(allv):.2f} |")
    return lines


def sweep_tables(records) -> list[str]:
    sw = groups(records, "alpha_sweep")
    if not sw:
        return []
    keys = list(sw)
    out = []
    for metric, title in (("joint", "Joint"), ("avg", "Avg")):
        head = "| alpha | " + " | ".join(f"{short_arch(d, a, json.loads(k))} {fam}"
                                         for d, a, k in keys for fam in ("align", "zip")) + " |"
        out += [f"**{title} accuracy vs alpha** (mean over pairs; alpha 0 = act_align / zipit, alpha 1 = rebasin / "
                "weight_zip)", "", head, "|---:|" + "---:|" * (2 * len(keys))]
        for a in ALPHAS:
            cells = []
            for key in keys:
                for fam in ("align", "zip"):
                    v = [r[metric] for r in sw[key] if r["method"] == fam and r["alpha"] == a]
                    cells.append(fmt(statistics.fmean(v)) if v else "—")
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
            pts = [(a, statistics.fmean(r["joint"] for r in rs if r["method"] == fam and r["alpha"] == a),
                    statistics.fmean(r["avg"] for r in rs if r["method"] == fam and r["alpha"] == a))
                   for a in ALPHAS if any(r["method"] == fam and r["alpha"] == a for r in rs)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{fam} Joint")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color=color, alpha=0.6, label=f"{fam} Avg")
        ref = [r for r in records if r["regime"] == "disjoint" and (r["dataset"], r["arch"],
                                                                     json.dumps(r["kw"], sort_keys=True)) == (d, arch, kw)]
        for name, style in (("ensemble", ":"), ("average", "-.")):
            v = mean_of(ref, name)
            if v is not None:
                ax.axhline(v, color="grey", ls=style, lw=1, label=f"{name} Joint")
        ax.set_title(f"{d} / {arch_label(arch, json.loads(kw))}", fontsize=10)
        ax.set_xlabel("alpha (weight of C_W)")
        ax.set_ylabel("accuracy % (mean over pairs)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("MuDSC dual-space alpha sweep, disjoint tasks", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- targets
def targets_report(records) -> list[str]:
    """The quality targets, per architecture, with the figures (regime 1, Joint, mean over pairs)."""
    g = groups(records, "disjoint")
    if not g:
        return []
    lines = ["| target | " + " | ".join(short_arch(d, a, json.loads(k)) for d, a, k in g) + " | met |",
             "|---|" + "---|" * (len(g) + 1)]

    def row(title, test, need=None):
        cells, ok = [], []
        for rows in g.values():
            res = test(rows)
            if res is None:
                cells.append("—")
                continue
            good, text = res
            ok.append(good)
            cells.append(("" if good else "**no** ") + text)
        met = sum(ok) >= (need or len(ok)) if ok else False
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {'yes' if met else '**no**'} "
                     f"({sum(ok)}/{len(ok)}{'' if need is None else f', need {need}'}) |")

    def cmp(a, b, margin):
        def test(rows):
            x, y = mean_of(rows, a), mean_of(rows, b)
            if x is None or y is None:
                return None
            return x >= y + margin, f"{x:.1f} vs {y:.1f}"
        return test

    row("mudsc_zip (auto, label-free) >= zipit + 1", cmp("mudsc_zip (auto, label-free)", "zipit", 1.0), need=4)
    row("mudsc_align (auto, label-free) >= act_align + 1", cmp("mudsc_align (auto, label-free)", "act_align", 1.0),
        need=4)
    row("rebasin >= average", cmp("rebasin", "average", 0.0))
    row("act_align >= average + 3", cmp("act_align", "average", 3.0))
    keys = list(g)
    for key, (a, b, margin) in (((("mnist", "resnet20_gn", json.dumps({"width": 2}))), ("zipit", "act_align", 0.0)),
                                 ((("mnist", "resnet20", json.dumps({"width": 2}))), ("weight_zip", "rebasin", 10.0))):
        if key in g:
            x, y = mean_of(g[key], a), mean_of(g[key], b)
            cells = ["" if k != key else f"{x:.1f} vs {y:.1f}" for k in keys]
            good = x >= y + margin
            lines.append(f"| {a} >= {b}{f' + {margin:g}' if margin else ''} ({short_arch(*key[:2], {})}) | "
                         + " | ".join(cells) + f" | {'yes' if good else '**no**'} |")
    gaps = []
    for dual in DUALS:
        diffs = []
        for rows in g.values():
            lab, free = mean_of(rows, f"{dual} (auto, labelled)"), mean_of(rows, f"{dual} (auto, label-free)")
            if lab is not None and free is not None:
                diffs.append(lab - free)
        if diffs:
            gaps.append((dual, statistics.fmean(diffs), diffs))
    for dual, gap, diffs in gaps:
        lines.append(f"| {dual}: labelled - label-free Joint (mean over architectures <= 1) | "
                     + " | ".join(f"{d:+.1f}" for d in diffs) + f" | {'yes' if gap <= 1.0 else '**no**'} "
                     f"({gap:+.2f}) |")
    cost = [r for r in records if r["regime"] == "auto_cost"]
    for r in cost:
        zc = r["cost"].get("zip", {})
        if r["arch"] == "resnet20":
            lines.append(f"| alpha='auto' (mudsc_zip, label-free) / one mudsc_zip merge <= 3 (ResNet-20x2 BN) | "
                         + " | ".join("" if k != ("mnist", "resnet20", json.dumps({"width": 2})) else
                                      f"{zc['auto_seconds']:.0f}s / {zc['one_merge_seconds']:.0f}s" for k in keys)
                         + f" | {'yes' if zc['ratio'] <= 3.0 else '**no**'} ({zc['ratio']:.2f}) |")
    return lines


# --------------------------------------------------------------------------- the file
NOTES = [
    "Protocol notes:",
    "",
    "- Metrics from `zoo.evaluate` on the test split: Joint = argmax over all classes on the images of all tasks; "
    "Task X = accuracy on task X's images with the argmax restricted to its classes; Avg = mean of the task "
    "accuracies. mean ± std (sample std) over pairs / seeds.",
    "- Calibration data for activation statistics, BatchNorm resets and the label-free alpha proxy: 4 batches x "
    "256 training images, a seeded shuffle of the whole training split (all tasks). Every merged single model with "
    "BatchNorm (presets, task arithmetic, TIES) has its running statistics reset on it; EMR task models are not.",
    "- Every merge of a model set comes from one `mf.Merger` (one graph, one proof, one statistics pass; solves "
    "share weight features and unit matchings through its solve cache, which changes no result).",
    "- Alpha grid: `Merger.merge(\"mudsc_align\"/\"mudsc_zip\", alpha)` for alpha = 0, 0.1, ..., 1 on every pair "
    "(alpha 0 is act_align / zipit, alpha 1 is rebasin / weight_zip). `(auto, labelled)`: the grid point with the "
    "best Joint on 1,024 seeded training images (labels used; the reference MuDSC code scores its grid on "
    "training images too); `(auto, label-free)`: the best default proxy on the calibration data "
    "(`mudsc_fx.alpha_search`), which is what `alpha=\"auto\"` does without labels. On the first pair the "
    "library's own `Merger(...).merge(method, \"auto\")`, run from scratch, must choose the same alpha.",
    "- Regime 2 heads: every zoo backbone ends in a linear projection into the shared class-embedding space "
    "(`proj` / ViT `head`, = `output_params()`), the analogue of EMR's per-task classifier heads, so the main EMR "
    "row keeps it per task; `keep=none` merges it too. Task arithmetic and TIES merge it. TIES: top-20% of |tau| "
    "over the whole model, lam 1.",
    "- Regime 2 pre-training uses all classes but a seeded 10% of the training images (400), for as many optimizer "
    "steps as one task model (pre-trained on all images the base already solves every task and every method ties "
    "with it).",
    "- `align+emr (base=A)` (regime 1): `mf.emr_merge(A, [A, B], align=\"act_align\", keep=heads)`: with model A as "
    "base and anchor, tau_A = 0 and EMR gives back A and aligned(B), so the row equals the individual models (a "
    "storage format, not a merge).",
]


def partial_section(summary: list[dict], seconds: float) -> list[str]:
    """The partial-zipping tables (``benchmarks/partial.py``'s summary): Joint against cost per
    architecture, and the issue's target (ResNet-20x2 BN: >= 75 Joint at <= 1.5x the FLOPs)."""
    lines = ["Regime 1 (disjoint halves of the classes, different inits, shared frozen class head), the "
             "pairs of `benchmarks/quality.py`; mean over pairs. `stop X`: merged up to module X, each "
             "model's own tail after it, predictions combined like the ensemble (sum of softmax). FLOPs "
             "and parameters relative to one model (the ensemble is 2x). Generated by "
             f"`python benchmarks/partial.py` ({seconds / 60:.1f} min); plot: `partial.png`.", ""]
    for arch in dict.fromkeys(s["arch"] for s in summary):
        rows = [s for s in summary if s["arch"] == arch]
        lines += [f"### {rows[0]['dataset']} {arch}", "",
                  "| configuration | Joint | Avg | FLOPs x | params x | pairs |", "|---|---:|---:|---:|---:|---:|"]
        for s in sorted(rows, key=lambda s: (-s["flops_vs_one"], s["kind"])):
            lines.append(f"| {s['kind']} | {s['joint']:.1f} | {s['avg']:.1f} | {s['flops_vs_one']:.2f} | "
                         f"{s['params_vs_one']:.2f} | {s['pairs']} |")
        lines.append("")
    cheap = [s for s in summary if s["dataset"] == "mnist" and s["arch"] == "resnet20 width=2"
             and "stop" in s["kind"] and s["flops_vs_one"] <= 1.5]
    if cheap:
        best = max(cheap, key=lambda s: s["joint"])
        lines += [f"Target (MNIST ResNet-20x2 BN, a partial zip at <= 1.5x the FLOPs of one model reaches >= 75 "
                  f"Joint): {'met' if best['joint'] >= 75 else 'missed'}, best {best['kind']} at "
                  f"{best['flops_vs_one']:.2f}x: {best['joint']:.1f} Joint.", ""]
    return lines


def write_outputs(records, settings, out_stem: Path, final: bool = True) -> None:
    out_stem = Path(out_stem)
    out_json, out_md = out_stem.with_suffix(".json"), out_stem.with_suffix(".md")
    out_png = out_stem.parent / (("alpha_sweep" if out_stem.name == "quality" else out_stem.name + "_alpha_sweep")
                                 + ".png")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"settings": settings, "records": records}, indent=1))
    md = [f"# Merge quality (MuDSC paper protocol, offline){'' if final else ' — PARTIAL'}", ""]
    runs = settings.get("shards") or [settings]
    md += ["Generated by " + "; ".join(
        f"`python benchmarks/quality.py {' '.join(r.get('argv', []))}` ({r.get('wall_seconds', float('nan')) / 60:.1f} "
        f"min, training {r.get('train_seconds', 0.0) / 60:.1f} min; git {r.get('git', 'unknown')})" for r in runs)
        + (f", in parallel, combined ({settings['wall_seconds'] / 60:.1f} min wall)" if len(runs) > 1 else "")
        + f" on {settings['machine']} (shared, loaded; torch threads {settings['threads']}). "
        f"Records: `{out_json.name}`.", "", "Settings: " + settings["summary"], ""]
    if settings.get("timings"):
        md += ["Seconds per configuration (training when not cached, merging, evaluation): "
               + ", ".join(f"{k} {v:.0f}" for k, v in settings["timings"].items()) + ".", ""]
    md += NOTES + [""]
    summary = regime1_summary(records)
    if summary:
        md += ["## Regime 1 summary (Joint / Avg, mean over pairs)", ""] + summary + [""]
    targets = targets_report(records)
    if targets:
        md += ["## Targets (regime 1, Joint, mean over pairs)", ""] + targets + [""]
    for regime, title in (("disjoint", "Regime 1: disjoint tasks, different inits (paper Table 1)"),
                          ("finetune", f"Regime 2: fine-tunes of one pretrained model, N = {settings.get('r2_tasks', 4)} "
                                       "(paper Table 2)")):
        g = groups(records, regime)
        if not g:
            continue
        md += [f"## {title}", ""]
        if regime == "finetune":
            md += ["EMR rows are per-task models by design (no Joint; Avg is the mean of the per-task accuracies). "
                   "T1..T4 are task slots: seed s splits the classes with split_classes(10, 4, seed=s).", ""]
        for (d, arch, kw), rows in g.items():
            n_runs = len({r["pair"] for r in rows})
            what = "pairs" if regime == "disjoint" else "seeds"
            md += [f"### {d} / {arch_label(arch, json.loads(kw))} (mean ± std over {n_runs} {what})", ""]
            md.append(table_agg(rows, two_tasks=(regime == "disjoint")))
            md.append("")
    proxies = proxy_table(records, settings.get("proxy", ""))
    if proxies:
        md += ["## Alpha choice without labels", "",
               "Spearman rank correlation, over the 11 grid points, between each score and the test Joint "
               "(mean over pairs; `labelled (val Joint)` is the labelled choice's score, for reference):", ""]
        md += proxies + [""]
    partial = out_stem.parent / "partial.json"
    if partial.exists() and final:
        data = json.loads(partial.read_text())
        md += ["## Partial zipping (merged trunk, per-model tails)", "", "![partial zipping](partial.png)", ""]
        md += partial_section(data["summary"], data["seconds"])
    sw = sweep_tables(records)
    if sw:
        md += ["## Alpha sweep (disjoint tasks)", "", f"![alpha sweep]({out_png.name})", ""] + sw
    out_md.write_text("\n".join(md))
    plot_sweep(records, out_png)


def main(argv=None) -> int:
    path = Path(argv[0] if argv else sys.argv[1] if len(sys.argv) > 1 else RESULTS / "quality.json")
    data = json.loads(path.read_text())
    write_outputs(data["records"], data["settings"], path.with_suffix(""))
    print("\n".join(targets_report(data["records"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
