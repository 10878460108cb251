"""The merge pipeline, top to bottom, and its presets (the rows of the MuDSC paper)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .ir.graph import PermutationGraph
from .ir.trace import as_input_tuple, eval_mode
from .passes.apply import apply_permutations, named_tensors
from .passes.infer import infer
from .passes.rewrite import rewrite
from .passes.solve import Alignment, MatchConfig, solve
from .passes.stats import Statistics, collect_stats, default_input_fn

log = logging.getLogger(__name__)

PRESETS: dict[str, MatchConfig] = {
    "average": MatchConfig(match=None, alpha=0.0, iterate=False),
    "rebasin": MatchConfig(match="align", alpha=1.0, iterate=True, weight_kind="inner", patience=1),
    "act_align": MatchConfig(match="align", alpha=0.0, iterate=False),
    "mudsc_align": MatchConfig(match="align", alpha=0.5, iterate=True),
    "zipit": MatchConfig(match="zip", alpha=0.0, iterate=False),
    "weight_zip": MatchConfig(match="zip", alpha=1.0, iterate=True),
    "mudsc_zip": MatchConfig(match="zip", alpha=0.5, iterate=True),
}
_FAMILY = {"align": ("act_align", "mudsc_align", "rebasin"), "zip": ("zipit", "mudsc_zip", "weight_zip")}


def method_config(method: str = "mudsc_zip", alpha: Optional[float] = None, match: Optional[str] = None,
                  **overrides: Any) -> MatchConfig:
    """Resolve a preset name (or ``match=`` "align"/"zip") and ``alpha`` to a MatchConfig.
    alpha = 0 is the activation-only row, alpha = 1 the weight-only row of the family."""
    if match is not None:
        if match not in _FAMILY:
            raise ValueError(f"unknown match {match!r}; choose 'align' or 'zip'")
        method = _FAMILY[match][1]
    if method not in PRESETS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(PRESETS)}")
    if alpha is not None and method != "average":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        fam = _FAMILY[PRESETS[method].match]
        method = fam[0] if alpha == 0.0 else fam[2] if alpha == 1.0 else fam[1]
        cfg = PRESETS[method] if alpha in (0.0, 1.0) else replace(PRESETS[method], alpha=alpha)
    else:
        cfg = PRESETS[method]
    return replace(cfg, **overrides) if overrides else cfg


@dataclass(frozen=True)
class MergeResult:
    model: nn.Module
    graph: PermutationGraph
    alignment: Alignment
    stats: Optional[Statistics]
    seconds: dict[str, float]
    config: MatchConfig


def validate_models(models: Sequence[nn.Module], min_models: int = 2) -> None:
    """Clear errors for inputs that cannot be merged (named model, parameter or problem)."""
    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models must be a list of nn.Module, got {type(models).__name__}")
    if len(models) < min_models:
        raise ValueError(f"merging needs at least {min_models} models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {i} is a {type(m).__name__}, not an nn.Module")
        if type(m) is not type(models[0]):
            raise ValueError(f"model {i} is a {type(m).__name__} but model 0 is a {type(models[0]).__name__}")
    ref = named_tensors(models[0])
    ref_t = next((t for t in ref.values() if t.is_floating_point()), None)
    for i, m in enumerate(models):
        own = named_tensors(m)
        for name in ref:
            if name not in own:
                raise ValueError(f"model {i} has no parameter/buffer {name!r} that model 0 has")
            if own[name].shape != ref[name].shape:
                raise ValueError(f"model {i} parameter {name!r} has shape {tuple(own[name].shape)}, "
                                 f"model 0 has {tuple(ref[name].shape)}")
        for name in own:
            if name not in ref:
                raise ValueError(f"model {i} has parameter/buffer {name!r} that model 0 does not have")
        for name, t in own.items():
            if not t.is_floating_point():
                continue
            if ref_t is not None and (t.device != ref_t.device or t.dtype != ref_t.dtype):
                raise ValueError(f"model {i} parameter {name!r} is {t.dtype} on {t.device}, but model 0 "
                                 f"is {ref_t.dtype} on {ref_t.device}: move all models to one device and dtype")
            if not torch.isfinite(t).all():
                raise ValueError(f"model {i} parameter {name!r} contains NaN or inf")


def _reiterable(data: Optional[Iterable]) -> Optional[Iterable]:
    if data is None:
        return None
    if iter(data) is data:  # a generator: keep its batches so that several passes see them
        return list(data)
    return data


def _first_input(data: Iterable, input_fn: Callable) -> tuple:
    for batch in data:
        return as_input_tuple(input_fn(batch))
    raise ValueError("the calibration data is empty")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reset_bn(model: nn.Module, data: Iterable, input_fn: Optional[Callable] = None) -> nn.Module:
    """Recompute BatchNorm running statistics on ``data`` (cumulative average), in place;
    returns ``model`` in eval mode. Models without BatchNorm are returned unchanged.

    >>> # merged = mf.reset_bn(merged, loader)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    input_fn = input_fn or default_input_fn
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    with torch.no_grad():
        for batch in data:
            model(*as_input_tuple(input_fn(batch)))
            n += 1
    for m, mom in saved:
        m.momentum = mom
    model.eval()
    if n == 0:
        raise ValueError("reset_bn: the data is empty")
    return model


