"""The compositional fallback: prove and merge a model that does not trace as a whole (detection
models: per-image Python loops, anchors, NMS) one traced submodule at a time.

``plan_composition`` walks the module tree top-down. A submodule is taken as a *unit* when one
recorded call of it (inputs from a real forward of the whole model) traces, infers and passes
the equivalence check; otherwise its children are tried. A unit's inputs and outputs are model
inputs and outputs of its own graph, so they are barriers: its internal spaces are merged and
its interface stays in the original basis, which is what the parent's untraced code sees.
Parameters outside every unit are only averaged. ``check_composition`` proves the plan on the
whole model (every unit permuted at once, outputs compared in float64, or float32 for a model
that does not run in float64); a unit that breaks the whole model (a parent reading its
weights directly) is demoted to averaging. ``merge_compositional`` merges every unit with the
library's staged pipeline (``Merger``) on the inputs the unit received, averages the rest, and
reports which is which; it warns, never silently.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..ir.graph import PermutationGraph
from ..ir.inputs import call_model, eval_mode, flat_tensors, model_call
from .apply import load_tensors, named_tensors, permutation_op, random_permutations, transform_params
from .calls import PREFIX, Call, record_calls, same_signature, wrap_call
from .check import check, perturb_
from .compose_report import AveragedPart, CompositionReport, UnitReport, Untraced
from .infer import infer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """A submodule merged on its own: ``path`` in the model, the call it was traced with, and
    its proven permutation graph (parameter names prefixed with ``inner.``)."""
    path: str
    call: Call
    graph: PermutationGraph
    report: UnitReport


@dataclass(frozen=True)
class Composition:
    units: tuple[Unit, ...]
    report: CompositionReport

    def unit(self, path: str) -> Unit:
        for u in self.units:
            if u.path == path:
                return u
        raise KeyError(f"no traced unit at {path!r}; units: {', '.join(u.path for u in self.units)}")


def _floating(module: nn.Module, recurse: bool) -> dict[str, torch.Tensor]:
    out = {n: t for n, t in list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
           if t.is_floating_point()}
    return out


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _try_unit(path: str, module: nn.Module, calls: list[Call], seed: int,
              leaf_modules: Iterable[type]) -> tuple[Optional[Unit], str]:
    """(unit, "") if the submodule traces and proves on its first recorded call, else (None, why)."""
    first = calls[0]
    if first.unsupported:
        return None, f"an argument of type {first.unsupported} is neither a tensor nor a constant"
    if not same_signature(calls):
        return None, f"its {len(calls)} calls differ in structure or constant arguments"
    wrapper = wrap_call(module, first)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # barrier warnings of a candidate; the unit report lists barriers
            graph = infer(wrapper, first.tensors, leaf_modules=leaf_modules, frontend="fx")
            rep = check(wrapper, first.tensors, seed=seed, pg=graph, name=path)
    except Exception as e:  # any failure means: not a unit; try the children
        return None, _first_line(e)
    if not rep.ok:  # a rule bug: the submodule is not merged as a whole (its children are tried)
        log.warning("submodule %s fails its equivalence check (max error %.2g)", path or "<model>", rep.max_abs_err)
        return None, f"equivalence check failed on its own (max error {rep.max_abs_err:.2g})"
    report = UnitReport(path or "<model>", type(module).__name__, _numel(_floating(module, True)), len(calls),
                        rep.n_spaces, rep.n_free, rep.coverage, len(rep.barriers), rep.max_abs_err)
    return Unit(path, first, graph, report), ""


def plan_composition(model: nn.Module, example_inputs: Any, *, seed: int = 0, leaf_modules: Iterable[type] = (),
                     whole_error: Optional[str] = None, prove: bool = True) -> Composition:
    """Find the largest traceable submodules of ``model`` (top-down) and prove each on the
    inputs it receives in one forward of the whole model on ``example_inputs``.

    ``whole_error``: why the whole model does not trace (it is then not tried again).
    ``prove``: also prove all units together on the whole model (``check_composition``) and
    demote units that break it. The model is not modified."""
    inputs = model_call(example_inputs, model)
    leaf_modules = tuple(leaf_modules)
    with eval_mode(model):
        calls = record_calls(model, inputs)
    units: list[Unit] = []
    averaged: list[AveragedPart] = []
    untraced: list[Untraced] = []
    seen: set[int] = set()

    def walk(path: str, module: nn.Module) -> None:
        if id(module) in seen or not _floating(module, True):
            return
        seen.add(id(module))
        own = calls.get(path)
        if path == "" and whole_error is not None:
            why = f"does not trace as a whole ({whole_error})"
        elif not own:
            why = "never called as a module in the forward"
        else:
            unit, why = _try_unit(path, module, own, seed, leaf_modules)
            if unit is not None:
                units.append(unit)
                return
        if own or path == "":  # (containers that are never called need no line)
            untraced.append(Untraced(path or "<model>", type(module).__name__, why))
        direct = _floating(module, False)
        if direct:
            averaged.append(AveragedPart(path or "<model>", type(module).__name__, _numel(direct),
                                         tuple(_join(path, n) for n in direct), why))
        for name, child in module.named_children():
            walk(_join(path, name), child)

    with eval_mode(model):
        walk("", model)
    total = _numel(_floating(model, True))
    report = CompositionReport(type(model).__name__, whole_error, tuple(u.report for u in units), tuple(averaged),
                               tuple(untraced), total, None)
    comp = Composition(tuple(units), report)
    if prove and units:
        comp = _prove(model, inputs, comp, seed)
    return comp


def permuted_copy(model: nn.Module, comp: Composition, seed: int = 0,
                  units: Optional[Sequence[str]] = None) -> nn.Module:
    """A copy of ``model`` with a random valid permutation applied inside every unit (or the
    listed ones); by construction the copy computes the same function."""
    out = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    for u in comp.units:
        if units is not None and u.path not in units:
            continue
        perms = random_permutations(u.graph, rng)
        sub = out.get_submodule(u.path)
        new = transform_params(u.graph, {PREFIX + n: t for n, t in named_tensors(sub).items()}, permutation_op(perms))
        load_tensors(sub, {n[len(PREFIX):]: t for n, t in new.items()})
    return out


def _cast(call: Any, dtype: torch.dtype) -> Any:
    return call.map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t)


def check_composition(model: nn.Module, example_inputs: Any, comp: Composition, seed: int = 0,
                      units: Optional[Sequence[str]] = None) -> tuple[bool, float, str]:
    """Prove the units on the whole model: permute every unit (or the listed ones) of a
    float64 copy at random and compare the whole model's outputs and every unit's outputs
    (tolerance 1e-7 of each tensor's scale). A model whose forward does not run in float64 (RAFT builds float32 grids) is
    proven in float32 (tolerance 1e-4: a wrong permutation changes outputs at their own
    scale). Returns (ok, max abs error, dtype of the proof)."""
    try:
        return _compare(model, example_inputs, comp, seed, units, torch.float64, 1e-7)
    except RuntimeError as e:  # a forward that does not run in float64
        log.info("%s does not run in float64 (%s); proving in float32", type(model).__name__, _first_line(e))
        return _compare(model, example_inputs, comp, seed, units, torch.float32, 1e-4)


def _compare(model, example_inputs, comp, seed, units, dtype, rtol) -> tuple[bool, float, str]:
    """Outputs of the whole model and of every unit (their interfaces must not move either:
    a detector's post-processing can hide its features, e.g. near-uniform scores)."""
    inputs = _cast(model_call(example_inputs, model), dtype)
    ref = copy.deepcopy(model).to(dtype)
    perturb_(ref, seed)
    permuted = permuted_copy(ref, comp, seed, units)
    name = str(dtype).replace("torch.", "")
    seen: list[list[torch.Tensor]] = [[], []]
    hooks = [m.get_submodule(u.path).register_forward_hook(
        lambda _m, _a, out, _k=k: seen[_k].extend(flat_tensors(out)))
        for u in comp.units for k, m in enumerate((ref, permuted))]
    try:
        with torch.no_grad(), eval_mode(ref, permuted):
            a = flat_tensors(call_model(ref, inputs))
            b = flat_tensors(call_model(permuted, inputs))
    finally:
        for h in hooks:
            h.remove()
    if len(a) != len(b) or len(seen[0]) != len(seen[1]):
        return False, float("inf"), name
    ok, worst = True, 0.0
    for x, y in zip(a + seen[0], b + seen[1]):
        if x.shape != y.shape or (not x.is_floating_point() and not torch.equal(x, y)):
            return False, float("inf"), name
        if x.is_floating_point() and x.numel():
            err = (x - y).abs().max().item()
            worst = max(worst, err)
            ok = ok and err <= rtol * max(1.0, x.abs().max().item())
    return ok, worst, name


def _demoted(model: nn.Module, u: Unit, reason: str) -> AveragedPart:
    names = tuple(_join(u.path, n) for n in _floating(model.get_submodule(u.path), True))
    return AveragedPart(u.path, u.report.module, u.report.params, names, reason)


def _prove(model: nn.Module, inputs: tuple, comp: Composition, seed: int) -> Composition:
    ok, err, dtype = check_composition(model, inputs, comp, seed)
    units = list(comp.units)
    averaged = list(comp.report.averaged)
    if not ok:  # locate: prove each unit alone in the whole model, demote the ones that break it
        for u in list(units):
            u_ok, u_err, _ = check_composition(model, inputs, comp, seed, units=[u.path])
            if not u_ok:
                log.warning("unit %s breaks the whole model when permuted (error %.2g): only averaged", u.path, u_err)
                units.remove(u)
                averaged.append(_demoted(model, u, f"permuting it changes the whole model's output (error "
                                                   f"{u_err:.2g}): the untraced parent uses its weights directly"))
        ok, err, dtype = check_composition(model, inputs, Composition(tuple(units), comp.report), seed)
        if not ok:  # pragma: no cover - each unit alone passed but not all together
            log.warning("the traced units together still change the whole model (error %.2g): all averaged", err)
            averaged += [_demoted(model, u, "the units together change the whole model's output") for u in units]
            units = []
    report = replace(comp.report, units=tuple(u.report for u in units), averaged=tuple(averaged), max_abs_err=err,
                     proof_dtype=dtype)
    return Composition(tuple(units), report)


def _tensor_kinds(call: Call) -> list:
    return [(t.dim(), tuple(t.shape[1:]), t.dtype) for t in call.tensors]


def record_unit_inputs(model: nn.Module, comp: Composition, data: Iterable,
                       input_fn: Callable) -> dict[str, list[tuple]]:
    """The tensors each unit of ``model`` receives on every batch of ``data`` (one item per call)."""
    out: dict[str, list[tuple]] = {u.path: [] for u in comp.units}
    units = {u.path: u for u in comp.units}
    skipped: dict[str, int] = {}
    with eval_mode(model):
        for batch in data:
            for path, calls in record_calls(model, model_call(input_fn(batch), model), list(units), keep="all").items():
                for c in calls:
                    if same_signature([units[path].call, c]) and _tensor_kinds(c) == _tensor_kinds(units[path].call):
                        out[path].append(c.tensors)
                    else:  # other constants (baked into the unit's graph) or other feature shapes
                        skipped[path] = skipped.get(path, 0) + 1
    for path, n in skipped.items():
        log.warning("unit %s: %d calls whose constant arguments or input shapes differ from the traced call's "
                    "are left out of its statistics", path, n)
    return out


@dataclass(frozen=True)
class CompositionalResult:
    """``merge_compositional(..., return_result=True)``: the merged model, the report, and
    the library's MergeResult of every unit (keyed by path)."""
    model: nn.Module
    report: CompositionReport
    units: dict


def _unit_fixed_params(model: nn.Module, path: str, fixed_params: Iterable[str]) -> list[str]:
    """Names (inside the wrapper) that must not move: the user's fixed parameters under
    ``path``, and tensors the unit shares with code outside it (tied weights)."""
    inside = named_tensors(model.get_submodule(path))
    prefix = _join(path, "")
    outside = {id(t) for n, t in named_tensors(model).items() if not n.startswith(prefix)}
    names = [n for n, t in inside.items() if id(t) in outside]
    names += [f[len(prefix):] for f in fixed_params if f.startswith(prefix)]
    return [PREFIX + n for n in dict.fromkeys(names)]


def _check_models(models: Sequence[nn.Module]) -> None:
    """The whole models hold the same tensors (each unit's merger checks its own submodules)."""
    if not isinstance(models, (list, tuple)) or len(models) < 2 or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be a list of at least two nn.Module")
    ref = {n: tuple(t.shape) for n, t in named_tensors(models[0]).items()}
    for i, m in enumerate(models[1:], 1):
        own = {n: tuple(t.shape) for n, t in named_tensors(m).items()}
        if own != ref:
            bad = sorted(set(own.items()) ^ set(ref.items()))[0]
            raise ValueError(f"model {i} differs from model 0 at parameter/buffer {bad[0]!r}: merging needs one "
                             "architecture")


def reset_batchnorm(model: nn.Module, data: Iterable, input_fn: Callable) -> nn.Module:
    """Fresh BatchNorm statistics (cumulative average over ``data``) with only the BatchNorm
    layers in training mode: the rest of the model (a detector's post-processing) stays in
    eval mode, where it needs no targets."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in data:
            call_model(model, input_fn(batch))
    for m, mom in saved:
        m.momentum = mom
    return model.eval()


def merge_compositional(models: Sequence[nn.Module], data: Optional[Iterable] = None, method: Optional[str] = None,
                        alpha: Optional[float] = None, reset_bn: bool = True, seed: int = 0,
                        input_fn: Optional[Callable[[Any], Any]] = None, *, unit_merger: Callable,
                        match: Optional[str] = None, example_inputs: Any = None,
                        whole_error: Optional[BaseException | str] = None, composition: Optional[Composition] = None,
                        return_result: bool = False, leaf_modules: Iterable[type] = (),
                        fixed_params: Iterable[str] = (), stats_budget_bytes: int = 2 << 30, progress: bool = False,
                        verify: bool = True, **options: Any):
    """Merge models that do not trace as a whole: every traced submodule (see
    ``plan_composition``) is merged by ``unit_merger`` (the library's staged pipeline,
    :class:`mudsc_fx.Merger`: ``mf.merge`` passes it) on the inputs the submodule receives
    (model 0's submodule inputs, batch by batch), with its interface fixed; every parameter
    outside the units is averaged. Warns with the headline of the report; the full report is
    ``merge_compositional(..., return_result=True).report`` (``.summary()``, ``.to_dict()``).

    Arguments as for :func:`mudsc_fx.merge` (``fixed_params`` are the whole model's names;
    ``options`` are MatchConfig fields for every unit). ``composition``: a plan of models[0]
    made by :func:`plan_composition` (else one is made). The plan proves every unit on its
    own and all units together on the whole model, so the units' mergers do not prove again
    (``verify`` is accepted for the signature of ``merge`` and always holds). The inputs are
    never modified.

    >>> # merged = merge_compositional([det_a, det_b], loader, "act_align", unit_merger=mf.Merger,
    >>> #                              input_fn=lambda images: (images,))
    """
    from .stats import default_input_fn

    _check_models(models)
    leaf_modules, fixed_params = tuple(leaf_modules), tuple(fixed_params)
    input_fn = input_fn or default_input_fn
    if data is not None:
        data = list(data) if iter(data) is data else data  # a generator: keep its batches
    if data is not None:
        example = next((model_call(input_fn(b), models[0]) for b in data), None)
        if example is None:
            raise ValueError("the calibration data is empty")
    elif example_inputs is not None:
        example = model_call(example_inputs, models[0])
    else:
        raise ValueError("pass calibration data, or example_inputs= for a data-free merge (rebasin, weight_zip)")
    why = None if whole_error is None else whole_error if isinstance(whole_error, str) else _first_line(whole_error)
    with eval_mode(*models):
        comp = composition or plan_composition(models[0], example, seed=seed, leaf_modules=leaf_modules,
                                               whole_error=why)
        warnings.warn(f"mudsc_fx: {comp.report.headline()}; see merge_compositional(..., return_result=True)"
                      ".report.summary()", stacklevel=2)
        log.info("%s", comp.report.summary())
        unit_data = record_unit_inputs(models[0], comp, data, input_fn) if data is not None else {}
        merged = copy.deepcopy(models[0])
        results = {}
        for u in comp.units:
            wrappers = [wrap_call(m.get_submodule(u.path), u.call) for m in models]
            merger = unit_merger(wrappers, unit_data.get(u.path) or None, example_inputs=u.call.tensors,
                                 input_fn=tuple, leaf_modules=leaf_modules, verify=False,
                                 fixed_params=_unit_fixed_params(models[0], u.path, fixed_params),
                                 stats_budget_bytes=stats_budget_bytes, progress=progress)
            res = merger.merge(method, alpha, reset_bn=False, seed=seed, match=match, **options)
            results[u.path] = res
            load_tensors(merged.get_submodule(u.path),
                         {n[len(PREFIX):]: t for n, t in named_tensors(res.model).items() if n.startswith(PREFIX)})
        prefixes = tuple(_join(u.path, "") for u in comp.units)
        tensors = [named_tensors(m) for m in models]
        with torch.no_grad():
            rest = {n: torch.stack([t[n].detach() for t in tensors]).mean(0) for n, t0 in tensors[0].items()
                    if t0.is_floating_point() and not n.startswith(prefixes)}
        load_tensors(merged, rest)
    merged.eval()
    if reset_bn and data is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules()):
        reset_batchnorm(merged, data, input_fn)
    if return_result:
        return CompositionalResult(merged, comp.report, results)
    return merged
