"""Rules for contractions: matmul / bmm / @, addmm, scaled dot-product attention, einsum."""
from __future__ import annotations

import re
from typing import Any, Optional

import torch.fx as fx

from ..ir.layout import Plain
from ..ir.values import value_of
from .context import AxisLabel, InferContext, TensorLabel, Within
from .common import arg, broadcast, fallback, out_value
from .layers import _operand


# ---------------------------------------------------------------------------------------
# contractions
# ---------------------------------------------------------------------------------------
def _head_pos(ctx: InferContext, lab: TensorLabel, s: int) -> Optional[int]:
    """Position (counted from the right) of the head axis of blocked space ``s`` in ``lab``."""
    h = ctx.head_of(s)
    for k, a in enumerate(lab.axes):
        if isinstance(a, Plain) and h is not None and ctx.find(a.space) == h:
            return len(lab) - k
    return None


def _broadcast_shapes(*shapes) -> tuple[int, ...]:
    """numpy broadcasting of static shapes (torch.broadcast_shapes imports sympy: ~0.5 s)."""
    out: list[int] = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s)) + tuple(s)) for s in shapes)):
        sizes = {int(d) for d in dims} - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def matmul_labels(ctx: InferContext, la: TensorLabel, sa: tuple, lb: TensorLabel, sb: tuple,
                  why: str) -> TensorLabel:
    """Rule 5: a[..., n, k] @ b[..., k, m]; the contracted axes share one space."""
    da, db = len(la), len(lb)
    if da == 1:
        la, sa = TensorLabel((None,) + la.axes), (1,) + tuple(sa)
    if db == 1:
        lb, sb = TensorLabel(lb.axes + (None,)), tuple(sb) + (1,)
    ca, cb = la[-1], lb[-2]
    if isinstance(ca, Within) or isinstance(cb, Within):
        # a per-head contraction needs the head axes aligned as batch axes of both operands
        pa = _head_pos(ctx, la, ca.space) if isinstance(ca, Within) else None
        pb = _head_pos(ctx, lb, cb.space) if isinstance(cb, Within) else None
        if pa is None or pb is None or pa != pb or pa <= 2:
            for c in (ca, cb):
                if isinstance(c, Within):
                    ctx.identity_within(c.space)
    ctx.unify(ca, cb, why)
    batch_shape = _broadcast_shapes(sa[:-2], sb[:-2])
    batch = broadcast(ctx, [TensorLabel(la.axes[:-2]), TensorLabel(lb.axes[:-2])],
                      [tuple(sa[:-2]), tuple(sb[:-2])], batch_shape, why)
    la, lb = TensorLabel(tuple(ctx.resolve(a) for a in la.axes)), \
        TensorLabel(tuple(ctx.resolve(a) for a in lb.axes))
    axes = list(batch.axes) + ([la[-2]] if da > 1 else []) + ([lb[-1]] if db > 1 else [])
    return TensorLabel(tuple(axes))


def matmul(ctx: InferContext, node: fx.Node):
    a, b = node.args[0], node.args[1]
    la, lb = ctx.tlabel(a), ctx.tlabel(b)
    sa, sb = ctx.shape(a), ctx.shape(b)
    res = matmul_labels(ctx, la, sa, lb, sb, f"contraction {node.name}")
    _mark_weight_operands(ctx, node, a, b, len(sa), len(sb), res)
    return res


def _mark_in(ctx: InferContext, operand: Any, axis: int) -> None:
    """A contracted axis of a weight operand consumes units: its parameter's axis, or the axes of
    the parameters a computed weight (``w.t()``, ``w * g``) is made from, are marked `in` (else a
    zip cluster would be averaged there, not summed as an input)."""
    op = _operand(ctx, operand)
    if op is not None:
        op.mark_in(ctx, axis)


def _mark_weight_operands(ctx, node, a, b, da, db, res: TensorLabel) -> None:
    if db >= 2:  # x @ W: W[k, m] consumes x's units and produces m units
        _mark_in(ctx, b, db - 2)
        if ctx.use_of(b) is not None:
            ctx.tap(a, da - 1, ctx.tlabel(a)[-1])
            ctx.producer(node, res[-1], value_of(node).shape[-1])
            ctx.tap(node, len(res) - 1, res[-1], out=True)
    if da >= 1:
        _mark_in(ctx, a, da - 1)


