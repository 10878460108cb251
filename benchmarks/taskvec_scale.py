"""Peak memory of task-vector merges of N large checkpoints: streamed from files vs in memory.

Writes a synthetic base (transformer-shaped: embedding, L blocks of attention and MLP
matrices with norms and biases, an output head; ~350M float32 parameters by default) and N
fine-tunes (base + seeded noise) as safetensors files, tensor by tensor, then merges them with
each method and implementation, every merge in a fresh subprocess, and reports its peak
resident memory (``VmHWM``: anonymous and file-backed pages, everything since the process
started, including the ~0.5 GB of an interpreter with torch loaded) against the size of one
checkpoint:

    stream     mudsc_fx.taskvec.merge_checkpoints(method, base, paths, out.safetensors)
    in-memory  the library functions on an nn.Module base with the N paths
               (mf.ties_merge(base, paths), ...); the output is a module, then saved
    old        the same calls with the implementation before streaming (``--old-tree``, e.g.
               ``git archive 0e23f6e mudsc_fx | tar -x -C /tmp/old``)

The streamed and in-memory outputs are compared tensor by tensor (``agrees``: identical
merged checkpoint, or identical EMR tau_uni, masks and rescalers within 1e-12).

HEAVY (~7 GB of files, ~12 GB at peak for the old in-memory TIES): run under the shared lock,
and check ``df -h`` first.

    flock /tmp/mudsc_heavy.lock python benchmarks/taskvec_scale.py --old-tree /tmp/taskvec_old
    python benchmarks/taskvec_scale.py --params 2e6 --width 128 --vocab 2000 --dir /tmp/tvs --out /tmp/tvs.json  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TARGET_RATIO = 1.5  # peak RSS / one checkpoint, TIES and EMR, N = 4 x 350M, streamed
METHODS = {  # label -> (registered method, options)
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "ties per-tensor": ("ties", {"per_tensor": True}),
    "emr": ("emr", {}),
}
IN_MEMORY = {"task_arithmetic": "task_arithmetic", "ties": "ties_merge", "emr": "emr_merge"}


# ------------------------------------------------------------------ the synthetic checkpoints


def architecture(params: float, width: int = 1024, vocab: int = 32000) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a transformer-shaped model with about ``params`` scalars."""
    block = [("attn.norm.weight", (width,)), ("attn.norm.bias", (width,))]
    block += [(f"attn.{p}.{kind}", (width, width) if kind == "weight" else (width,))
              for p in "qkvo" for kind in ("weight", "bias")]  # module order: state_dict order
    block += [("mlp.norm.weight", (width,)), ("mlp.norm.bias", (width,)), ("mlp.up.weight", (4 * width, width)),
              ("mlp.up.bias", (4 * width,)), ("mlp.down.weight", (width, 4 * width)), ("mlp.down.bias", (width,))]
    per_block = sum(_numel(shape) for _, shape in block)
    ends = 2 * vocab * width + 2 * width
    layers = max(1, round((params - ends) / per_block))
    shapes = [("embed.weight", (vocab, width))]
    shapes += [(f"blocks.{i}.{name}", shape) for i in range(layers) for name, shape in block]
    shapes += [("norm.weight", (width,)), ("norm.bias", (width,)), ("head.weight", (vocab, width))]
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def write_checkpoints(folder: Path, params: float, n: int, width: int = 1024, vocab: int = 32000) -> dict:
    import torch
    from mudsc_fx.checkpoints import SafetensorsWriter, TensorSpec
    shapes = architecture(params, width, vocab)
    specs = [TensorSpec(name, shape, torch.float32) for name, shape in shapes]
    paths = {"base": folder / "base.safetensors", "models": [folder / f"task{t}.safetensors" for t in range(n)]}
    for index, path in enumerate([paths["base"], *paths["models"]]):
        with SafetensorsWriter(path, specs) as out:
            for number, (name, shape) in enumerate(shapes):
                base = torch.randn(shape, generator=torch.Generator().manual_seed(number)) * 0.02
                if index:  # task index - 1: base + its own noise
                    noise = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 * index + number))
                    base.add_(noise, alpha=0.002)
                out.write_tensor(name, base)
    return {"params": sum(_numel(s) for _, s in shapes), "bytes": paths["base"].stat().st_size,
            "tensors": len(shapes), "base": str(paths["base"]), "models": [str(p) for p in paths["models"]]}


