"""``mudsc-fx merge``: checkpoints of one architecture in, one merged checkpoint (or EMR artifact) out.

Everything the command can check is checked before any merging starts: the method and its
options, the output path (suffix, existing writable folder), the calibration data, the
checkpoint files (readable, weights only: a pickle that needs code is refused, nothing in it
runs). Every problem ends in one line, ``mudsc-fx: error: ...``, and exit status 2.

Task-vector methods (``task_arithmetic``, ``ties``, ``emr`` and any method registered in
``mudsc_fx.taskvec``) stream ``.safetensors`` checkpoints tensor by tensor; their flags and
defaults come from the method registry.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoints import (CHECKPOINT_SUFFIXES, check_output_path, load_into, load_torch_object,
                           open_checkpoint, read_state_dict, write_state_dict)
from .common import example_input, fail, parse_shape

DATA_SUFFIXES = (".pt", ".npy", ".npz")
BATCH_SIZE = 128


def _task_vector_methods() -> dict:
    from ..taskvec import get_method, method_names
    return {name: get_method(name) for name in method_names()}


def _tv_options() -> dict[str, list]:
    """Option name -> [(method, Option)] over every registered task-vector method."""
    out: dict[str, list] = {}
    for name, method in _task_vector_methods().items():
        for option in method.options:
            out.setdefault(option.name, []).append((name, option))
    return out


def _flag(option_name: str) -> str:
    return "--" + option_name.replace("_", "-")


def _alpha(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None


def _grid(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0,0.5,1, got {text!r}") from None


def add_parser(sub) -> None:
    from ..merge import PRESETS
    s = sub.add_parser("merge", help="merge checkpoints of one architecture",
                       description="Merge checkpoints: matching methods (" + ", ".join(PRESETS) + ") need --arch; "
                       "task-vector methods (" + ", ".join(_task_vector_methods()) + ") need --base.")
    s.add_argument("--arch", help="model spec (torchvision:NAME, timm:NAME, file.py:factory, package.module:factory); "
                                  "needed by the matching methods and by --heads auto")
    s.add_argument("--checkpoints", nargs="+", required=True, help=f"checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
    s.add_argument("--method", default="mudsc_zip", choices=list(PRESETS) + list(_task_vector_methods()))
    s.add_argument("--alpha", type=_alpha, help="matching methods: weight of the weight similarity, in [0, 1], or "
                                               "'auto' (chosen from a grid without labels, on the --data inputs)")
    s.add_argument("--alpha-grid", type=_grid, help="with --alpha auto: the alphas to try, e.g. 0,0.25,0.5,0.75,1 "
                                                    "(default 0, 0.1, ..., 1)")
    s.add_argument("--alpha-proxy", help="with --alpha auto: the label-free score (default ensemble_ce: the outputs "
                                         "are class logits, scored against the source models' ensemble; others: "
                                         "ensemble_accuracy, best_agreement, relative_error, ...)")
    s.add_argument("--data", help="calibration inputs: a .pt tensor, a .npy array, a .npz holding one array (or one "
                                  "named 'x'), or module:function returning an iterable of batches")
    s.add_argument("--base", help="task-vector methods: the checkpoint the others were fine-tuned from")
    s.add_argument("--heads", default="auto",
                   help="task-vector methods: entries kept per task, never merged: 'auto' (the model's output "
                        "layers, found from --arch), 'none', or a regular expression over entry names")
    for name, users in _tv_options().items():
        option = users[0][1]
        defaults = ", ".join(f"{method}: {opt.default}" for method, opt in users)
        help_text = f"{option.help} [{'/'.join(m for m, _ in users)}; default {defaults}]"
        choices = getattr(option.check, "choices", None)
        if isinstance(option.default, bool):
            s.add_argument(_flag(name), dest=f"tv_{name}", action=argparse.BooleanOptionalAction, help=help_text)
        elif choices:
            s.add_argument(_flag(name), dest=f"tv_{name}", choices=choices, help=help_text)
        else:
            s.add_argument(_flag(name), dest=f"tv_{name}", type=float, metavar=name.upper(), help=help_text)
    s.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--report", help="matching methods: also write the merge's page (.html) or picture (.png/.svg/.pdf): "
                                    "per space the method, matching quality, units zipped within one model")
    s.set_defaults(func=run)


def run(args) -> int:
    try:
        if args.method in _task_vector_methods():
            return _run_task_vectors(args)
        return _run_matching(args)
    except OSError as err:  # permissions, full disk, ...: one line naming the file
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return fail(f"{where}{err.strerror or err}")


def _given_tv_options(args) -> dict[str, object]:
    return {name: getattr(args, f"tv_{name}") for name in _tv_options() if getattr(args, f"tv_{name}") is not None}


# ------------------------------------------------------------------ calibration data


def _as_batches(x, source: str) -> list:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"--data {source}: expected a non-empty array of inputs (first axis = samples)")
    if x.dtype == torch.float64:
        x = x.float()  # models are float32; float64 inputs come from numpy's default
    return list(torch.split(x, BATCH_SIZE))


def _load_numpy(path: Path):
    import numpy as np
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"--data {path}: not a readable {path.suffix} file without pickled objects ({err})") from None
    if path.suffix == ".npz":
        with loaded:
            names = list(loaded.files)
            if len(names) != 1 and "x" not in names:
                raise ValueError(f"--data {path}: holds arrays {names}; give one array, or name the inputs 'x'")
            loaded = loaded[names[0] if len(names) == 1 else "x"]
    if loaded.dtype.kind not in "fiub":
        raise ValueError(f"--data {path}: array of dtype {loaded.dtype}, expected numbers")
    return torch.from_numpy(np.ascontiguousarray(loaded))


@contextlib.contextmanager
def _cwd_importable():
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def load_data(spec: Optional[str]):
    """Calibration batches from ``--data`` (see the flag's help), or None."""
    if spec is None:
        return None
    path = Path(spec)
    if path.suffix.lower() in DATA_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"--data {spec}: no such file")
        if path.suffix.lower() == ".pt":
            return _as_batches(load_torch_object(path, f"--data {spec}"), spec)
        return _as_batches(_load_numpy(path), spec)
    module_name, colon, function = spec.partition(":")
    if not colon or not module_name or not function:
        raise ValueError(f"--data {spec}: expected a {'/'.join(DATA_SUFFIXES)} file of inputs or module:function")
    with _cwd_importable():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"--data {spec}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"--data {spec}: {module_name} has no function {function!r}")
    return factory()


