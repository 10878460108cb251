"""Rules for ops without weights: elementwise, reductions, shape ops, indexing, matmul."""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx

from ..ir.layout import Concat, Fixed, Kron, Plain, concat, kron, layout_size
from ..ir.trace import TensorValue, value_of
from .infer import InferContext, TensorLabel, fixed_label
from .unify import AxisLabel, Parts, Within


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _out_value(node: fx.Node) -> Any:
    return value_of(node)


def _dims(dim: Any, ndim: int) -> Optional[list[int]]:
    if dim is None:
        return None
    if isinstance(dim, int):
        return [dim % ndim] if ndim else []
    return [d % ndim for d in dim]


def _is_layout(a: AxisLabel) -> bool:
    return a is not None and not isinstance(a, (Within, Parts))


def _is_head(ctx: InferContext, a: AxisLabel) -> bool:
    return isinstance(a, Plain) and ctx.table.is_head[ctx.table.find(a.space)]


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return [a for a in out if InferContext.is_tensor(a)]


def _fallback(ctx: InferContext, node: fx.Node, reason: str):
    ctx.barrier(node, reason)
    v = _out_value(node)
    return _fixed_of(v)


def _fixed_of(v: Any):
    if isinstance(v, TensorValue):
        return fixed_label(v.ndim)
    if isinstance(v, tuple):
        return tuple(_fixed_of(x) for x in v)
    return None


def broadcast(ctx: InferContext, labels: list[TensorLabel], shapes: list[tuple[int, ...]],
              out_shape: tuple[int, ...], why: str) -> TensorLabel:
    """Rule 4: aligned axes of equal size share a permutation; size-1 axes impose nothing."""
    nd = len(out_shape)
    out: list[AxisLabel] = []
    for k in range(nd):
        cur: Any = _UNSET
        for lab, shp in zip(labels, shapes):
            off = nd - len(shp)
            if k < off:
                continue
            if shp[k - off] == 1 and out_shape[k] != 1:
                continue
            a = lab[k - off]
            cur = a if cur is _UNSET else ctx.unify(cur, a, why)
        out.append(None if cur is _UNSET else cur)
    return TensorLabel(tuple(out))


_UNSET = object()


# ---------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------
def passthrough(ctx: InferContext, node: fx.Node):
    tens = _tensor_args(node)
    out = _out_value(node)
    if len(tens) > 1:
        return binary(ctx, node)
    if not tens or not isinstance(out, TensorValue):
        return _fallback(ctx, node, "expected one tensor in and one out")
    if ctx.shape(tens[0]) != out.shape:
        return _fallback(ctx, node, "shape changed in an elementwise op")
    return ctx.tlabel(tens[0])


def binary(ctx: InferContext, node: fx.Node):
    out = _out_value(node)
    tens = _tensor_args(node)
    if not isinstance(out, TensorValue):
        return None if not tens else _fallback(ctx, node, "elementwise op without a tensor result")
    return broadcast(ctx, [ctx.tlabel(t) for t in tens], [ctx.shape(t) for t in tens], out.shape,
                     f"elementwise {node.name}")


def constant(ctx: InferContext, node: fx.Node):
    """Tensors made in forward: fixed on every axis (rule 11: they pin what they mix with)."""
    for t in _tensor_args(node):
        ctx.fix(ctx.label(t), f"argument of tensor factory {node.name}")
    return _fixed_of(_out_value(node))


def last_two_fixed(ctx: InferContext, node: fx.Node):
    lx = ctx.tlabel(node.args[0])
    for a in lx.axes[-2:]:
        ctx.table.fix_label(a, f"triangular mask {node.name}")
    return TensorLabel(lx.axes[:-2] + (None, None))


def non_tensor(ctx: InferContext, node: fx.Node):
    if isinstance(_out_value(node), TensorValue):
        return _fallback(ctx, node, "unexpected tensor result")
    return None


# ---------------------------------------------------------------------------------------
# reductions and ops along one axis
# ---------------------------------------------------------------------------------------
_NORM_LIKE = {"norm", torch.norm, torch.linalg.vector_norm}