# ------------------------------------------------------------------ one merge per process


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _file_order(path: str) -> list[str]:
    """Tensor names in the order of the file's header (``safe_open.keys()`` sorts them)."""
    import struct
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return [name for name in header if name != "__metadata__"]


def _base_module(path: str):
    """An nn.Module holding the base file's tensors in the file's order (what a user of the
    in-memory API has; the order fixes the order of EMR's flat vector)."""
    import safetensors
    import torch
    from torch import nn
    root = nn.Module()
    with safetensors.safe_open(path, framework="pt") as handle:
        for name in _file_order(path):
            *parents, leaf = name.split(".")
            module = root
            for part in parents:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            value = handle.get_tensor(name)
            module.register_parameter(leaf, nn.Parameter(torch.empty_like(value).copy_(value), requires_grad=False))
            del value
    return root


def worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    method, options, impl, out = spec["method"], spec["options"], spec["impl"], spec["out"]
    started_rss = _rss()["VmRSS"]
    t0 = time.perf_counter()
    extra = {}
    if impl == "stream":
        from mudsc_fx.taskvec import merge_checkpoints
        result = merge_checkpoints(method, spec["base"], spec["models"], out, **options)
        extra = {"passes": result.passes}
    else:
        import mudsc_fx as mf
        base = _base_module(spec["base"])
        extra["rss_with_base_module"] = _rss()["VmRSS"]
        merged = getattr(mf, IN_MEMORY[method])(base, list(spec["models"]), **options)
        if method == "emr":
            merged.save(out)
        else:
            import safetensors.torch
            safetensors.torch.save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out)
    seconds = time.perf_counter() - t0
    return {"peak_rss": _rss()["VmHWM"], "rss_at_start": started_rss, "seconds": seconds, **extra}


