"""Every torchvision detection model merged end-to-end through the compositional fallback
(random weights, small images). HEAVY: run it under the shared lock.

    flock /tmp/mudsc_heavy.lock python benchmarks/zoo_detection.py --jobs 2     # all, writes JSON
    flock /tmp/mudsc_heavy.lock python benchmarks/zoo_detection.py --only ssdlite320_mobilenet_v3_large --update

Per model: the plan (largest traced submodules, each proven on its own inputs, all proven
together on the whole model); a copy with every unit randomly permuted is merged back into
the original with ``mudsc_align`` (the merged model must be the original: every tensor equal,
so the detections too); the same with ``act_align``, recorded but not required (on these
random-init backbones and two calibration batches of two 96-pixel images, activations alone
do not identify every unit; weights do); and two independent random inits are merged with
``zipit`` (BatchNorm statistics reset), which must run and give finite detections. The JSON
keeps each model's composition report.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's mudsc_fx, installed or not
OUT = ROOT / "benchmarks/results/zoo_detection.json"


def build(name: str, seed: int, size: int = 96):
    """A torchvision detection model with random weights, sized for a CPU: small images, few
    proposals and detections, and a score threshold of 0 so that every image yields boxes."""
    import torchvision
    kw: dict = {"weights": None, "weights_backbone": None}
    if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn")):
        kw.update(min_size=size, max_size=size, box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, box_detections_per_img=20)
    elif name.startswith(("retinanet", "fcos")):
        kw.update(min_size=size, max_size=size, score_thresh=0.0, topk_candidates=100, detections_per_img=20)
    elif name.startswith("ssd"):  # SSD resizes to its own fixed size (300 / 320)
        kw.update(score_thresh=0.0, topk_candidates=100, detections_per_img=20)
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, **kw).eval()


def images(seed: int, n: int = 2, size: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size + 16 * k, generator=g) for k in range(n)]


def detections(model, imgs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for d in model(imgs) for _, t in sorted(d.items())]


def run_one(name: str, size: int = 96) -> dict:
    from mudsc_fx.passes import compose as C
    import mudsc_fx as mf
    row: dict = {"model": name}
    t0 = time.perf_counter()
    a = build(name, 0, size)
    example = (images(100, size=size),)
    data = [images(s, size=size) for s in range(2)]
    try:
        mf.trace(a, example)
        row["whole"] = "traces"
    except mf.TraceError as e:
        row["whole"] = str(e).splitlines()[0][:200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = C.plan_composition(a, example, whole_error=row["whole"])
        row["plan_seconds"] = round(time.perf_counter() - t0, 1)
        t = time.perf_counter()
        b = C.permuted_copy(a, comp, seed=1)
        want = detections(a, example[0])
        for method, key in (("mudsc_align", "merge_back"), ("act_align", "act_align_back")):
            back = C.merge_compositional([a, b], data, method, reset_bn=False, input_fn=lambda x: (x,),
                                         unit_merger=mf.Merger, composition=comp)
            got = detections(back, example[0])
            row[f"{key}_max_abs_err"] = max(((x.float() - y.float()).abs().max().item() if x.numel() else 0.0)
                                            for x, y in zip(want, got)) if len(want) == len(got) else float("inf")
            sa, sb = a.state_dict(), back.state_dict()
            row[f"{key}_params_differing"] = sum(1 for k in sa if not torch.equal(sa[k], sb[k]))
        row["detections"] = sum(x.shape[0] for x in want[:1])
        row["merge_back_seconds"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        c = build(name, 1, size)
        merged = C.merge_compositional([a, c], data, "zipit", input_fn=lambda x: (x,), composition=comp,
                                         unit_merger=mf.Merger)
        out = detections(merged, example[0])
        row["independent_finite"] = all(bool(torch.isfinite(x.float()).all()) for x in out)
        row["independent_seconds"] = round(time.perf_counter() - t, 1)
    row["report"] = comp.report.to_dict()
    row["summary"] = comp.report.summary()
    row["ok"] = (row["merge_back_params_differing"] == 0 and row["merge_back_max_abs_err"] <= 1e-4
                 and row["independent_finite"]
                 and comp.report.max_abs_err is not None and comp.report.max_abs_err < 1e-8)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown(result: dict) -> str:
    """One row per model, then each model's composition report."""
    rows = result["rows"]
    ok = sum(bool(r.get("ok")) for r in rows)
    lines = [f"# torchvision detection models through the compositional fallback", "",
             f"torchvision {result['torchvision']}, random weights, {result['size']}-pixel images, score "
             f"threshold 0. **{ok} of {len(rows)} merged end-to-end** (whole-model proof < 1e-8; a permuted "
             f"copy merged back with mudsc_align gives the original model, every tensor equal; two independent "
             f"inits merged with zipit give finite detections). act_align's merge-back is recorded, not "
             f"required: activations on two batches of two random images do not identify every unit of "
             f"these random-init backbones.", "",
             "| model | traced units | merged params | only averaged | whole-model proof err | merge-back err "
             "(mudsc_align) | tensors differing | act_align merge-back err | tensors differing | "
             "independent merge finite | s | ok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        rep = r.get("report") or {}
        if not rep:
            lines.append(f"| {r['model']} | | | | | | | {r.get('seconds', '')} | error: {r.get('error', '')[:160]} |")
            continue
        err = rep.get("max_abs_err")
        lines.append(f"| {r['model']} | {len(rep.get('units', []))} | {rep.get('merged_fraction', 0):.1%} | "
                     f"{rep.get('averaged_params', 0):,} | {err if err is None else f'{err:.1e}'} | "
                     f"{r.get('merge_back_max_abs_err', float('nan')):.1e} | {r.get('merge_back_params_differing')} | "
                     f"{r.get('act_align_back_max_abs_err', float('nan')):.1e} | "
                     f"{r.get('act_align_back_params_differing')} | {r.get('independent_finite')} | "
                     f"{r.get('seconds')} | {r.get('ok')} |")
    for r in rows:
        if "summary" in r:
            lines += ["", f"## {r['model']}", "", "```", r["summary"], "```"]
    return "\n".join(lines) + "\n"


def _size(name: str) -> int:
    """Parameter count from the weights' metadata (no download); unknown last."""
    import torchvision
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return 1 << 40


def _run_safely(job: tuple) -> dict:
    name, size, threads = job
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        return run_one(name, size)
    except Exception as e:  # one broken model must not hide the others
        return {"model": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:400],
                "seconds": round(time.perf_counter() - t0, 1)}