def addmm(ctx: InferContext, node: fx.Node):
    bias, a, b = node.args[0], node.args[1], node.args[2]
    sa, sb = ctx.shape(a), ctx.shape(b)
    res = matmul_labels(ctx, ctx.tlabel(a), sa, ctx.tlabel(b), sb, f"contraction {node.name}")
    _mark_weight_operands(ctx, node, a, b, len(sa), len(sb), res)
    out = out_value(node).shape
    return broadcast(ctx, [res, ctx.tlabel(bias)], [out, ctx.shape(bias)], out, f"bias of {node.name}")


def sdpa(ctx: InferContext, node: fx.Node):
    q, k, v = node.args[0], node.args[1], node.args[2]
    if node.kwargs.get("enable_gqa"):
        return fallback(ctx, node, "grouped-query attention is not modelled")
    lq, lk, lv = ctx.tlabel(q), ctx.tlabel(k), ctx.tlabel(v)
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    why = f"attention {node.name}"
    lkt = TensorLabel(lk.axes[:-2] + (lk[-1], lk[-2]))
    skt = tuple(sk[:-2]) + (sk[-1], sk[-2])
    scores = matmul_labels(ctx, lq, sq, lkt, skt, why)
    s_shape = _broadcast_shapes(sq[:-2], sk[:-2]) + (sq[-2], sk[-2])
    mask = arg(node, 3, "attn_mask")
    if ctx.is_tensor(mask):
        scores = broadcast(ctx, [scores, ctx.tlabel(mask)], [s_shape, ctx.shape(mask)], s_shape, why)
    return matmul_labels(ctx, scores, s_shape, lv, sv, why)


_EINSUM_TERM = re.compile(r"^[a-zA-Z.]*$")


def einsum(ctx: InferContext, node: fx.Node):
    eq = node.args[0].replace(" ", "")
    ops = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    if "->" in eq:
        lhs, rhs = eq.split("->")
    else:
        lhs = eq
        letters = [c for c in lhs if c.isalpha()]
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    if len(terms) != len(ops) or not all(_EINSUM_TERM.match(t) for t in terms + [rhs]):
        return fallback(ctx, node, "einsum equation not understood")
    spare = iter("ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠ")
    ell = None
    labs, shapes, specs = [], [], []
    for t, o in zip(terms, ops):
        lab, shp = ctx.tlabel(o), ctx.shape(o)
        if "..." in t:
            n_ell = len(shp) - (len(t) - 3)
            if ell is None or len(ell) < n_ell:
                ell = "".join(next(spare) for _ in range(n_ell)) if ell is None else ell
            t = t.replace("...", ell[len(ell) - n_ell:])
        specs.append(t)
        labs.append(lab)
        shapes.append(shp)
    if "..." in rhs:
        rhs = rhs.replace("...", ell or "")
    merged: dict[str, AxisLabel] = {}
    why = f"einsum {node.name}"
    for t, lab, shp in zip(specs, labs, shapes):
        for c, a, n in zip(t, lab.axes, shp):
            if n == 1 and any(c in t2 and s2[t2.index(c)] != 1 for t2, s2 in zip(specs, shapes)):
                continue
            merged[c] = ctx.unify(merged[c], a, why) if c in merged else a
    # a per-head contraction needs the same head letter in every operand that holds it
    for t, lab in zip(specs, labs):
        for c, a in zip(t, lab.axes):
            a = ctx.resolve(a)
            if isinstance(a, Within):
                h = ctx.head_of(a.space)
                heads = set()
                for t2, lab2 in zip(specs, labs):
                    if c in t2:
                        hl = [c2 for c2, a2 in zip(t2, lab2.axes) if isinstance(ctx.resolve(a2), Plain)
                              and h is not None and ctx.find(ctx.resolve(a2).space) == h]
                        heads.add(hl[0] if hl else None)
                if len(heads) != 1 or None in heads:
                    ctx.identity_within(a.space)
    for c, a in merged.items():
        if c not in rhs:  # summed out: invariant (a contraction between operands was unified above)
            ctx.invariant(a)
    for t, o in zip(specs, ops):
        for k, c in enumerate(t):
            if c not in rhs:
                _mark_in(ctx, o, k)
    return TensorLabel(tuple(ctx.resolve(merged.get(c)) for c in rhs))
