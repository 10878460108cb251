"""Rules for shape ops and indexing: reshape/view/flatten, permute, expand, repeat, cat, stack,
split/chunk/unbind, getitem, pad, pooling and resizing."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from ..ir.layout import Concat, Fixed, Kron, Plain, concat, kron, layout_size
from ..ir.values import TensorValue, value_of
from .context import AxisLabel, InferContext, Parts, TensorLabel, Within, fixed_label
from .common import arg, fallback, is_head, is_layout, metadata_only, out_value, tensor_args


# ---------------------------------------------------------------------------------------
# shape ops
# ---------------------------------------------------------------------------------------
def _merge(ctx: InferContext, labels: list[AxisLabel], sizes: list[int]) -> tuple[bool, AxisLabel]:
    """Rule 8: several axes flattened into one. Returns (ok, label)."""
    nz = [i for i, a in enumerate(labels) if a is not None]
    if not nz:
        return True, None
    if len(labels) == 1:  # nothing is flattened (size-1 axes dropped): the axis keeps its label
        return True, labels[0]
    before = lambda i: math.prod(sizes[:i])  # noqa: E731
    after = lambda i: math.prod(sizes[i + 1:])  # noqa: E731
    if len(nz) == 1 and is_layout(labels[nz[0]]) and not is_head(ctx, labels[nz[0]]):
        p = nz[0]
        return True, kron(labels[p], before(p), after(p))
    if len(nz) == 1 and is_head(ctx, labels[nz[0]]):
        # a head axis flattened with the fixed axes after it ([H, d] with d pinned, or heads
        # repeated for grouped-query attention): a fresh space of H blocks that move with the
        # heads, units inside a block in place
        p = nz[0]
        o = ctx.new_space(sizes[p] * after(p))
        ctx.set_blocks(o, sizes[p], after(p))
        ctx.unify(Plain(ctx.head_of(o)), labels[p], "flattened head axis")
        ctx.identity_within(o)
        return True, kron(Plain(ctx.find(o)), before(p), 1)
    if len(nz) == 2 and nz[1] == nz[0] + 1:
        h, w = labels[nz[0]], labels[nz[1]]
        if isinstance(w, Within) and isinstance(h, Plain) and ctx.head_of(w.space) == ctx.find(h.space):
            ctx.invariant(h)  # the head axis is accounted for: it becomes the blocks of w's space
            return True, kron(Plain(ctx.find(w.space)), before(nz[0]), after(nz[1]))
    if len(nz) == 3 and nz[2] == nz[0] + 2:
        p, h, w = (labels[i] for i in nz)
        if isinstance(p, Parts) and isinstance(w, Within) and isinstance(h, Plain) \
                and ctx.find(w.space) == ctx.find(p.spaces[0]) and ctx.head_of(w.space) == ctx.find(h.space):
            ctx.invariant(h)
            return True, kron(Concat(tuple(Plain(s) for s in p.spaces)), before(nz[0]), after(nz[2]))
    return False, None


def _split(ctx: InferContext, label: AxisLabel, sizes: list[int]) -> list[AxisLabel]:
    """Rule 8: one axis viewed as several (all sizes > 1)."""
    if label is None or len(sizes) == 1:
        return [label] + [None] * (len(sizes) - 1)
    if isinstance(label, Kron):
        m = layout_size(label.inner, ctx.space_size)
        for k in range(len(sizes)):
            for k2 in range(k + 1, len(sizes) + 1):
                if math.prod(sizes[:k]) == label.outer and math.prod(sizes[k2:]) == label.inner_rep \
                        and math.prod(sizes[k:k2]) == m:
                    return [None] * k + _split(ctx, label.inner, sizes[k:k2]) + [None] * (len(sizes) - k2)
        ctx.fix(label, "reshape that splits a kron layout unevenly")
        return [None] * len(sizes)
    if isinstance(label, Plain) and not ctx.is_head_space(label.space):
        s = ctx.find(label.space)
        if len(sizes) == 2 and ctx.set_blocks(s, sizes[0], sizes[1]):
            return [Plain(ctx.head_of(s)), Within(s)]
        if len(sizes) == 3 and ctx.blocks_of(s) is None:
            parts = ctx.split_space(s, [sizes[1] * sizes[2]] * sizes[0])
            if parts is not None:
                ps = [p.space for p in parts.parts]
                if all(ctx.set_blocks(p, sizes[1], sizes[2]) for p in ps):
                    for p in ps[1:]:
                        ctx.tie(ps[0], p)
                    return [Parts(tuple(ps)), Plain(ctx.head_of(ps[0])), Within(ps[0])]
    ctx.fix(label, "reshape that cannot be tracked")
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
                ctx.fix(a, f"{why}: flatten of axes that cannot be tracked")
            merged = None
        for k, lab in zip(ja, _split(ctx, merged, [B[k] for k in ja])):
            res[outs[k]] = lab
    for k in range(len(in_shape)):  # size-1 axes that carry a label (size-1 spaces): pin them
        if in_shape[k] == 1 and lx[k] is not None:
            ctx.fix(lx[k], "size-1 axis dropped by a reshape")
    return TensorLabel(tuple(res))


def reshape(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    out = out_value(node)
    if not isinstance(out, TensorValue):
        return fallback(ctx, node, "reshape without a tensor result")
    metadata_only(ctx, node)  # view_as / reshape_as(other): other's shape only
    n_fixed = ctx.fix_events()
    res = reshape_label(ctx, ctx.tlabel(x), ctx.shape(x), out.shape, f"reshape {node.name}")
    if ctx.fix_events() != n_fixed:
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
        return fallback(ctx, node, "could not replay the axis permutation")
    order = [_PRIMES.index(n) for n in shape]
    return TensorLabel(tuple(lx[k] for k in order))


def expand(ctx: InferContext, node: fx.Node):
    metadata_only(ctx, node)  # expand_as(other): other's shape only
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = out_value(node).shape
    off = len(out) - len(shp)
    res: list[AxisLabel] = [None] * off
    for k, n in enumerate(shp):
        if n == 1 and out[off + k] != 1:
            ctx.fix(lx[k], "expanded size-1 axis")
            res.append(_expanded_within(ctx, res[-1] if res else None, out[off + k]))
        else:
            res.append(lx[k])
    return TensorLabel(tuple(res))


def _expanded_within(ctx: InferContext, prev: AxisLabel, n: int) -> AxisLabel:
    """An axis expanded from size 1 repeats one value, so every permutation of it is
    consistent. Right after a head axis of G blocks (a per-group statistic expanded over its
    group, as group-std norms do) it is labelled as the within-block axis of a fresh blocked
    space on that head, so that reshaping (G, n) back into one axis gives a channel space that
    can meet the normalised tensor's own. Elsewhere it stays fixed."""
    if not is_head(ctx, prev):
        return None
    G = ctx.space_size(prev.space)
    s = ctx.new_space(G * n)
    if not ctx.set_blocks(s, G, n):
        return None
    ctx.unify(Plain(ctx.head_of(s)), prev, "group statistic expanded over its group")
    return Within(s)