# ------------------------------------------------------------------ matching methods


def _run_matching(args) -> int:
    from .. import distributed
    from ..merge import Merger, method_config
    from ..sources import load_model
    for given, flag in ((args.base, "--base"), (_given_tv_options(args), "task-vector options"),
                        (args.heads != "auto", "--heads")):
        if given:
            return fail(f"{flag} applies to the task-vector methods, not --method {args.method}")
    if not args.arch:
        return fail(f"--method {args.method} needs --arch (the model the checkpoints belong to)")
    auto = args.alpha == "auto"
    for value, flag in ((args.alpha_grid, "--alpha-grid"), (args.alpha_proxy, "--alpha-proxy")):
        if value is not None and not auto:
            return fail(f"{flag} applies to --alpha auto only")
    search = {k: v for k, v in (("alpha_grid", args.alpha_grid), ("alpha_proxy", args.alpha_proxy)) if v is not None}
    config = method_config(args.method, None if auto else args.alpha)  # bad alpha / method: before any work
    if auto and not (config.uses_weights and config.uses_activations):
        return fail(f"--alpha auto chooses alpha for the dual-space methods (mudsc_align, mudsc_zip), "
                    f"not --method {args.method}")
    if auto:
        from ..alpha_search import check_grid, check_proxy
        check_grid(args.alpha_grid)
        if args.alpha_proxy is not None:
            check_proxy(args.alpha_proxy)
    output = check_output_path(args.output, CHECKPOINT_SUFFIXES, "-o")
    from .. import views
    report = check_output_path(args.report, views.FILE_SUFFIXES, "--report") if args.report else None
    data = load_data(args.data)
    if config.uses_activations and data is None:
        return fail(f"--method {args.method} matches activations: give calibration inputs with --data")
    states = [read_state_dict(path, f"checkpoint {index}") for index, path in enumerate(args.checkpoints)]
    models = [load_into(load_model(args.arch), state, f"checkpoint {index} ({path})").eval()
              for index, (path, state) in enumerate(zip(args.checkpoints, states))]
    del states
    t0 = time.perf_counter()
    example = None if data is not None else example_input(args.input_shape)
    with distributed.process_group_from_env() as sharding:  # torchrun: ranks share the statistics
        main = distributed.is_main(sharding)
        merger = Merger(models, data, example_inputs=example, progress=main)
        result = merger.merge(args.method, args.alpha, seed=args.seed, **search)
    if main:  # rank 0 writes
        write_state_dict(result.model.state_dict(), output)
        print(result.summary())
        if report is not None:
            print(f"report -> {views.write(result, report, title=f'{args.arch} merged with {args.method}')}")
        print(f"{time.perf_counter() - t0:.1f}s -> {output}")
    return 0


