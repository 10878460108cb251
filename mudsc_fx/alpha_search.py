"""``alpha="auto"``: choose the weight of the weight similarity of a dual-space merge.

MuDSC weighs its two similarities, ``C = alpha C_W + (1 - alpha) C_A``, and the reference
code picks alpha per experiment from a grid by accuracy on training images. Here every grid
point is merged from one :class:`~mudsc_fx.merge.Merger`: one statistics pass, and the
solve cache shares weight features and unit matchings between the grid's solves (all of
them start from the same activation-only matching). Each merged model is scored

* with labels: ``score_fn(model)``, or the accuracy of ``argmax(model(x))`` against the
  labels of ``val_data`` (batches ``(inputs, labels)``);
* without labels (the default): a training-free proxy on the calibration data only (see
  :data:`PROXIES`), computed on the first calibration batches (:data:`PROBE_ROWS` samples):
  one pass there recomputes the merged model's BatchNorm statistics and gives its outputs,
  which are compared with the source models' outputs on the same batches.

The grid point with the best score wins (the first one on ties) and is merged in full (its
solve replays from the cache; BatchNorm on all the calibration data), so the result is the
one ``Merger.merge(method, alpha=chosen)`` gives. :class:`MergeResult` carries the chosen
``alpha`` and ``alpha_scores`` (every grid point's score). Cost without labels: one
statistics pass, the solves of the grid and about a quarter of a forward pass over the
calibration data per grid point.
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ir.inputs import call_model, eval_mode

log = logging.getLogger(__name__)

DEFAULT_GRID = tuple(round(0.1 * k, 1) for k in range(11))
_DUAL = {"mudsc_align": "align", "mudsc_zip": "zip"}
_MAX_ROWS = 4096  # output rows kept per model for the proxy
PROBE_ROWS = 512  # calibration samples a grid point is scored on without labels


def check_proxy(name: Any) -> str:
    """``name`` if it names a label-free proxy of :data:`PROXIES`, else a clear error."""
    if name not in PROXIES:
        raise ValueError(f"unknown alpha_proxy {name!r}; choose one of {', '.join(PROXIES)}")
    return name


def check_grid(grid: Optional[Iterable[float]]) -> tuple[float, ...]:
    """The grid as sorted distinct floats in [0, 1] (``None``: :data:`DEFAULT_GRID`)."""
    if grid is None:
        return DEFAULT_GRID
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
        raise ValueError(f"alpha_grid must be a sequence of numbers in [0, 1], got {grid!r}")
    out = set()
    for a in grid:
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(float(a)) \
                or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"alpha_grid values must be numbers in [0, 1], got {a!r}")
        out.add(float(a))
    if not out:
        raise ValueError("alpha_grid is empty")
    return tuple(sorted(out))


# ------------------------------------------------------------------------------ scores
def _flat_outputs(out: Any) -> torch.Tensor:
    """A model output (tensor, or tuple/list/dict of tensors) as [batch, features] float64."""
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(out.shape[0], -1).double() if out.dim() else out.detach().reshape(1, 1).double()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [_flat_outputs(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))]
        parts = [p for p in parts if p.shape[0] == parts[0].shape[0]] if parts else []
        if parts:
            return torch.cat(parts, dim=1)
    raise ValueError(f"alpha='auto' without labels compares model outputs, but the model returned a "
                     f"{type(out).__name__}; pass score_fn= or val_data= with labels")


@torch.no_grad()
def model_outputs(model: nn.Module, data: Iterable, input_fn: Callable, max_rows: int = _MAX_ROWS) -> torch.Tensor:
    """``model``'s outputs on ``data`` in eval mode, one row per sample (the first max_rows)."""
    rows, got = [], 0
    with eval_mode(model):
        for batch in data:
            y = _flat_outputs(call_model(model, input_fn(batch)))
            rows.append(y[:max_rows - got])
            got += rows[-1].shape[0]
            if got >= max_rows:
                break
    return torch.cat(rows)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=1, eps=1e-12)