def _reduced_dims(node: fx.Node, ndim: int) -> Optional[list[int]]:
    pos = 2 if node.target in _NORM_LIKE else 1
    d = node.kwargs.get("dim", node.kwargs.get("axis", _UNSET))
    if d is _UNSET:
        d = node.args[pos] if len(node.args) > pos and isinstance(node.args[pos], (int, tuple, list)) \
            and not isinstance(node.args[pos], bool) else None
    return _dims(d, ndim)


def _reduce_label(ctx: InferContext, lx: TensorLabel, dims: list[int], keep: bool) -> TensorLabel:
    out = []
    for i, a in enumerate(lx.axes):
        if i in dims:
            if isinstance(a, Parts):
                ctx.table.fix_label(a, "reduction over fused parts")
            if keep:
                out.append(None)
        else:
            out.append(a)
    return TensorLabel(tuple(out))


def reduction(ctx: InferContext, node: fx.Node):
    """Rule 6: reductions over a permuted axis are invariant; the axis disappears."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = _out_value(node)
    if not isinstance(out, TensorValue):
        return _fallback(ctx, node, "reduction with a non-tensor result")
    dims = _reduced_dims(node, len(shp))
    if dims is None:
        dims = list(range(len(shp)))
    keep = out.ndim == len(shp)
    return _reduce_label(ctx, lx, dims, keep)


def max_min(ctx: InferContext, node: fx.Node):
    if len(_tensor_args(node)) > 1:
        return binary(ctx, node)
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = _out_value(node)
    if isinstance(out, TensorValue) and out.ndim == 0:
        return TensorLabel(())
    if not isinstance(out, tuple):
        return _fallback(ctx, node, "max/min with an unexpected result")
    dims = _dims(arg(node, 1, "dim"), len(shp))
    keep = out[0].ndim == len(shp)
    indices_used = any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0
                       for u in node.users)
    if indices_used:  # argmax used as an index: the reduced axis must not move
        for d in dims:
            ctx.table.fix_label(lx[d], f"indices of {node.name} are used")
    lab = _reduce_label(ctx, lx, dims, keep)
    return (lab, lab)


_ALONG = {  # op -> (positional index of the dim argument, default; None = every axis)
    "cumsum": (1, None), "cumprod": (1, None), "cummax": (1, None), "cummin": (1, None), "flip": (1, None),
    "sort": (1, -1), "argsort": (1, -1), "topk": (2, -1), "kthvalue": (2, -1), "gather": (1, None),
    "index_select": (1, None), "take_along_dim": (2, None), "roll": (2, None), "argmax": (1, None),
    "argmin": (1, None), "median": (1, None), "mode": (1, -1), "scatter": (1, None),
    "scatter_add": (1, None), "index_add": (1, None), "index_fill": (1, None),
}


def along_dim(ctx: InferContext, node: fx.Node):
    """Rule 6: cumsum, sort, flip, gather, roll, argmax ... along a permuted axis pin it."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    pos, default = _ALONG[name]
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    key = "dims" if name in ("flip", "roll") else "dim"
    dims = _dims(arg(node, pos, key, default), len(shp))
    dims = list(range(len(shp))) if dims is None else dims
    for d in dims:
        ctx.table.fix_label(lx[d], f"{name} along a permuted axis ({node.name})")
    for t in _tensor_args(node)[1:]:
        ctx.fix(ctx.label(t), f"index/source tensor of {node.name}")
    lx = ctx.tlabel(x)
    out = _out_value(node)

    def shaped(v: TensorValue) -> TensorLabel:
        if v.ndim == len(shp):
            return TensorLabel(tuple(None if i in dims else a for i, a in enumerate(lx.axes)))
        if v.ndim == len(shp) - len(dims):
            return TensorLabel(tuple(a for i, a in enumerate(lx.axes) if i not in dims))
        return fixed_label(v.ndim)

    if isinstance(out, TensorValue):
        return shaped(out)
    if isinstance(out, tuple):
        return tuple(shaped(v) if isinstance(v, TensorValue) else None for v in out)
    return None


