"""The merge pipeline, top to bottom, its presets (the rows of the MuDSC paper) and the
staged API.

``Merger(models, data)`` validates the models, traces and infers the permutation graph once,
proves it on the first calibration batch (failing spaces are frozen and named), and computes
activation statistics once; ``Merger.merge(method, alpha)`` then solves, rewrites and resets
BatchNorm for one method, as often as wanted. ``merge(...)`` is the one-call form.

    validate -> infer -> verify -> collect_stats -> solve -> rewrite -> reset_bn
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from torch import nn

from . import distributed
from .alpha_search import pop_auto_options, search_alpha
from .ir.graph import PermutationGraph
from .ir.inputs import eval_mode, model_call
from .ir.errors import TraceError
from .passes.apply import apply_permutations, named_tensors
from .passes import bn_reset
from .passes.check import Verification, verify as verify_graph
from .passes.infer import infer
from .passes.partial import Cut, build_partial, cost_report, find_cut, trunk_params
from .passes.rewrite import rewrite
from .passes.solve import Alignment, MatchConfig, SolveCache, solve
from .passes.stats import STATS_BUDGET_BYTES, Statistics, collect_stats, default_input_fn
from .validation import (CheckedBatches, check_bool, check_fixed_params, check_int, check_leaf_modules,
                         small_example, validate_models)
from .methods import PRESETS, _FAMILY, method_config, register_method  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: options of :class:`Merger` (the models' stage) that ``merge`` and ``align_models`` pass on
STAGED_OPTIONS = ("leaf_modules", "fixed_params", "stats_budget_bytes", "verify", "progress", "frontend",
                  "recompute_input_bn")


@dataclass(frozen=True)
class MergeResult:
    """One merge: the merged module and everything that produced it.

    ``graph`` is the verified permutation graph (spaces that failed the proof frozen, see
    ``frozen_spaces``); ``alpha_scores`` maps each alpha tried by an alpha search to its score."""
    model: nn.Module
    graph: PermutationGraph
    alignment: Alignment
    stats: Optional[Statistics]
    seconds: dict[str, float]
    config: MatchConfig
    method: str = ""
    alpha: Optional[float] = None
    verification: Optional[Verification] = None
    alpha_scores: dict[float, float] = field(default_factory=dict)
    cut: Optional[Cut] = None
    cost: Optional[dict[str, float]] = None

    @property
    def coverage(self) -> float:
        """Fraction of hidden units that could move (frozen and fixed spaces excluded)."""
        return self.graph.coverage()

    @property
    def frozen_spaces(self) -> tuple[int, ...]:
        return () if self.verification is None else self.verification.failing_spaces

    def summary(self) -> str:
        g = self.graph
        lines = [f"merged {self.alignment.n_models} models with {self.method}"
                 + ("" if self.alpha is None else f" (alpha {self.alpha:g})"),
                 f"coverage {self.coverage:.3f}: {len(g.free_spaces)} of {len(g.spaces)} spaces free, "
                 f"{len(g.barriers)} barriers, {len(self.frozen_spaces)} spaces frozen by verification"]
        if self.alpha_scores:
            lines.append("alpha search (alpha: score): " + ", ".join(
                f"{a:g}: {v:.4f}" for a, v in sorted(self.alpha_scores.items())) + f"; chose {self.alpha:g}")
        if self.frozen_spaces:
            lines.append("frozen (failed the equivalence check): " + ", ".join(
                f"S{s} ({', '.join(m.fqn for m in g.spaces[s].members[:3]) or 'no members'})" for s in self.frozen_spaces))
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the pipeline
class Merger:
    """Staged merging: the models are validated, traced, inferred and proven once; statistics
    are collected once (on first use); each :meth:`merge` solves and rewrites for one method.

    >>> import torch, mudsc_fx as mf
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    >>> merger = mf.Merger(nets, [torch.randn(16, 4)])
    >>> [merger.merge(m).model(torch.randn(1, 4)).shape for m in ("zipit", "act_align")]
    [torch.Size([1, 2]), torch.Size([1, 2])]
    """

    def __init__(self, models: Sequence[nn.Module], data: Optional[Iterable] = None, *,
                 example_inputs: Any = None, input_fn: Optional[Callable[[Any], Any]] = None,
                 leaf_modules: Iterable[type] = (), fixed_params: Iterable[str] = (), verify: bool = True,
                 stats_budget_bytes: int = STATS_BUDGET_BYTES, progress: bool = False, frontend: str = "auto",
                 recompute_input_bn: bool = False):
        t = time.perf_counter()
        self.leaf_modules = check_leaf_modules(leaf_modules)
        self.fixed_params = check_fixed_params(fixed_params)
        self.stats_budget_bytes = check_int("stats_budget_bytes", stats_budget_bytes, 1)
        self.progress = check_bool("progress", progress)
        check_bool("verify", verify)
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"input_fn must be callable, got {input_fn!r}")
        check_bool("recompute_input_bn", recompute_input_bn)
        validate_models(models)
        self.models = tuple(models)
        self.input_fn = input_fn or default_input_fn
        self.data = None if data is None else CheckedBatches(data, self.input_fn)
        if recompute_input_bn and any(bn_reset.has_batchnorm(m) for m in self.models):
            # as the reference MuDSC code does: every model's BatchNorm statistics recomputed on
            # the calibration data (on copies) before anything is measured or merged
            if self.data is None:
                raise ValueError("recompute_input_bn needs calibration data")
            self.models = tuple(bn_reset.reset_bn(copy.deepcopy(m), self.data, self.input_fn) for m in self.models)
        if self.data is not None:
            example = self.data.first
        elif example_inputs is not None:
            example = model_call(example_inputs)
        else:
            raise ValueError("pass calibration data, or example_inputs= for a data-free merge (rebasin, weight_zip)")
        self.seconds: dict[str, float] = {}
        with eval_mode(*self.models):
            graph = infer(self.models[0], example, leaf_modules=self.leaf_modules, fixed_params=self.fixed_params,
                          frontend=frontend)
            self.seconds["infer"] = time.perf_counter() - t
            self.verification: Optional[Verification] = None
            if verify:
                self.verification = verify_graph(self.models[0], graph, small_example(example))
                self.seconds["verify"] = self.verification.seconds
                graph = self.verification.graph
                if self.verification.failing_spaces:
                    warnings.warn(_frozen_message(graph, self.verification.failing_spaces), stacklevel=2)
        self.graph = graph
        self.example = example
        self._tensors = [named_tensors(m) for m in self.models]
        self._stats: Optional[Statistics] = None
        self._solve_cache = SolveCache()  # weight features and unit matchings shared by merges
        log.info("merge: %d spaces (%d free), coverage %.3f, %d barriers", len(graph.spaces),
                 len(graph.free_spaces), graph.coverage(), len(graph.barriers))

    def statistics(self) -> Statistics:
        """Activation statistics of every free space (one streaming pass, computed once)."""
        if self._stats is None:
            if self.data is None:
                raise ValueError("this merge uses activations: pass calibration data")
            t = time.perf_counter()
            with eval_mode(*self.models):
                self._stats = collect_stats(list(self.models), self.graph, self.data, input_fn=self.input_fn,
                                            budget_bytes=self.stats_budget_bytes, progress=self.progress)
            self.seconds["statistics"] = time.perf_counter() - t
        return self._stats

    def merge(self, method: Optional[str] = None, alpha: Union[float, str, None] = None, *, reset_bn: bool = True,
              seed: int = 0, match: Optional[str] = None, stop_at: Union[str, float, None] = None,
              combine: Union[str, Callable, None] = None, **options: Any) -> MergeResult:
        """Merge with one method (a preset of PRESETS) and alpha; ``options``: MatchConfig fields.

        ``stop_at`` (partial zipping): merge only up to a node or module name, or a fraction of
        the FLOPs; the result runs the merged trunk once and each model's own tail, returning
        the N tails' outputs, or ``combine`` of them ("sum_softmax", "mean_logits", "concat" or a
        callable). BatchNorm is reset everywhere (the tails read the merged trunk's features);
        ``MergeResult.cost`` gives its size.

        ``alpha="auto"`` (dual-space methods) merges every alpha of ``alpha_grid`` and keeps the
        best by ``score_fn``, the accuracy on ``val_data`` or, without labels, a proxy on the
        calibration data (:mod:`mudsc_fx.alpha_search`)."""
        auto = pop_auto_options(alpha, options)
        if alpha == "auto":
            return search_alpha(self, method, match=match, reset_bn=reset_bn, seed=seed, stop_at=stop_at,
                                combine=combine, **auto, **options)
        cfg = method_config(method, alpha, match, **options)
        method = method or (_FAMILY[match][1] if match else "mudsc_zip")
        seed = check_int("seed", seed)
        check_bool("reset_bn", reset_bn)
        graph, cut = self.graph, None
        if stop_at is not None:
            cut = find_cut(self.graph, stop_at, small_example(self.example))
            read = trunk_params(self.graph, cut)
            after = [s for group in graph.motion_groups()  # groups move together: all or nothing
                     if not any(m.fqn in read for s in group for m in graph.spaces[s].members) for s in group]
            graph = graph.freeze(after, "after the cut (kept per model)")
        elif combine is not None:
            raise ValueError("combine= applies to partial merges (stop_at=...)")
        seconds = dict(self.seconds)
        stats = self.statistics() if cfg.uses_activations else None
        seconds["statistics"] = self.seconds.get("statistics", 0.0) if stats is not None else 0.0
        with eval_mode(*self.models):
            t = time.perf_counter()
            # under torch.distributed: rank 0 solves, every rank gets its alignment
            alignment = distributed.on_main(lambda: solve(graph, stats, self._tensors, cfg, seed, cache=self._solve_cache),
                                            distributed.resolve())
            seconds["solve"] = time.perf_counter() - t
            t = time.perf_counter()
            merged = rewrite(list(self.models), graph, alignment)
            if cut is not None:
                merged = build_partial(self.models, graph, alignment, merged, cut, combine)
            seconds["rewrite"] = time.perf_counter() - t
        t = time.perf_counter()
        merged.eval()
        if reset_bn and self.data is not None and bn_reset.has_batchnorm(merged):
            # a partial merge resets its tails too: they now read the merged trunk's features
            # (ResNet-20x2 BN on digits, zip cut after layer1: Joint 61.9 trunk only, 74.2 all)
            bn_reset.reset_bn(merged, self.data, self.input_fn)
        seconds["reset_bn"] = time.perf_counter() - t
        cost = None if cut is None else cost_report(self.graph, merged, small_example(self.example))
        log.info("merge %s: %s", method, ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))
        return MergeResult(merged, graph, alignment, stats, seconds, cfg, method,
                           cfg.alpha if cfg.match is not None else None, self.verification, cut=cut, cost=cost)


def _frozen_message(graph: PermutationGraph, spaces: tuple[int, ...]) -> str:
    names = []
    for s in spaces:
        members = ", ".join(f"{m.fqn}[{m.axis}]" for m in graph.spaces[s].members[:3])
        names.append(f"S{s} ({members or 'no members'})")
    return ("mudsc_fx: the inferred permutation graph failed the equivalence check on "
            f"{len(spaces)} space(s); they are frozen (not merged): {'; '.join(names)}. "
            "This is a bug in a rule: please report it with the model.")


def merge(models: Sequence[nn.Module], data: Optional[Iterable] = None, method: Optional[str] = None,
          alpha: Union[float, str, None] = None, reset_bn: bool = True, seed: int = 0,
          input_fn: Optional[Callable[[Any], Any]] = None, *, match: Optional[str] = None,
          example_inputs: Any = None, **options: Any) -> nn.Module:
    """Merge models of one architecture into one module of model 0's class, without training.

    ``data``: iterable of batches (a tensor, or a tuple whose first item is the input; use
    ``input_fn`` for anything else). ``method``: one of PRESETS (default "mudsc_zip").
    ``alpha``: weight of the weight similarity (0 = activations only, 1 = weights only), or
    "auto" (``alpha_grid=``, ``val_data=`` / ``score_fn=``: see :meth:`Merger.merge`).
    ``options``: MatchConfig fields (``zip_a``, ``zip_b``, ``weight_normalize``, ...) and
    ``leaf_modules``, ``fixed_params``, ``frontend``, ``stats_budget_bytes``, ``verify``, ``progress``,
    ``recompute_input_bn`` (recompute the models' BatchNorm statistics on the calibration data,
    on copies, before statistics and weights are read, as the reference MuDSC code does). The
    graph is proven on the first batch before anything is merged. The inputs are never
    modified. For the merge's report (coverage, frozen spaces, alignment) use :class:`Merger`.
    A model that torch.fx cannot trace as a whole (a detector's per-image loops) is merged by
    its traced submodules, with a warning (``mudsc_fx.passes.compose.merge_compositional``).

    >>> import torch, mudsc_fx as mf
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    >>> merged = mf.merge(nets, [torch.randn(16, 4)], method="zipit")
    >>> merged(torch.randn(1, 4)).shape
    torch.Size([1, 2])
    """
    staged = {k: options.pop(k) for k in STAGED_OPTIONS
              if k in options}
    partial = {k: options.pop(k) for k in ("stop_at", "combine") if k in options}
    auto = pop_auto_options(alpha, options)
    cfg = method_config(method, None if alpha == "auto" else alpha, match, **options)  # option errors first
    if cfg.uses_activations and data is None:
        raise ValueError(f"method {method or 'mudsc_zip'!r} uses activations: pass calibration data")
    if isinstance(data, Iterator):
        data = list(data)  # a generator: the compositional fallback reads it again
    try:
        merger = Merger(models, data, example_inputs=example_inputs, input_fn=input_fn, **staged)
    except TraceError as e:  # traces nowhere as a whole: merge its traced submodules (warns, reports)
        if partial or alpha == "auto" or staged.pop("recompute_input_bn", False):
            raise  # not offered by the compositional fallback
        from .passes.compose import merge_compositional
        staged.pop("frontend", None)  # the units are traced on their own
        return merge_compositional(models, data, method, alpha, reset_bn, seed, input_fn, unit_merger=Merger,
                                   match=match, example_inputs=example_inputs, whole_error=e, **staged, **options)
    return merger.merge(method, alpha, reset_bn=reset_bn, seed=seed, match=match, **partial, **auto,
                        **options).model


def align_models(models: Sequence[nn.Module], data: Optional[Iterable] = None, method: str = "act_align",
                 seed: int = 0, input_fn: Optional[Callable] = None, *, example_inputs: Any = None,
                 **options: Any) -> list[nn.Module]:
    """Permute every model into models[0]'s basis (copies; models[0] is returned as a copy).
    ``method`` must be a permutation matching: act_align, mudsc_align or rebasin. The graph is
    proven first, so the aligned copies compute exactly what the originals compute. With
    ``alpha="auto"`` (mudsc_align) the alignment of the best-scoring merge is used."""
    alpha = options.pop("alpha", None)
    auto = pop_auto_options(alpha, options)
    cfg = method_config(method, None if alpha == "auto" else alpha)
    if cfg.match != "align":
        raise ValueError(f"align_models needs a permutation method (act_align, mudsc_align, rebasin), got {method!r}")
    staged = {k: options.pop(k) for k in STAGED_OPTIONS
              if k in options}
    res = Merger(models, data, example_inputs=example_inputs, input_fn=input_fn, **staged).merge(
        method, alpha, reset_bn=alpha == "auto", seed=seed, **auto, **options)  # auto scores the real merge
    out = []
    for i, m in enumerate(models):
        perms = {s: p[i] for s, p in res.alignment.perms.items()}
        out.append(apply_permutations(m, res.graph, perms))
    return out
