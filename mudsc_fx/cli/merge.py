"""``mudsc-fx merge``: checkpoints of one architecture in, one merged checkpoint out."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from .common import example_input, fail, parse_shape


def add_parser(sub) -> None:
    from ..merge import PRESETS
    s = sub.add_parser("merge", help="merge checkpoints of one architecture")
    s.add_argument("--arch", required=True)
    s.add_argument("--checkpoints", nargs="+", required=True)
    s.add_argument("--method", default="mudsc_zip", choices=list(PRESETS) + ["emr", "task_arithmetic", "ties"])
    s.add_argument("--alpha", type=float)
    s.add_argument("--data", help="a .pt tensor of inputs, or module:function returning an iterable of batches")
    s.add_argument("--base", help="base checkpoint for emr / task_arithmetic / ties")
    s.add_argument("--lam", type=float, default=0.3)
    s.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=run)


def _load_state(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path} does not hold a state dict")
    return sd


def _load_data(spec: Optional[str]):
    if spec is None:
        return None
    if spec.endswith(".pt"):
        x = torch.load(spec, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"data file {spec} must hold one tensor of inputs")
        return list(torch.split(x, 128))
    import importlib
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)()


def _save_state(model: torch.nn.Module, out: str) -> None:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        seen, unique = set(), {}
        for k, v in sd.items():  # safetensors refuses shared storage (tied weights)
            key = v.data_ptr()
            unique[k] = v.clone() if key in seen else v
            seen.add(key)
        save_file(unique, out)
    else:
        torch.save(sd, out)


def run(args) -> int:
    import mudsc_fx as mf
    from ..sources import load_model
    models = []
    for ck in args.checkpoints:
        m = load_model(args.arch)
        sd = _load_state(ck)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if missing or unexpected:
            return fail(f"checkpoint {ck} does not fit {args.arch}: missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
        models.append(m.eval())
    data = _load_data(args.data)
    t0 = time.perf_counter()
    if args.method in ("emr", "task_arithmetic", "ties"):
        if not args.base:
            return fail(f"--method {args.method} needs --base BASE_CHECKPOINT")
        base = load_model(args.arch)
        base.load_state_dict(_load_state(args.base))
        example = next(iter(data)) if data is not None else example_input(args.input_shape)
        heads = mf.infer(base.eval(), example).output_params()  # task heads stay per task
        if args.method == "emr":
            emr = mf.emr_merge(base, models, keep=heads)
            emr.save(args.output)
            print(f"wrote EMR artifact with {len(emr)} tasks to {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)")
            return 0
        merged = mf.task_arithmetic(base, models, lam=args.lam) if args.method == "task_arithmetic" \
            else mf.ties_merge(base, models, lam=args.lam)
        print(f"kept from the base (swap in each task's own): {', '.join(heads) or 'nothing'}")
    else:
        example = None if data is not None else example_input(args.input_shape)
        merged = mf.merge(models, data, method=args.method, alpha=args.alpha, seed=args.seed,
                          example_inputs=example, progress=True)
    _save_state(merged, args.output)
    print(f"merged {len(models)} models with {args.method} in {time.perf_counter() - t0:.1f}s -> {args.output}")
    return 0