# ---------------------------------------------------------------------------------------
# shape ops
# ---------------------------------------------------------------------------------------
def _merge(ctx: InferContext, labels: list[AxisLabel], sizes: list[int]) -> tuple[bool, AxisLabel]:
    """Rule 8: several axes flattened into one. Returns (ok, label)."""
    nz = [i for i, a in enumerate(labels) if a is not None]
    if not nz:
        return True, None
    before = lambda i: math.prod(sizes[:i])  # noqa: E731
    after = lambda i: math.prod(sizes[i + 1:])  # noqa: E731
    if len(nz) == 1 and _is_layout(labels[nz[0]]) and not _is_head(ctx, labels[nz[0]]):
        p = nz[0]
        return True, kron(labels[p], before(p), after(p))
    T = ctx.table
    if len(nz) == 2 and nz[1] == nz[0] + 1:
        h, w = labels[nz[0]], labels[nz[1]]
        if isinstance(w, Within) and isinstance(h, Plain) and T.head_of(w.space) == T.find(h.space):
            return True, kron(Plain(T.find(w.space)), before(nz[0]), after(nz[1]))
    if len(nz) == 3 and nz[2] == nz[0] + 2:
        p, h, w = (labels[i] for i in nz)
        if isinstance(p, Parts) and isinstance(w, Within) and isinstance(h, Plain) \
                and T.find(w.space) == T.find(p.spaces[0]) and T.head_of(w.space) == T.find(h.space):
            return True, kron(Concat(tuple(Plain(s) for s in p.spaces)), before(nz[0]), after(nz[2]))
    return False, None


def _split(ctx: InferContext, label: AxisLabel, sizes: list[int]) -> list[AxisLabel]:
    """Rule 8: one axis viewed as several (all sizes > 1)."""
    if label is None or len(sizes) == 1:
        return [label] + [None] * (len(sizes) - 1)
    T = ctx.table
    if isinstance(label, Kron):
        m = layout_size(label.inner, T.space_size)
        for k in range(len(sizes)):
            for k2 in range(k + 1, len(sizes) + 1):
                if math.prod(sizes[:k]) == label.outer and math.prod(sizes[k2:]) == label.inner_rep \
                        and math.prod(sizes[k:k2]) == m:
                    return [None] * k + _split(ctx, label.inner, sizes[k:k2]) + [None] * (len(sizes) - k2)
        T.fix_label(label, "reshape that splits a kron layout unevenly")
        return [None] * len(sizes)
    if isinstance(label, Plain) and not T.is_head[T.find(label.space)]:
        s = T.find(label.space)
        if len(sizes) == 2 and T.set_blocks(s, sizes[0], sizes[1]):
            return [Plain(T.head_of(s)), Within(s)]
        if len(sizes) == 3 and T.blocks[s] is None:
            parts = T.split(s, [sizes[1] * sizes[2]] * sizes[0])
            if parts is not None:
                ps = [p.space for p in parts.parts]
                if all(T.set_blocks(p, sizes[1], sizes[2]) for p in ps):
                    for p in ps[1:]:
                        T.tie(ps[0], p)
                    return [Parts(tuple(ps)), Plain(T.head_of(ps[0])), Within(ps[0])]
    T.fix_label(label, "reshape that cannot be tracked")
    return [None] * len(sizes)


