"""Stage 2: infer the permutation graph of a traced model.

One forward walk over the graph gives every tensor axis a label; per-op knowledge lives in
the rule table (:mod:`mudsc_fx.rules`), and every rule runs under the soundness contract of
:mod:`mudsc_fx.rules.context` (an axis a rule does not account for is fixed). Afterwards tied
parameters are unified (rule 12) and the union-find is frozen into a
:class:`PermutationGraph`.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable, Optional

import torch.fx as fx
from torch import nn

from ..ir.graph import AxisLayout, Member, PermutationGraph, Space, Structured, Tap
from ..ir.layout import Fixed, Layout, Plain, map_spaces, spaces_of
from ..ir.values import TensorValue, value_of
from ..ir.trace import trace
from ..rules.context import InferContext, NotATensor, ParamUse, Parts, TensorLabel, Within, fixed_label, op_name
from ..rules.table import lookup_rule, rule_name

log = logging.getLogger(__name__)


def _check_within(ctx: InferContext, lab: Any) -> Any:
    """Invariant: a Within(s) axis needs s's head axis in the same tensor; otherwise the
    within-block permutation is pinned to the identity and the axis becomes fixed."""
    if isinstance(lab, tuple):
        return tuple(_check_within(ctx, x) for x in lab)
    if not isinstance(lab, TensorLabel):
        return lab
    axes = [ctx.resolve(a) for a in lab.axes]
    for i, a in enumerate(axes):
        if isinstance(a, Within):
            h = ctx.head_of(a.space)
            if h is None or Plain(h) not in axes:
                ctx.identity_within(a.space)
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
          leaf_modules: Iterable[type] = (), fixed_params: Iterable[str] = (),
          frontend: str = "auto") -> PermutationGraph:
    """Infer which units of ``model`` can be permuted together without changing its function.

    ``fixed_params``: parameter names whose axes must not move (a frozen shared head).
    ``example_inputs`` and ``frontend``: see :func:`mudsc_fx.trace`.

    >>> import torch, mudsc_fx as mf
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> pg = mf.infer(m, torch.randn(3, 4))
    >>> [s.size for s in pg.spaces if pg.is_free(s.id)]
    [8]
    """
    if gm is None:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules, frontend=frontend)
    ctx = InferContext(gm, model)
    unknown: dict[str, int] = {}
    for node in gm.graph.nodes:
        val = value_of(node) if node.op != "output" else None
        if node.op == "placeholder":
            ctx.labels[node] = _fixed_like(val)
        elif node.op == "output":
            ctx.fix(ctx.label(node.args[0]), f"output ({node.name})")
        elif node.op == "get_attr":
            use = ctx.param(node.target) if isinstance(val, TensorValue) else None
            if use is not None:
                ctx.bind_use(node, use)
                ctx.labels[node] = use.label
            else:  # a constant outside the state dict: a merge can never permute it
                ctx.labels[node] = _fixed_like(val)
        else:
            ctx.labels[node] = _run_rule(ctx, node, val, unknown)
    if unknown:
        warnings.warn("mudsc_fx: no permutation rule for " + ", ".join(f"{k} (x{v})" for k, v in sorted(unknown.items()))
                      + "; these ops are barriers (the spaces they touch stay fixed)", stacklevel=2)
    names = set(fixed_params)
    for name in names:
        if name not in ctx.canonical and name not in ctx.canonical.values():
            raise ValueError(f"fixed_params names {name!r}, which is not a parameter or buffer of "
                             f"{type(model).__name__}")
    for use in ctx.uses:
        if use.fqn in names or ctx.canonical.get(use.fqn) in names:
            for lay in use.layouts:
                ctx.fix(lay, f"fixed parameter {use.fqn}")
        elif not ctx.tensors[use.fqn].is_floating_point():  # masks, indices: cannot be averaged
            for lay in use.layouts:
                ctx.fix(lay, f"non-floating tensor {use.fqn} cannot be merged")
    _unify_tied(ctx)
    return _freeze(ctx)


def _run_rule(ctx: InferContext, node: fx.Node, val: Any, unknown: dict[str, int]) -> Any:
    """The node's rule under the soundness contract; a missing or failing rule is a barrier."""
    rule = lookup_rule(ctx, node)
    if rule is None:
        op = op_name(node)
        unknown[op] = unknown.get(op, 0) + 1
        ctx.barrier(node, "no rule for this op")
        return _fixed_like(val)
    first_use = ctx.begin_rule()
    try:
        out = rule(ctx, node)
    except NotATensor:
        ctx.barrier(node, "unexpected non-tensor argument")
        out = _fixed_like(val)
    except Exception as e:  # a bug in a rule must not become a wrong merge: barrier, loudly
        warnings.warn(f"mudsc_fx: rule {rule_name(rule)} failed on node {node.format_node()} "
                      f"({op_name(node)}): {type(e).__name__}: {e}; the node is a barrier", stacklevel=3)
        ctx.barrier(node, f"rule {rule_name(rule)} failed: {type(e).__name__}: {e}")
        out = _fixed_like(val)
    out = _check_within(ctx, out)
    if not _structure_ok(out, val):
        log.error("rule %s for %s returned a label that does not match its value; treating it as a barrier",
                  rule_name(rule), node.format_node())
        ctx.barrier(node, f"rule {rule_name(rule)} returned a mismatched label (bug)")
        out = _fixed_like(val)
    ctx.end_rule(node, rule_name(rule), out, first_use)
    return out


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