def agreement(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Mean cosine similarity of the merged model's outputs with each source model's."""
    return float(torch.stack([_cos(merged, s) for s in sources]).mean())


def best_agreement(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Per sample, the cosine similarity with the source model it agrees with most, averaged:
    on disjoint tasks each input is known to one of the models, and the merge should keep
    that model's answer."""
    return float(torch.stack([_cos(merged, s) for s in sources]).max(dim=0).values.mean())


def confident_agreement(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Per sample, the cosine similarity with each source weighted by that source's output
    norm (a model answers its own inputs with larger outputs), averaged."""
    cos = torch.stack([_cos(merged, s) for s in sources])
    w = torch.stack([s.norm(dim=1) for s in sources])
    w = w / w.sum(dim=0).clamp_min(1e-30)
    return float((w * cos).sum(dim=0).mean())


def ensemble_agreement(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Mean cosine similarity with the average of the source models' outputs."""
    return float(_cos(merged, torch.stack(sources).mean(dim=0)).mean())


def relative_error(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Minus the mean relative squared distance to each source model's outputs."""
    return -float(torch.stack([((merged - s) ** 2).sum(1) / (s ** 2).sum(1).clamp_min(1e-30) for s in sources]).mean())


def _ensemble_probs(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([s.softmax(dim=1) for s in sources]).mean(dim=0)


def ensemble_accuracy(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Outputs read as class logits: how often the merged model's argmax is the ensemble's (the
    mean of the source models' softmax probabilities). The ensemble is the best model the
    source models make together without merging; its answers are pseudo-labels."""
    return float((merged.argmax(dim=1) == _ensemble_probs(sources).argmax(dim=1)).double().mean())


def ensemble_ce(merged: torch.Tensor, sources: Sequence[torch.Tensor]) -> float:
    """Outputs read as class logits: minus the cross-entropy of the merged model's softmax
    against the ensemble's probabilities (soft pseudo-labels; smoother than
    :func:`ensemble_accuracy` on a few hundred samples)."""
    return float((_ensemble_probs(sources) * merged.log_softmax(dim=1)).sum(dim=1).mean())


#: Label-free scores of a merged model from its outputs and the source models' outputs on the
#: calibration data (higher is better).
PROXIES: dict[str, Callable[[torch.Tensor, Sequence[torch.Tensor]], float]] = {
    "agreement": agreement,
    "best_agreement": best_agreement,
    "confident_agreement": confident_agreement,
    "ensemble_agreement": ensemble_agreement,
    "relative_error": relative_error,
    "ensemble_accuracy": ensemble_accuracy,
    "ensemble_ce": ensemble_ce,
}
DEFAULT_PROXY = "ensemble_ce"


@torch.no_grad()
def labelled_score(model: nn.Module, val_data: Iterable, input_fn: Callable) -> float:
    """Accuracy of argmax(model(inputs)) over the last axis against the labels of batches
    ``(inputs, labels)``."""
    hit = total = 0
    with eval_mode(model):
        for k, batch in enumerate(val_data):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[-1], torch.Tensor):
                raise ValueError(f"val_data batch {k} is a {type(batch).__name__}; labelled alpha search needs "
                                 "batches (inputs, labels), or pass score_fn=")
            out = call_model(model, input_fn(batch))
            if not isinstance(out, torch.Tensor):
                raise ValueError("val_data scoring takes the argmax of the model's output tensor; the model "
                                 f"returned a {type(out).__name__}: pass score_fn=")
            y = batch[-1]
            hit += int((out.argmax(-1) == y.to(out.device)).sum())
            total += int(y.numel())
    if total == 0:
        raise ValueError("val_data is empty")
    return hit / total


# ------------------------------------------------------------------------------ the search
AUTO_OPTIONS = ("alpha_grid", "val_data", "score_fn", "alpha_proxy", "alpha_output_fn")


def pop_auto_options(alpha: Any, options: dict) -> dict:
    """Remove the alpha-search options from ``options``; they mean something only with
    ``alpha="auto"`` (an error otherwise), as does any other string alpha."""
    auto = {k: options.pop(k) for k in AUTO_OPTIONS if k in options}
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    if auto and alpha != "auto":
        raise ValueError(f"{', '.join(auto)} appl{'y' if len(auto) > 1 else 'ies'} to alpha='auto' only")
    return auto


def search_alpha(merger, method: Optional[str] = None, *, match: Optional[str] = None,
                 alpha_grid: Optional[Iterable[float]] = None, val_data: Optional[Iterable] = None,
                 score_fn: Optional[Callable[[nn.Module], float]] = None, alpha_proxy: str = DEFAULT_PROXY,
                 alpha_output_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 reset_bn: bool = True, seed: int = 0, **options: Any):
    """Merge with every alpha of ``alpha_grid`` from ``merger`` and return the best
    :class:`~mudsc_fx.merge.MergeResult` (``alpha``: the chosen one, ``alpha_scores``: grid
    point -> score). ``method``: a dual-space method (mudsc_align, mudsc_zip) or ``match=``;
    alpha 0 and 1 are the family's single-space rows. Labelled: ``score_fn(model)`` or the
    accuracy on ``val_data``; else the proxy ``alpha_proxy`` on the calibration data, read
    through ``alpha_output_fn`` when given (``[samples, features]`` outputs -> what the proxy
    reads, e.g. a fixed classification head that turns embeddings into logits)."""
    grid, proxy = alpha_grid, alpha_proxy
    if method is None:
        method = {"align": "mudsc_align", "zip": "mudsc_zip"}.get(match, "mudsc_zip") if match else "mudsc_zip"
    if method not in _DUAL:
        raise ValueError(f"alpha='auto' chooses alpha for the dual-space methods ({', '.join(_DUAL)}); method "
                         f"{method!r} has no alpha to choose")
    if match is not None and match != _DUAL[method]:
        raise ValueError(f"match={match!r} contradicts method={method!r}")
    grid = check_grid(grid)
    if score_fn is not None and not callable(score_fn):
        raise ValueError(f"score_fn must be callable (model -> score), got {score_fn!r}")
    if score_fn is not None and val_data is not None:
        raise ValueError("pass either score_fn= or val_data=, not both")
    labelled = score_fn is not None or val_data is not None
    if not labelled:
        check_proxy(proxy)
    if alpha_output_fn is not None and not callable(alpha_output_fn):
        raise ValueError(f"alpha_output_fn must be callable (outputs -> outputs), got {alpha_output_fn!r}")
    if alpha_output_fn is not None and labelled:
        raise ValueError("alpha_output_fn applies to the label-free proxy; with val_data= / score_fn= score the "
                         "model directly")
    view = _output_view(alpha_output_fn)
    if not labelled and merger.data is None:
        raise ValueError("alpha='auto' without labels scores merges on the calibration data: pass data "
                         "(or val_data= / score_fn=)")
    t0 = time.perf_counter()
    fused = not labelled and options.get("stop_at") is None
    if not labelled:
        probe = probe_batches(merger.data) if fused else merger.data
        reference = [view(model_outputs(m, probe, merger.input_fn)) for m in merger.models]
    scores: dict[float, float] = {}
    best, best_alpha = None, None
    bar = _progress_bar(len(grid), getattr(merger, "progress", False), method)
    try:
        for k, a in enumerate(grid):
            t = time.perf_counter()
            if fused:  # BatchNorm recomputed on the probe batches, outputs of the same pass
                res = merger.merge(method, a, reset_bn=False, seed=seed, **options)
                score = PROXIES[proxy](view(probe_outputs(res.model, probe, merger.input_fn, reset_bn)), reference)
            else:
                res = merger.merge(method, a, reset_bn=reset_bn, seed=seed, **options)
                if score_fn is not None:
                    score = float(score_fn(res.model))
                elif val_data is not None:
                    score = labelled_score(res.model, val_data, merger.input_fn)
                else:
                    score = PROXIES[proxy](view(model_outputs(res.model, merger.data, merger.input_fn)), reference)
            if not math.isfinite(score):
                raise ValueError(f"alpha search: the score of alpha={a:g} is {score}")
            scores[a] = score
            if best_alpha is None or score > scores[best_alpha]:
                best, best_alpha = None if fused else res, a
            log.info("alpha search %s: alpha %g scored %.4f (%d/%d, %.1fs)", method, a, score, k + 1, len(grid),
                     time.perf_counter() - t)
            if bar is not None:
                bar.set_postfix(alpha=a, score=f"{score:.4f}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    if best is None:  # the chosen merge in full: its solve replays from the cache, BatchNorm on all the data
        best = merger.merge(method, best_alpha, reset_bn=reset_bn, seed=seed, **options)
    seconds = dict(best.seconds, alpha_search=time.perf_counter() - t0)
    log.info("alpha search %s: chose alpha %g (%s) in %.1fs", method, best_alpha,
             "labelled score" if labelled else f"proxy {proxy}", seconds["alpha_search"])
    return replace(best, alpha=best_alpha, alpha_scores=scores, seconds=seconds)


def _output_view(fn: Optional[Callable]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Outputs as the proxy reads them: ``fn`` applied to the float32 rows, back to float64."""
    if fn is None:
        return lambda out: out

    @torch.no_grad()
    def view(out: torch.Tensor) -> torch.Tensor:
        try:
            mapped = fn(out.float())
        except Exception as err:
            raise ValueError(f"alpha_output_fn failed on the model outputs of shape {tuple(out.shape)}: "
                             f"{type(err).__name__}: {err}") from None
        if not isinstance(mapped, torch.Tensor) or mapped.dim() < 1 or mapped.shape[0] != out.shape[0]:
            raise ValueError(f"alpha_output_fn must return one row per sample ({out.shape[0]} rows), got "
                             f"{type(mapped).__name__}{tuple(mapped.shape) if isinstance(mapped, torch.Tensor) else ''}")
        return _flat_outputs(mapped)
    return view


def probe_batches(data: Iterable, rows: int = PROBE_ROWS) -> list:
    """The first calibration batches, at least ``rows`` samples (at least one batch)."""
    out, got = [], 0
    for batch in data:
        out.append(batch)
        got += _batch_rows(batch)
        if got >= rows:
            break
    return out


def _batch_rows(batch: Any) -> int:
    x = batch if isinstance(batch, torch.Tensor) else batch[0] if isinstance(batch, (tuple, list)) and batch else None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1


@torch.no_grad()
def probe_outputs(model: nn.Module, probe: list, input_fn: Callable, reset: bool = True) -> torch.Tensor:
    """Outputs of a merged model on the probe batches; a model with BatchNorm gets its
    statistics recomputed on them (in place) in the same pass (outputs with batch statistics)."""
    from .passes.bn_reset import has_batchnorm, reset_bn
    if not (reset and has_batchnorm(model)):
        return model_outputs(model, probe, input_fn)
    outs: list = []
    reset_bn(model, probe, input_fn, outputs=outs)
    return torch.cat([_flat_outputs(o) for o in outs])


def _progress_bar(total: int, enabled: bool, method: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the test and demo extras
        return None
    return tqdm(total=total, desc=f"alpha search ({method})", leave=False)
