"""Stage 2: infer the permutation graph of a traced model (DESIGN.md, "The IR").

One forward walk over the graph gives every tensor axis a label (see ``unify``); per-op
knowledge lives in ``rules.RULES``. Afterwards tied parameters are unified (rule 12) and
the union-find is frozen into a :class:`PermutationGraph`.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from ..ir.graph import Barrier, Member, PermutationGraph, Space, Tap
from ..ir.layout import Fixed, Layout, Plain, map_spaces, spaces_of
from ..ir.trace import TensorValue, trace, value_of
from .unify import AxisLabel, Parts, SpaceTable, Within

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorLabel:
    axes: tuple[AxisLabel, ...]

    def __len__(self) -> int:
        return len(self.axes)

    def __getitem__(self, i):
        return self.axes[i]

    def replace(self, i: int, label: AxisLabel) -> "TensorLabel":
        ax = list(self.axes)
        ax[i] = label
        return TensorLabel(tuple(ax))


def fixed_label(ndim: int) -> TensorLabel:
    return TensorLabel((None,) * ndim)


@dataclass
class ParamUse:
    """One use of a parameter/buffer at one call site: per axis a layout slot (a fresh space
    until a rule unifies it), a role and a groups count (see ``Member``)."""
    fqn: str
    shape: tuple[int, ...]
    layouts: list[Optional[Layout]]
    roles: list[str]
    groups: list[int] = field(default_factory=list)
    # axes a rule connected to the graph; None for get_attr uses (their label flows through
    # the graph, so every consumer decides). Ungoverned axes of module parameters are fixed.
    governed: Optional[set[int]] = None

    @property
    def label(self) -> TensorLabel:
        return TensorLabel(tuple(self.layouts))

    def mark_in(self, axis: int) -> None:
        self.roles[axis % len(self.roles)] = "in"


class InferContext:
    """What a rule may read and do. Rules never touch the union-find's lists directly."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        self.gm = gm
        self.model = model
        self.table = SpaceTable()
        self.labels: dict[fx.Node, Any] = {}
        self.uses: list[ParamUse] = []
        self.use_of_node: dict[fx.Node, ParamUse] = {}
        self.barriers: list[Barrier] = []
        self.in_taps: list[tuple[str, int, Layout, Any]] = []
        self.out_taps: list[tuple[str, int, Layout, Any]] = []
        self.producers: list[tuple[str, Layout]] = []
        named: dict[str, torch.Tensor] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            named[n] = p
        for n, b in model.named_buffers(remove_duplicate=False):
            named[n] = b
        first: dict[int, str] = {}
        self.canonical: dict[str, str] = {}
        for n, t in named.items():
            self.canonical[n] = first.setdefault(id(t), n)
        self.tensors = named

    # -- reading ----------------------------------------------------------------------
    def label(self, arg: Any) -> Any:
        """Resolved label of an argument: TensorLabel for tensors, tuples for tuples, None else."""
        if isinstance(arg, fx.Node):
            return self._resolve(self.labels.get(arg))
        if isinstance(arg, (tuple, list)):
            return tuple(self.label(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.label(a) for k, a in arg.items()}
        return None

    def _resolve(self, lab: Any) -> Any:
        if isinstance(lab, TensorLabel):
            return TensorLabel(tuple(self.table.resolve_label(a) for a in lab.axes))
        if isinstance(lab, tuple):
            return tuple(self._resolve(x) for x in lab)
        if isinstance(lab, dict):
            return {k: self._resolve(x) for k, x in lab.items()}
        return lab

    def tlabel(self, arg: Any) -> TensorLabel:
        lab = self.label(arg)
        if not isinstance(lab, TensorLabel):
            raise _NotATensor(arg)
        return lab

    @staticmethod
    def shape(arg: Any) -> tuple[int, ...]:
        v = value_of(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(v, TensorValue):
            raise _NotATensor(arg)
        return v.shape

    @staticmethod
    def is_tensor(arg: Any) -> bool:
        return isinstance(arg, fx.Node) and isinstance(value_of(arg), TensorValue)

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    # -- parameters -------------------------------------------------------------------
    def param(self, fqn: str, *, governed_by_rule: bool = False) -> Optional[ParamUse]:
        """A fresh use of parameter/buffer ``fqn`` (None if the module has no such tensor).
        With ``governed_by_rule`` the calling rule must connect every axis it relies on;
        the rest are fixed (a conv's kernel axes)."""
        t = self.tensors.get(fqn)
        if t is None:
            return None
        use = ParamUse(fqn, tuple(t.shape),
                       [Plain(self.table.new(n)) if n > 1 else None for n in t.shape],
                       ["out"] * t.dim(), [1] * t.dim(), set() if governed_by_rule else None)
        self.uses.append(use)
        return use

    def use_of(self, arg: Any) -> Optional[ParamUse]:
        return self.use_of_node.get(arg) if isinstance(arg, fx.Node) else None

    # -- effects ----------------------------------------------------------------------
    def unify(self, a: AxisLabel, b: AxisLabel, why: str = "elementwise") -> AxisLabel:
        return self.table.unify(a, b, why)

    def fix(self, label: Any, reason: str) -> None:
        if isinstance(label, TensorLabel):
            for a in label.axes:
                self.table.fix_label(a, reason)
        elif isinstance(label, (tuple, list)):
            for x in label:
                self.fix(x, reason)
        elif isinstance(label, dict):
            for x in label.values():
                self.fix(x, reason)

    def barrier(self, node: fx.Node, reason: str) -> None:
        why = f"barrier at {node.name}: {reason}"
        for a in _flat_args(node):
            self.fix(self.label(a), why)
        self.barriers.append(Barrier(node.name, _op_name(node), reason))

    def tap(self, node: fx.Node, axis: int, layout: AxisLabel, *, out: bool = False,
            proj: Any = None) -> None:
        if layout is None or isinstance(layout, (Within, Parts, Fixed)):
            return
        (self.out_taps if out else self.in_taps).append((node.name, axis, layout, proj))

    def producer(self, node: fx.Node, layout: AxisLabel, size: int) -> None:
        """Record ``size`` output units of a weight-carrying op (for coverage)."""
        ok = layout is not None and not isinstance(layout, (Within, Parts))
        self.producers.append((node.name, layout if ok else Fixed(size)))

    def note_barrier(self, node: fx.Node, reason: str) -> None:
        """Record a structural barrier (the rule already fixed what it touches)."""
        self.barriers.append(Barrier(node.name, _op_name(node), reason))


class _NotATensor(Exception):
    pass


def _flat_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {t}"
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")
    return str(t)


def _check_within(ctx: InferContext, lab: Any) -> Any:
    """Invariant: a Within(s) axis needs s's head axis in the same tensor; otherwise the
    within-block permutation is pinned to the identity and the axis becomes fixed."""
    if isinstance(lab, tuple):
        return tuple(_check_within(ctx, x) for x in lab)
    if not isinstance(lab, TensorLabel):
        return lab
    axes = [ctx.table.resolve_label(a) for a in lab.axes]
    for i, a in enumerate(axes):
        if isinstance(a, Within):
            h = ctx.table.head_of(a.space)
            if h is None or Plain(h) not in axes:
                ctx.table.identity_within(a.space)
                axes[i] = None
    return TensorLabel(tuple(axes))


def _structure_ok(lab: Any, val: Any) -> bool:
    if isinstance(val, TensorValue):
        return isinstance(lab, TensorLabel) and len(lab.axes) == len(val.shape)
    if isinstance(val, tuple) and _has_tensor(val):
        return isinstance(lab, tuple) and len(lab) == len(val) and all(_structure_ok(l, v) for l, v in zip(lab, val))
    return not isinstance(lab, TensorLabel)


def _has_tensor(val: Any) -> bool:
    if isinstance(val, TensorValue):
        return True
    if isinstance(val, (tuple, list)):
        return any(_has_tensor(v) for v in val)
    if isinstance(val, dict):
        return any(_has_tensor(v) for v in val.values())
    return False


def _fixed_like(val: Any) -> Any:
    if isinstance(val, TensorValue):
        return fixed_label(len(val.shape))
    if isinstance(val, tuple):
        return tuple(_fixed_like(v) for v in val)
    if isinstance(val, dict):
        return {k: _fixed_like(v) for k, v in val.items()}
    return None


def infer(model: nn.Module, example_inputs: Any = None, *, gm: Optional[fx.GraphModule] = None,
          leaf_modules: Iterable[type] = (), fixed_params: Iterable[str] = ()) -> PermutationGraph:
    """Infer which units of ``model`` can be permuted together without changing its function.

    ``fixed_params``: parameter names whose axes must not move (a frozen shared head).

    >>> import torch, mudsc_fx as mf
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pg = mf.infer(m, torch.randn(3, 4))
    >>> [s.size for s in pg.spaces if pg.is_free(s.id)]
    [8]
    """
    from .rules import lookup_rule

    if gm is None:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    ctx = InferContext(gm, model)
    unknown: dict[str, int] = {}
    for node in gm.graph.nodes:
        val = value_of(node) if node.op != "output" else None
        if node.op == "placeholder":
            ctx.labels[node] = _fixed_like(val)
            continue
        if node.op == "output":
            ctx.fix(ctx.label(node.args[0]), f"output ({node.name})")
            continue
        if node.op == "get_attr":
            use = ctx.param(node.target) if isinstance(val, TensorValue) else None
            if use is not None:
                ctx.use_of_node[node] = use
                ctx.labels[node] = use.label
            else:
                ctx.labels[node] = _fixed_like(val)
            continue
        rule = lookup_rule(ctx, node)
        if rule is None:
            op = _op_name(node)
            unknown[op] = unknown.get(op, 0) + 1
            ctx.barrier(node, "no rule for this op")
            ctx.labels[node] = _fixed_like(val)
            continue
        try:
            out = rule(ctx, node)
        except _NotATensor:
            ctx.barrier(node, "unexpected non-tensor argument")
            out = _fixed_like(val)
        out = _check_within(ctx, out)
        if not _structure_ok(out, val):
            log.error("rule for %s returned a label that does not match its value; treating it as a barrier",
                      node.format_node())
            ctx.barrier(node, "rule returned a mismatched label (bug)")
            out = _fixed_like(val)
        ctx.labels[node] = out
    if unknown:
        warnings.warn("mudsc_fx: no permutation rule for " + ", ".join(f"{k} (x{v})" for k, v in sorted(unknown.items()))
                      + "; these ops are barriers (the spaces they touch stay fixed)", stacklevel=2)
    for name in fixed_params:
        for use in ctx.uses:
            if use.fqn == name or ctx.canonical.get(use.fqn) == name:
                for lay in use.layouts:
                    ctx.table.fix_label(lay, f"fixed parameter {name}")
    for use in ctx.uses:
        if use.governed is not None:
            for ax, lay in enumerate(use.layouts):
                if ax not in use.governed:
                    ctx.table.fix_label(lay, f"axis {ax} of {use.fqn} is not permutable")
    _unify_tied(ctx)
    return _freeze(ctx)


def _unify_tied(ctx: InferContext) -> None:
    """Rule 12: every use of one tensor (a module called twice, tied weights) has one layout per axis."""
    first: dict[str, ParamUse] = {}
    for use in ctx.uses:
        key = ctx.canonical.get(use.fqn, use.fqn)
        if key not in first:
            first[key] = use
            continue
        ref = first[key]
        for ax in range(len(use.shape)):
            a, b = ref.layouts[ax], use.layouts[ax]
            if ref.groups[ax] != use.groups[ax]:
                ctx.table.fix_label(a, f"tied parameter {key} used with different groups")
                ctx.table.fix_label(b, f"tied parameter {key} used with different groups")
            elif a is not None and b is not None:
                ctx.table.unify(a, b, f"tied parameter {key}")


def _freeze(ctx: InferContext) -> PermutationGraph:
    T = ctx.table
    # members: one per (canonical tensor, axis), from its first use
    members: list[Member] = []
    seen: set[tuple[str, int]] = set()
    for use in ctx.uses:
        key = ctx.canonical.get(use.fqn, use.fqn)
        for ax, lay in enumerate(use.layouts):
            if lay is None or (key, ax) in seen:
                continue
            res = T.resolve(lay)
            if isinstance(res, Fixed):
                continue
            seen.add((key, ax))
            members.append(Member(key, ax, res, use.roles[ax], use.groups[ax]))
    refs: dict[int, int] = {}
    for m in members:
        for s in set(map(T.find, spaces_of(m.layout))):
            refs[s] = refs.get(s, 0) + 1
    members = [m for m in members
               if not all(T.fixed[T.find(s)] and refs[T.find(s)] == 1 for s in spaces_of(m.layout))]
    # renumber the spaces that members, taps and producers mention (heads included)
    order: dict[int, int] = {}

    def visit(s: int) -> None:
        r = T.find(s)
        if r in order:
            return
        order[r] = len(order)
        if T.head[r] is not None:
            visit(T.head[r])

    for m in members:
        for s in spaces_of(m.layout):
            visit(s)
    taps = [(n, a, T.resolve(l), p) for (n, a, l, p) in ctx.in_taps + ctx.out_taps]
    prods = [(n, T.resolve(l)) for n, l in ctx.producers]
    for lay in [t[2] for t in taps] + [p[1] for p in prods]:
        for s in spaces_of(lay):
            visit(s)

    def renum(layout: Layout) -> Layout:
        return map_spaces(layout, lambda s: Plain(order[T.find(s)]))

    members = [Member(m.fqn, m.axis, renum(m.layout), m.role, m.groups) for m in members]
    by_space: dict[int, list[Member]] = {}
    for m in members:
        for s in dict.fromkeys(spaces_of(m.layout)):
            by_space.setdefault(s, []).append(m)
    spaces = []
    for r, sid in sorted(order.items(), key=lambda kv: kv[1]):
        head = T.head[r]
        spaces.append(Space(
            id=sid, size=T.size[r], kind="head" if T.is_head[r] else "unit", fixed=T.fixed[r],
            fixed_by=tuple(sorted(T.reasons[r])), blocks=T.blocks[r],
            head=None if head is None else order[T.find(head)],
            within="identity" if T.within_identity[r] else "free",
            members=tuple(by_space.get(sid, ()))))
    n_in = len(ctx.in_taps)
    out_taps = tuple(Tap(n, a, renum(l), p) for (n, a, l, p) in taps[n_in:] if not isinstance(l, Fixed))
    in_taps = tuple(Tap(n, a, renum(l), p) for (n, a, l, p) in taps[:n_in] if not isinstance(l, Fixed))
    floating = tuple(dict.fromkeys(ctx.canonical[n] for n, t in ctx.tensors.items() if t.is_floating_point()))
    aliases = tuple((n, c) for n, c in ctx.canonical.items() if n != c)
    return PermutationGraph(
        spaces=tuple(spaces), members=tuple(members), barriers=tuple(ctx.barriers),
        in_taps=in_taps, out_taps=out_taps,
        producers=tuple((n, renum(l)) for n, l in prods),
        params=floating, aliases=aliases, gm=ctx.gm)