def _flatten_heads(T) -> None:
    """One level of blocks: a blocked space whose head space has blocks of its own (query
    heads of grouped-query attention move with their key/value head) becomes blocks of the
    outer head, units inside a block in place (a subgroup of the nested symmetry, so sound);
    a head space with blocks becomes such a unit space itself."""
    roots = [s for s in range(len(T.parent)) if T.find(s) == s]
    for r in roots:
        if T.is_head[r] and T.blocks[r] is not None:
            T.within_identity[r] = True
    flat = {}
    for r in roots:
        if T.blocks[r] is None:
            continue
        (G, g), h, ident, seen = T.blocks[r], T.find(T.head[r]), T.within_identity[r], {r}
        while T.blocks[h] is not None and h not in seen:
            seen.add(h)
            G, k = T.blocks[h]
            g, ident = k * g, ident or k > 1
            h = T.find(T.head[h])
        flat[r] = ((G, g), h, ident)
    for r, (blocks, h, ident) in flat.items():
        T.blocks[r], T.head[r], T.within_identity[r] = blocks, h, ident
        T.is_head[r] = False
        if T.fixed[h] and not T.fixed[r] and ident:
            T.fix_space(r, "its blocks cannot move")


def _freeze(ctx: InferContext) -> PermutationGraph:
    T = ctx.table
    _flatten_heads(T)
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
    values = tuple((node.name, tuple(_axis_layout(T, a, order) for a in lab.axes))
                   for node, lab in ctx.labels.items() if isinstance(lab, TensorLabel))
    floating = tuple(dict.fromkeys(ctx.canonical[n] for n, t in ctx.tensors.items() if t.is_floating_point()))
    aliases = tuple((n, c) for n, c in ctx.canonical.items() if n != c)
    return PermutationGraph(
        spaces=tuple(spaces), members=tuple(members), barriers=tuple(ctx.barriers),
        in_taps=in_taps, out_taps=out_taps,
        producers=tuple((n, renum(l)) for n, l in prods),
        params=floating, aliases=aliases, gm=ctx.gm, values=values)


def _axis_layout(T, label: Any, order: dict[int, int]) -> AxisLayout:
    """A value axis in frozen terms; spaces the graph does not number (no member, tap or
    producer: nothing a merge could move) are fixed indices."""
    label = T.resolve_label(label)
    if label is None:
        return None
    if isinstance(label, (Within, Parts)):
        spaces = (label.space,) if isinstance(label, Within) else label.spaces
        roots = [T.find(s) for s in spaces]
        if not all(r in order for r in roots):
            return None
        return Structured("within" if isinstance(label, Within) else "parts", tuple(order[r] for r in roots))
    out = map_spaces(label, lambda s: Plain(order[T.find(s)]) if T.find(s) in order else Fixed(T.space_size(s)))
    return None if isinstance(out, Fixed) else out