def _rows(names: list[str], size: int, jobs: int):
    """Rows as they finish (each is written at once); with ``jobs`` > 1 each model in a fresh
    forked worker."""
    if jobs == 1:
        for name in names:
            yield _run_safely((name, size, 2))
        return
    with mp.get_context("fork").Pool(jobs, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_run_safely, [(n, size, 1) for n in names])


def main(argv=None) -> int:
    import torchvision
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated model names")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--update", action="store_true")
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    p.add_argument("--json", default=str(OUT))
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, one torch thread each, a fresh process per model (1: here, 2 threads)")
    args = p.parse_args(argv)
    if args.render:
        Path(args.json).with_suffix(".md").write_text(markdown(json.loads(Path(args.json).read_text())))
        return 0
    torch.set_num_threads(2 if args.jobs == 1 else 1)
    names = sorted(torchvision.models.list_models(module=torchvision.models.detection), key=_size)   # small first
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    path = Path(args.json)
    rows = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if args.update and path.exists() else {}
    for row in _rows(names, args.size, args.jobs):
        name = row["model"]
        rows[name] = row
        print(f"{name:<40} ok={row['ok']} merged {row.get('report', {}).get('merged_fraction', 0):.3f} of params, "
              f"merge-back err {row.get('merge_back_max_abs_err', '-')}, {row.get('seconds', '-')} s "
              f"{row.get('error', '')}", flush=True)
        path.write_text(json.dumps({"torchvision": torchvision.__version__, "size": args.size,
                                    "rows": [rows[n] for n in sorted(rows)]}, indent=1))
    Path(args.json).with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
    for r in rows.values():
        if "summary" in r:
            print("\n" + r["summary"])
    return 0 if all(r["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