def reshape_label(ctx: InferContext, lx: TensorLabel, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...], why: str) -> TensorLabel:
    ins = [i for i, n in enumerate(in_shape) if n != 1]
    outs = [j for j, n in enumerate(out_shape) if n != 1]
    res: list[AxisLabel] = [None] * len(out_shape)
    i = j = 0
    A = [in_shape[k] for k in ins]
    B = [out_shape[k] for k in outs]
    if math.prod(A) != math.prod(B):
        ctx.fix(lx, "reshape with a different element count")
        return fixed_label(len(out_shape))
    while i < len(A):
        ia, ja = [i], [j]
        pa, pb = A[i], B[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ia.append(i); pa *= A[i]; i += 1  # noqa: E702
            else:
                ja.append(j); pb *= B[j]; j += 1  # noqa: E702
        labs = [lx[ins[k]] for k in ia]
        ok, merged = _merge(ctx, labs, [A[k] for k in ia])
        if not ok:
            for a in labs:
                ctx.table.fix_label(a, f"{why}: flatten of axes that cannot be tracked")
            merged = None
        for k, lab in zip(ja, _split(ctx, merged, [B[k] for k in ja])):
            res[outs[k]] = lab
    for k in range(len(in_shape)):  # size-1 axes that carry a label (size-1 spaces): pin them
        if in_shape[k] == 1 and lx[k] is not None:
            ctx.table.fix_label(lx[k], "size-1 axis dropped by a reshape")
    return TensorLabel(tuple(res))


def reshape(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    out = _out_value(node)
    if not isinstance(out, TensorValue):
        return _fallback(ctx, node, "reshape without a tensor result")
    n_fixed = len(ctx.table.conflicts), sum(ctx.table.fixed)
    res = reshape_label(ctx, ctx.tlabel(x), ctx.shape(x), out.shape, f"reshape {node.name}")
    if (len(ctx.table.conflicts), sum(ctx.table.fixed)) != n_fixed:
        ctx.note_barrier(node, "reshape that merges or interleaves several permuted axes (e.g. channel shuffle)")
    return res


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def permute(ctx: InferContext, node: fx.Node):
    """Axis permutations, found by replaying the op on a meta tensor with prime sizes."""
    x = node.args[0]
    lx = ctx.tlabel(x)
    nd = len(lx)
    probe = torch.empty(_PRIMES[:nd], device="meta")
    rest = tuple(a for a in node.args[1:])
    fn = getattr(torch.Tensor, node.target) if isinstance(node.target, str) else node.target
    try:
        shape = tuple(fn(probe, *rest, **node.kwargs).shape)
    except Exception:
        return _fallback(ctx, node, "could not replay the axis permutation")
    order = [_PRIMES.index(n) for n in shape]
    return TensorLabel(tuple(lx[k] for k in order))


def expand(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = _out_value(node).shape
    off = len(out) - len(shp)
    res = [None] * off
    for k, n in enumerate(shp):
        if n == 1 and out[off + k] != 1:
            ctx.table.fix_label(lx[k], "expanded size-1 axis")
            res.append(None)
        else:
            res.append(lx[k])
    return TensorLabel(tuple(res))


def repeat(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = _out_value(node).shape
    off = len(out) - len(shp)
    res: list[AxisLabel] = [None] * off
    for k, n in enumerate(shp):
        r = out[off + k] // n
        a = lx[k]
        if r == 1:
            res.append(a)
        elif _is_layout(a) and not _is_head(ctx, a):
            res.append(kron(a, r, 1))
        else:
            ctx.table.fix_label(a, "repeat of a structured axis")
            res.append(None)
    return TensorLabel(tuple(res))


def cat(ctx: InferContext, node: fx.Node):
    """Rule 7: cat along an axis gives a concat layout; the other axes unify."""
    tensors = [t for t in arg(node, 0, "tensors")]
    if not all(isinstance(t, fx.Node) for t in tensors):
        return _fallback(ctx, node, "cat of non-node values")
    out = _out_value(node)
    dim = arg(node, 1, "dim", 0) % out.ndim
    parts = []
    labels = [ctx.tlabel(t) for t in tensors]
    shapes = [ctx.shape(t) for t in tensors]
    for lab, shp in zip(labels, shapes):
        a = lab[dim]
        if _is_layout(a) and not _is_head(ctx, a):
            parts.append(a)
        else:
            ctx.table.fix_label(a, "cat along a structured axis")
            parts.append(Fixed(shp[dim]))
    res = []
    for k in range(out.ndim):
        if k == dim:
            c = concat(parts)
            res.append(None if isinstance(c, Fixed) else c)
        else:
            cur = labels[0][k]
            for lab in labels[1:]:
                cur = ctx.unify(cur, lab[k], f"cat {node.name}")
            res.append(cur)
    return TensorLabel(tuple(res))


def stack(ctx: InferContext, node: fx.Node):
    tensors = list(arg(node, 0, "tensors"))
    out = _out_value(node)
    dim = arg(node, 1, "dim", 0) % out.ndim
    labels = [ctx.tlabel(t) for t in tensors]
    res = []
    for k in range(len(labels[0])):
        cur = labels[0][k]
        for lab in labels[1:]:
            cur = ctx.unify(cur, lab[k], f"stack {node.name}")
        res.append(cur)
    res.insert(dim, None)
    return TensorLabel(tuple(res))


def _substitute_part(ctx: InferContext, lab: TensorLabel, parts: Parts, t: int) -> list[AxisLabel]:
    T = ctx.table
    first = T.find(parts.spaces[0])
    return [Within(T.find(parts.spaces[t])) if isinstance(a, Within) and T.find(a.space) == first else a
            for a in lab.axes]


def _index_axis(ctx: InferContext, lab: TensorLabel, axis: int, t: int, why: str) -> list[AxisLabel]:
    """Labels after selecting index ``t`` of ``axis`` (the axis is removed)."""
    a = lab[axis]
    axes = list(lab.axes)
    if isinstance(a, Parts):
        axes = _substitute_part(ctx, lab, a, t)
    elif a is not None:
        ctx.table.fix_label(a, why)
    del axes[axis]
    return axes


def split(ctx: InferContext, node: fx.Node):
    """Rule 7: split / chunk / unbind refine the upstream space into aligned parts."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = _out_value(node)
    if not isinstance(out, tuple) or not all(isinstance(v, TensorValue) for v in out):
        return _fallback(ctx, node, "split without tensor pieces")
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = arg(node, 1, "dim", 0) if name == "unbind" else arg(node, 2, "dim", 0)
    dim %= len(shp)
    if name == "unbind":
        return tuple(TensorLabel(tuple(_index_axis(ctx, lx, dim, t, f"unbind {node.name}"))) for t in range(len(out)))
    sizes = [v.shape[dim] for v in out]
    a = lx[dim]
    pieces: list[AxisLabel]
    if a is None:
        pieces = [None] * len(sizes)
    elif _is_layout(a) and not _is_head(ctx, a):
        cuts = [sum(sizes[:k + 1]) for k in range(len(sizes))]
        refined = ctx.table.refine(a, cuts)
        if refined is None:
            ctx.table.fix_label(a, f"split {node.name} cannot be aligned")
            pieces = [None] * len(sizes)
        else:
            pieces = [None if isinstance(p, Fixed) else p for p in refined]
    else:
        ctx.table.fix_label(a, f"split {node.name} of a structured axis")
        pieces = [None] * len(sizes)
    return tuple(lx.replace(dim, p) for p in pieces)


def _slice_label(ctx: InferContext, a: AxisLabel, n: int, sl: slice, why: str) -> AxisLabel:
    start, stop, step = sl.start, sl.stop, sl.step
    if not all(v is None or isinstance(v, int) for v in (start, stop, step)):
        ctx.table.fix_label(a, why)
        return None
    start, stop, step = slice(start, stop, step).indices(n)
    if (start, stop, step) == (0, n, 1) or a is None:
        return a
    if step != 1 or not _is_layout(a) or _is_head(ctx, a):
        ctx.table.fix_label(a, why)
        return None
    stop = max(stop, start)
    cuts = [c for c in (start, stop, n) if c > 0]
    refined = ctx.table.refine(a, cuts)
    if refined is None:
        ctx.table.fix_label(a, why)
        return None
    piece = refined[cuts.index(stop)] if stop > 0 else None
    return None if piece is None or isinstance(piece, Fixed) else piece


def getitem(ctx: InferContext, node: fx.Node):
    src, idx = node.args[0], node.args[1]
    v = value_of(src) if isinstance(src, fx.Node) else None
    if not isinstance(v, TensorValue):
        lab = ctx.label(src)
        if isinstance(lab, (tuple, dict)) and not isinstance(idx, fx.Node):
            try:
                return lab[idx]
            except (IndexError, KeyError, TypeError):
                pass
        return None if not isinstance(_out_value(node), TensorValue) else _fallback(ctx, node, "unknown container")
    lx = ctx.tlabel(src)
    shp = v.shape
    out = _out_value(node)
    why = f"indexing {node.name}"
    items = list(idx) if isinstance(idx, tuple) else [idx]
    tensor_items = [it for it in items if isinstance(it, fx.Node) or isinstance(it, (list, torch.Tensor))]
    if len(tensor_items) > 1 or any(isinstance(it, fx.Node) and value_of(it).dtype == torch.bool
                                    for it in tensor_items if isinstance(it, fx.Node)):
        ctx.fix(lx, why)
        for it in tensor_items:
            if isinstance(it, fx.Node):
                ctx.fix(ctx.label(it), why)
        return fixed_label(out.ndim)
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (len(shp) - consuming) + items[e + 1:]
    items += [slice(None)] * (len(shp) - sum(1 for it in items if it is not None))
    res: list[AxisLabel] = []
    axis = 0
    cur = list(lx.axes)
    for it in items:
        if it is None:
            res.append(None)
            continue
        a = cur[axis]
        if isinstance(it, int):
            if isinstance(a, Parts):  # picking part t: the other axes now speak of part t
                cur = _substitute_part(ctx, TensorLabel(tuple(cur)), a, it % shp[axis])
                res = [_sub_one(ctx, r, a, it % shp[axis]) for r in res]
            elif a is not None:
                ctx.table.fix_label(a, why)
        elif isinstance(it, slice):
            res.append(_slice_label(ctx, a, shp[axis], it, why))
        else:  # one advanced index: its own axes replace the indexed one
            ctx.table.fix_label(a, why)
            if isinstance(it, fx.Node):
                res.extend(ctx.tlabel(it).axes)
            else:
                res.extend([None] * torch.as_tensor(it).ndim)
        axis += 1
    if len(res) != out.ndim:
        return _fallback(ctx, node, "indexing pattern not understood")
    return TensorLabel(tuple(res))


def _sub_one(ctx: InferContext, a: AxisLabel, parts: Parts, t: int) -> AxisLabel:
    T = ctx.table
    if isinstance(a, Within) and T.find(a.space) == T.find(parts.spaces[0]):
        return Within(T.find(parts.spaces[t]))
    return a


def getattr_rule(ctx: InferContext, node: fx.Node):
    src, name = node.args[0], node.args[1]
    if name in ("T", "mT") and ctx.is_tensor(src):
        lx = ctx.tlabel(src)
        return TensorLabel(tuple(reversed(lx.axes))) if name == "T" else TensorLabel(lx.axes[:-2] + (lx[-1], lx[-2]))
    if isinstance(_out_value(node), TensorValue):
        return _fallback(ctx, node, f"attribute {name!r} of a tensor")
    return None


def pad(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    lx = ctx.tlabel(x)
    p = list(arg(node, 1, "pad"))
    res = list(lx.axes)
    for k in range(len(p) // 2):
        ax = len(res) - 1 - k
        if p[2 * k] or p[2 * k + 1]:
            ctx.table.fix_label(res[ax], "padding a permuted axis")
            res[ax] = None
    return TensorLabel(tuple(res))


def spatial(k: Optional[int]):
    """Pooling / resizing / padding modules over the trailing ``k`` axes (None: all but 2)."""
    def rule(ctx: InferContext, node: fx.Node):
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        lx = ctx.tlabel(x)
        out = _out_value(node)
        if not isinstance(out, TensorValue) or out.ndim != len(lx):
            return _fallback(ctx, node, "pooling with an unexpected result")
        n = len(lx) - 2 if k is None else k
        lead = len(lx) - n
        for a in lx.axes[lead:]:
            ctx.table.fix_label(a, f"pooled/resized axis at {node.name}")
        return TensorLabel(tuple(lx.axes[:lead]) + (None,) * n)
    return rule


# ---------------------------------------------------------------------------------------
# contractions
# ---------------------------------------------------------------------------------------
def _head_pos(ctx: InferContext, lab: TensorLabel, s: int) -> Optional[int]:
    """Position (counted from the right) of the head axis of blocked space ``s`` in ``lab``."""
    h = ctx.table.head_of(s)
    for k, a in enumerate(lab.axes):
        if isinstance(a, Plain) and h is not None and ctx.table.find(a.space) == h:
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
                    ctx.table.identity_within(c.space)
    ctx.unify(ca, cb, why)
    batch_shape = _broadcast_shapes(sa[:-2], sb[:-2])
    batch = broadcast(ctx, [TensorLabel(la.axes[:-2]), TensorLabel(lb.axes[:-2])],
                      [tuple(sa[:-2]), tuple(sb[:-2])], batch_shape, why)
    la, lb = TensorLabel(tuple(ctx.table.resolve_label(a) for a in la.axes)), \
        TensorLabel(tuple(ctx.table.resolve_label(a) for a in lb.axes))
    axes = list(batch.axes) + ([la[-2]] if da > 1 else []) + ([lb[-1]] if db > 1 else [])
    return TensorLabel(tuple(axes))


def matmul(ctx: InferContext, node: fx.Node):
    a, b = node.args[0], node.args[1]
    la, lb = ctx.tlabel(a), ctx.tlabel(b)
    sa, sb = ctx.shape(a), ctx.shape(b)
    res = matmul_labels(ctx, la, sa, lb, sb, f"contraction {node.name}")
    _mark_weight_operands(ctx, node, a, b, len(sa), len(sb), res)
    return res


def _mark_weight_operands(ctx, node, a, b, da, db, res: TensorLabel) -> None:
    ua, ub = ctx.use_of(a), ctx.use_of(b)
    if ub is not None and db >= 2:  # x @ W: W[k, m] consumes x's units and produces m units
        ub.mark_in(db - 2)
        ctx.tap(a, da - 1, ctx.tlabel(a)[-1])
        ctx.producer(node, res[-1], value_of(node).shape[-1])
        ctx.tap(node, len(res) - 1, res[-1], out=True)
    if ua is not None and da >= 1:
        ua.mark_in(da - 1)


def addmm(ctx: InferContext, node: fx.Node):
    bias, a, b = node.args[0], node.args[1], node.args[2]
    sa, sb = ctx.shape(a), ctx.shape(b)
    res = matmul_labels(ctx, ctx.tlabel(a), sa, ctx.tlabel(b), sb, f"contraction {node.name}")
    _mark_weight_operands(ctx, node, a, b, len(sa), len(sb), res)
    out = _out_value(node).shape
    return broadcast(ctx, [res, ctx.tlabel(bias)], [out, ctx.shape(bias)], out, f"bias of {node.name}")


def sdpa(ctx: InferContext, node: fx.Node):
    q, k, v = node.args[0], node.args[1], node.args[2]
    if node.kwargs.get("enable_gqa"):
        return _fallback(ctx, node, "grouped-query attention is not modelled")
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
        return _fallback(ctx, node, "einsum equation not understood")
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
            a = ctx.table.resolve_label(a)
            if isinstance(a, Within):
                h = ctx.table.head_of(a.space)
                heads = set()
                for t2, lab2 in zip(specs, labs):
                    if c in t2:
                        hl = [c2 for c2, a2 in zip(t2, lab2.axes) if isinstance(ctx.table.resolve_label(a2), Plain)
                              and h is not None and ctx.table.find(ctx.table.resolve_label(a2).space) == h]
                        heads.add(hl[0] if hl else None)
                if len(heads) != 1 or None in heads:
                    ctx.table.identity_within(a.space)
    for t, o in zip(specs, ops):
        use = ctx.use_of(o)
        if use is not None:
            for k, c in enumerate(t):
                if c not in rhs:
                    use.mark_in(k)
    return TensorLabel(tuple(ctx.table.resolve_label(merged.get(c)) for c in rhs))