def run_worker(spec: dict, tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), OPENBLAS_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=str(HERE))
    if proc.returncode:
        raise RuntimeError(f"worker {spec['impl']} {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ agreement of outputs


def outputs_agree(method: str, a: str, b: str) -> bool:
    """Streamed vs in-memory output: the same tensors (EMR rescalers within 1e-12)."""
    import torch
    from mudsc_fx.checkpoints import open_checkpoint
    with open_checkpoint(a) as left, open_checkpoint(b) as right:
        if set(left.specs) != set(right.specs):
            return False
        for name, spec in left.specs.items():
            for start in range(0, spec.numel, 1 << 24):
                stop = min(spec.numel, start + (1 << 24))
                x, y = left.read(name, start, stop), right.read(name, start, stop)
                if method == "emr" and name == "rescalers":
                    if not torch.allclose(x, y, rtol=1e-12, atol=0):
                        return False
                elif not torch.equal(x, y):
                    return False
    return True


# ------------------------------------------------------------------ report


def report(result: dict) -> str:
    ckpt = result["checkpoint"]
    lines = [f"# Task vectors out of core: N = {result['n']} checkpoints of {ckpt['params'] / 1e6:.0f}M float32 "
             f"parameters ({ckpt['bytes'] / 1e9:.2f} GB each)", "",
             f"Peak RSS (VmHWM of a fresh process per merge, including the interpreter with torch, "
             f"{result['interpreter_rss'] / 1e9:.2f} GB) / one checkpoint. Target (TIES and EMR, streamed): "
             f"<= {TARGET_RATIO}x. One run per row (memory is deterministic; seconds are one sample on a shared "
             f"2-core machine, {result['threads']} thread). passes: reads of every merged scalar of every model.",
             "", "| method | N | params | impl | peak RSS (GB) | one checkpoint (GB) | ratio | seconds | passes | agrees |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        agrees = {True: "yes", False: "NO", None: ""}[row.get("agrees")]
        passes = f"{row['passes']:.2f}" if "passes" in row else ""
        lines.append(f"| {row['label']} | {result['n']} | {ckpt['params'] / 1e6:.0f}M | {row['impl']} | "
                     f"{row['peak_rss'] / 1e9:.2f} | {ckpt['bytes'] / 1e9:.2f} | {row['ratio']:.2f} | "
                     f"{row['seconds']:.1f} | {passes} | {agrees} |")
    lines += ["", "Targets:"]
    for row in result["rows"]:
        if row["impl"] == "stream" and row["method"] in ("ties", "emr"):
            verdict = "met" if row["ratio"] <= TARGET_RATIO else "MISSED"
            lines.append(f"- {row['label']} streamed: {row['ratio']:.2f}x <= {TARGET_RATIO}x: {verdict}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--params", type=float, default=350e6)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024, help="model width (blocks: 4 width^2 attention, 8 width^2 MLP)")
    parser.add_argument("--vocab", type=int, default=32000, help="rows of the embedding and the output head")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/taskvec_scale"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--impls", nargs="+", default=["stream", "in-memory", "old"],
                        choices=["stream", "in-memory", "old"])
    parser.add_argument("--old-tree", type=Path, help="a checkout of mudsc_fx before streaming (for impl 'old')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-files", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "taskvec_scale.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(ROOT))
    impls = [i for i in args.impls if i != "old" or args.old_tree]
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    need = (args.n + 3) * args.params * 4 * 1.1
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB")
    try:
        t0 = time.perf_counter()
        checkpoint = write_checkpoints(args.dir, args.params, args.n, args.width, args.vocab)
        print(f"wrote base + {args.n} checkpoints of {checkpoint['params'] / 1e6:.1f}M parameters "
              f"({checkpoint['bytes'] / 1e9:.2f} GB each) in {time.perf_counter() - t0:.0f}s", flush=True)
        rows = []
        for label in args.methods:
            method, options = METHODS[label]
            outputs = {}
            for impl in impls:
                if impl != "stream" and (options or method not in IN_MEMORY):
                    continue  # the in-memory rows: one per method, default options
                out = args.dir / f"out_{label.replace(' ', '_')}_{impl}.safetensors"
                spec = {"impl": impl, "method": method, "options": options, "out": str(out), "threads": args.threads,
                        "base": checkpoint["base"], "models": checkpoint["models"]}
                measured = run_worker(spec, args.old_tree if impl == "old" else ROOT)
                row = {"label": label, "method": method, "options": options, "impl": impl, **measured,
                       "ratio": measured["peak_rss"] / checkpoint["bytes"]}
                outputs[impl] = str(out)
                if impl == "in-memory" and "stream" in outputs:
                    row["agrees"] = outputs_agree(method, outputs["stream"], outputs["in-memory"])
                rows.append(row)
                print(f"{label:16s} {impl:9s} peak {row['peak_rss'] / 1e9:6.2f} GB  ratio {row['ratio']:5.2f}  "
                      f"{row['seconds']:6.1f}s {'agrees' if row.get('agrees') else ''}", flush=True)
            for path in outputs.values():
                Path(path).unlink(missing_ok=True)
        result = {"n": args.n, "threads": args.threads, "checkpoint": checkpoint, "rows": rows,
                  "interpreter_rss": min(r["rss_at_start"] for r in rows), "python": platform.python_version(),
                  "old_tree": str(args.old_tree) if args.old_tree else None}
    finally:
        if not args.keep_files:
            shutil.rmtree(args.dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    text = report(result)
    args.out.with_suffix(".md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