def merge(models: Sequence[nn.Module], data: Optional[Iterable] = None, method: str = "mudsc_zip",
          alpha: Optional[float] = None, reset_bn: bool = True, seed: int = 0,
          input_fn: Optional[Callable[[Any], Any]] = None, *, match: Optional[str] = None,
          example_inputs: Any = None, return_result: bool = False, **options: Any):
    """Merge models of one architecture into one module of the same class, without training.

    ``data``: iterable of batches (a tensor, or a tuple whose first item is the input; use
    ``input_fn`` for anything else). ``method``: one of PRESETS. ``alpha``: weight of the
    weight similarity (0 = activations only, 1 = weights only). ``options``: MatchConfig
    fields (``zip_a``, ``zip_b``, ``weight_normalize``, ...) and ``leaf_modules``,
    ``fixed_params``, ``stats_budget_bytes``. The inputs are never modified.

    >>> import torch, mudsc_fx as mf
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    >>> merged = mf.merge(nets, [torch.randn(16, 4)], method="zipit")
    >>> merged(torch.randn(1, 4)).shape
    torch.Size([1, 2])
    """
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    leaf_modules = options.pop("leaf_modules", ())
    fixed_params = options.pop("fixed_params", ())
    budget = options.pop("stats_budget_bytes", 2 << 30)
    progress = options.pop("progress", False)
    cfg = method_config(method, alpha, match, **options)
    validate_models(models)
    input_fn = input_fn or default_input_fn
    data = _reiterable(data)
    if cfg.uses_activations and data is None:
        raise ValueError(f"method {method!r} uses activations: pass calibration data")
    if data is not None:
        example = _first_input(data, input_fn)
    elif example_inputs is not None:
        example = as_input_tuple(example_inputs)
    else:
        raise ValueError("a data-free merge needs example_inputs= to trace the model")
    with eval_mode(*models):
        graph = infer(models[0], example, leaf_modules=leaf_modules, fixed_params=fixed_params)
        seconds["infer"] = time.perf_counter() - t
        t = time.perf_counter()
        stats = collect_stats(models, graph, data, input_fn=input_fn, budget_bytes=budget, progress=progress) \
            if cfg.uses_activations else None
        seconds["statistics"] = time.perf_counter() - t
        t = time.perf_counter()
        alignment = solve(graph, stats, [named_tensors(m) for m in models], cfg, seed)
        seconds["solve"] = time.perf_counter() - t
        t = time.perf_counter()
        merged = rewrite(list(models), graph, alignment)
        seconds["rewrite"] = time.perf_counter() - t
    t = time.perf_counter()
    merged.eval()
    if reset_bn and data is not None and has_batchnorm(merged):
        globals()["reset_bn"](merged, data, input_fn)
    seconds["reset_bn"] = time.perf_counter() - t
    log.info("merge %s: %s", method, ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))
    if return_result:
        return MergeResult(merged, graph, alignment, stats, seconds, cfg)
    return merged


def align_models(models: Sequence[nn.Module], data: Optional[Iterable] = None, method: str = "act_align",
                 seed: int = 0, input_fn: Optional[Callable] = None, *, example_inputs: Any = None,
                 **options: Any) -> list[nn.Module]:
    """Permute every model into models[0]'s basis (copies; models[0] is returned as a copy).
    ``method`` must be a permutation matching: act_align, mudsc_align or rebasin."""
    cfg = method_config(method, options.pop("alpha", None))
    if cfg.match != "align":
        raise ValueError(f"align_models needs a permutation method (act_align, mudsc_align, rebasin), got {method!r}")
    res = merge(models, data, method, cfg.alpha if method != "rebasin" else None, reset_bn=False, seed=seed,
                input_fn=input_fn, example_inputs=example_inputs, return_result=True, **options)
    out = []
    for i, m in enumerate(models):
        perms = {s: p[i] for s, p in res.alignment.perms.items()}
        out.append(apply_permutations(m, res.graph, perms))
    return out