def repeat(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = out_value(node).shape
    off = len(out) - len(shp)
    res: list[AxisLabel] = [None] * off
    for k, n in enumerate(shp):
        r = out[off + k] // n
        a = lx[k]
        if r == 1:
            res.append(a)
        elif is_layout(a) and not is_head(ctx, a):
            res.append(kron(a, r, 1))
        else:
            ctx.fix(a, "repeat of a structured axis")
            res.append(None)
    return TensorLabel(tuple(res))


def repeat_interleave(ctx: InferContext, node: fx.Node):
    """``repeat_interleave(x, r, dim)`` with an int ``r``: index i*r + j of ``dim`` is index i
    of x (a kron layout, like ``repeat`` with the copies inside). Tensor repeats, or no dim
    (a flattened result), fix what they touch."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    out = out_value(node)
    if not isinstance(reps, int) or dim is None or not isinstance(out, TensorValue) or out.ndim != len(shp):
        ctx.fix(lx, f"repeat_interleave {node.name}")
        for t in tensor_args(node)[1:]:
            ctx.fix(ctx.label(t), f"repeats of {node.name}")
        return fixed_label(out.ndim) if isinstance(out, TensorValue) else None
    dim %= len(shp)
    a = lx[dim]
    if reps != 1 and a is not None:
        if is_layout(a) and not is_head(ctx, a):
            a = kron(a, 1, reps)
        else:
            ctx.fix(a, f"repeat_interleave of a structured axis {node.name}")
            a = None
    return lx.replace(dim, a)


def cat(ctx: InferContext, node: fx.Node):
    """Rule 7: cat along an axis gives a concat layout; the other axes unify."""
    tensors = [t for t in arg(node, 0, "tensors")]
    if not all(isinstance(t, fx.Node) for t in tensors):
        return fallback(ctx, node, "cat of non-node values")
    out = out_value(node)
    dim = arg(node, 1, "dim", 0) % out.ndim
    parts = []
    labels = [ctx.tlabel(t) for t in tensors]
    shapes = [ctx.shape(t) for t in tensors]
    for lab, shp in zip(labels, shapes):
        a = lab[dim]
        if is_layout(a) and not is_head(ctx, a):
            parts.append(a)
        else:
            ctx.fix(a, "cat along a structured axis")
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
    out = out_value(node)
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
    ctx.invariant(parts)  # selecting part t of a fused axis accounts for the whole axis
    first = ctx.find(parts.spaces[0])
    return [Within(ctx.find(parts.spaces[t])) if isinstance(a, Within) and ctx.find(a.space) == first else a
            for a in lab.axes]


def _index_axis(ctx: InferContext, lab: TensorLabel, axis: int, t: int, why: str) -> list[AxisLabel]:
    """Labels after selecting index ``t`` of ``axis`` (the axis is removed)."""
    a = lab[axis]
    axes = list(lab.axes)
    if isinstance(a, Parts):
        axes = _substitute_part(ctx, lab, a, t)
    elif a is not None:
        ctx.fix(a, why)
    del axes[axis]
    return axes


def unbind(ctx: InferContext, node: fx.Node):
    """unbind along an axis: every piece is one index of it (a fused-parts axis gives parts)."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = out_value(node)
    if not isinstance(out, tuple) or not all(isinstance(v, TensorValue) for v in out):
        return fallback(ctx, node, "unbind without tensor pieces")
    dim = arg(node, 1, "dim", 0) % len(shp)
    return tuple(TensorLabel(tuple(_index_axis(ctx, lx, dim, t, f"unbind {node.name}"))) for t in range(len(out)))


def split(ctx: InferContext, node: fx.Node):
    """Rule 7: split / chunk / tensor_split refine the upstream space into aligned parts."""
    x = node.args[0]
    lx, shp = ctx.tlabel(x), ctx.shape(x)
    out = out_value(node)
    if not isinstance(out, tuple) or not all(isinstance(v, TensorValue) for v in out):
        return fallback(ctx, node, "split without tensor pieces")
    dim = arg(node, 2, "dim", 0) % len(shp)
    sizes = [v.shape[dim] for v in out]
    a = lx[dim]
    pieces: list[AxisLabel]
    if a is None:
        pieces = [None] * len(sizes)
    elif is_layout(a) and not is_head(ctx, a):
        cuts = [sum(sizes[:k + 1]) for k in range(len(sizes))]
        refined = ctx.refine(a, cuts)
        if refined is None:
            ctx.fix(a, f"split {node.name} cannot be aligned")
            pieces = [None] * len(sizes)
        else:
            pieces = [None if isinstance(p, Fixed) else p for p in refined]
    else:
        ctx.fix(a, f"split {node.name} of a structured axis")
        pieces = [None] * len(sizes)
    return tuple(lx.replace(dim, p) for p in pieces)


def _slice_label(ctx: InferContext, a: AxisLabel, n: int, sl: slice, why: str) -> AxisLabel:
    start, stop, step = sl.start, sl.stop, sl.step
    if not all(v is None or isinstance(v, int) for v in (start, stop, step)):
        ctx.fix(a, why)
        return None
    start, stop, step = slice(start, stop, step).indices(n)
    if (start, stop, step) == (0, n, 1) or a is None:
        return a
    if isinstance(a, Within):  # some within-block units of every block: blocks move, units stay
        ctx.identity_within(a.space)
        return None
    if step != 1 or not is_layout(a) or is_head(ctx, a):
        ctx.fix(a, why)
        return None
    stop = max(stop, start)
    cuts = [c for c in (start, stop, n) if c > 0]
    refined = ctx.refine(a, cuts)
    if refined is None:
        ctx.fix(a, why)
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
        return None if not isinstance(out_value(node), TensorValue) else fallback(ctx, node, "unknown container")
    lx = ctx.tlabel(src)
    shp = v.shape
    out = out_value(node)
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
            elif isinstance(a, Within):  # one within-block unit of every block
                ctx.identity_within(a.space)
            elif a is not None:
                ctx.fix(a, why)
        elif isinstance(it, slice):
            res.append(_slice_label(ctx, a, shp[axis], it, why))
        else:  # one advanced index: its own axes replace the indexed one
            ctx.fix(a, why)
            if isinstance(it, fx.Node):
                res.extend(ctx.tlabel(it).axes)
            else:
                res.extend([None] * torch.as_tensor(it).ndim)
        axis += 1
    if len(res) != out.ndim:
        return fallback(ctx, node, "indexing pattern not understood")
    return TensorLabel(tuple(res))


def _sub_one(ctx: InferContext, a: AxisLabel, parts: Parts, t: int) -> AxisLabel:
    if isinstance(a, Within) and ctx.find(a.space) == ctx.find(parts.spaces[0]):
        return Within(ctx.find(parts.spaces[t]))
    return a


def getattr_rule(ctx: InferContext, node: fx.Node):
    src, name = node.args[0], node.args[1]
    if name in ("T", "mT") and ctx.is_tensor(src):
        lx = ctx.tlabel(src)
        return TensorLabel(tuple(reversed(lx.axes))) if name == "T" else TensorLabel(lx.axes[:-2] + (lx[-1], lx[-2]))
    if isinstance(out_value(node), TensorValue):
        return fallback(ctx, node, f"attribute {name!r} of a tensor")
    if ctx.is_tensor(src):  # shape, dtype, device, ...: metadata does not see permutations
        for a in ctx.tlabel(src).axes:
            ctx.invariant(a)
    return None


def pad(ctx: InferContext, node: fx.Node):
    x = node.args[0]
    lx = ctx.tlabel(x)
    p = list(arg(node, 1, "pad"))
    res = list(lx.axes)
    for k in range(len(p) // 2):
        ax = len(res) - 1 - k
        if p[2 * k] or p[2 * k + 1]:
            ctx.fix(res[ax], "padding a permuted axis")
            res[ax] = None
    return TensorLabel(tuple(res))


def spatial(k: Optional[int]):
    """Pooling / resizing / padding modules over the trailing ``k`` axes (None: all but 2)."""
    def rule(ctx: InferContext, node: fx.Node):
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        lx = ctx.tlabel(x)
        out = out_value(node)
        if not isinstance(out, TensorValue) or out.ndim != len(lx):
            return fallback(ctx, node, "pooling with an unexpected result")
        n = len(lx) - 2 if k is None else k
        lead = len(lx) - n
        for a in lx.axes[lead:]:
            ctx.fix(a, f"pooled/resized axis at {node.name}")
        return TensorLabel(tuple(lx.axes[:lead]) + (None,) * n)
    return rule