# ------------------------------------------------------------------ task-vector methods


def _heads(args, data) -> object:
    """The ``keep`` spec from ``--heads``: names found from --arch, None, or a regex."""
    if args.heads == "none":
        return None
    if args.heads != "auto":
        return args.heads
    if not args.arch:
        raise ValueError("--heads auto finds the output layers from --arch: give --arch, or --heads none / "
                         "--heads REGEX")
    import mudsc_fx as mf
    from ..sources import load_model
    model = load_model(args.arch).eval()
    example = next(iter(data)) if data is not None else example_input(args.input_shape)
    heads = mf.infer(model, example).output_params()
    del model
    return heads


def _run_task_vectors(args) -> int:
    method = _task_vector_methods()[args.method]
    given = _given_tv_options(args)
    known = {option.name for option in method.options}
    for name in given:
        if name not in known:
            flags = ", ".join(_flag(n) for n in sorted(known)) or "none"
            return fail(f"{_flag(name)} does not apply to --method {args.method} (its options: {flags})")
    if args.alpha is not None or args.alpha_grid is not None or args.alpha_proxy is not None or args.report:
        flag = ("--alpha" if args.alpha is not None else "--alpha-grid" if args.alpha_grid is not None
                else "--alpha-proxy" if args.alpha_proxy is not None else "--report")
        return fail(f"{flag} applies to the matching methods, not --method {args.method}")
    options = method.resolve(given)
    output = check_output_path(args.output, method.output_suffixes, "-o")
    if not args.base:
        return fail(f"--method {args.method} needs --base BASE_CHECKPOINT (the model the others were fine-tuned from)")
    data = load_data(args.data)
    readers = []
    try:
        readers.append(open_checkpoint(args.base, "--base"))
        readers.extend(open_checkpoint(path, f"checkpoint {index}") for index, path in enumerate(args.checkpoints))
        keep = _heads(args, data)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    result = method.merge_files(readers[0], readers[1:], output, keep, options)
    settings = ", ".join(f"{k}={v}" for k, v in result.options)
    print(f"merged {result.num_models} models with {result.method} ({settings}) in {result.seconds:.1f}s "
          f"-> {result.path} ({result.path.stat().st_size / 1e6:.2f} MB)")
    if result.kept:
        where = "stored per task" if method.output == "emr" else "taken from the base (swap in each task's own)"
        print(f"kept, not merged, {where}: {', '.join(result.kept)}")
    if method.output == "emr":
        print(f"EMR artifact with {result.num_models} tasks; rescalers {[round(r, 4) for r in result.rescalers]}")
    return 0

