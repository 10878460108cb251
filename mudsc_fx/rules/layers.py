"""Rules for ops with weights: producers (rule 1), consumers (2), norms (3, 10),
attention (9). Module and functional forms share one implementation: a module's
parameters become ``ParamUse``s, a functional call's weights are get_attr nodes with one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx

from ..ir.layout import Concat, Plain, kron
from ..ir.values import TensorValue, value_of
from .context import AxisLabel, InferContext, ParamUse, TensorLabel, Within, fixed_label
from .common import arg, fallback, is_head, is_layout


@dataclass
class Operand:
    """A weight-like argument: its label, its parameter use when it is a parameter (module
    form, or a get_attr node), and for a weight computed from parameters in forward (weight
    standardisation, a scaled or flipped kernel) the parameter uses it is computed from."""
    label: TensorLabel
    use: Optional[ParamUse]
    sources: tuple[ParamUse, ...] = ()

    def unify(self, ctx: InferContext, axis: int, other: AxisLabel, why: str) -> AxisLabel:
        return ctx.unify(self.label[axis], other, why)

    def take(self, ctx: InferContext, axis: int) -> AxisLabel:
        """The axis' label, passed on to the op's output."""
        return ctx.resolve(self.label[axis])

    def mark_in(self, ctx: InferContext, axis: int) -> None:
        """The axis consumes units: the parameter axis it comes from is unmerged with U."""
        if self.use is not None:
            self.use.mark_in(axis)
        else:
            ctx.mark_in_through(self.sources, self.label[axis], f"input axis {axis} of a computed weight")


def _operand(ctx: InferContext, a: Any) -> Optional[Operand]:
    if not isinstance(a, fx.Node) or not ctx.is_tensor(a):
        return None
    use = ctx.use_of(a)
    return Operand(ctx.tlabel(a), use, () if use is not None else ctx.weight_sources(a))


def _param(ctx: InferContext, node: fx.Node, name: str) -> Optional[Operand]:
    use = ctx.param(f"{node.target}.{name}")
    return None if use is None else Operand(use.label, use)


def _mark_in(ctx: InferContext, op: Optional[Operand], axis: int) -> None:
    if op is not None:
        op.mark_in(ctx, axis)


# ---------------------------------------------------------------------------------------
# linear / conv / embedding
# ---------------------------------------------------------------------------------------
def _linear(ctx: InferContext, node: fx.Node, x: fx.Node, w: Operand, b: Optional[Operand],
            in_axis: int = 1, out_axis: int = 0, what: str = "linear"):
    """``x @ W^T + b`` with W [out, in]; GPT-2's Conv1D passes its [in, out] axes."""
    lx = ctx.tlabel(x)
    why = f"{what} {node.name}"
    inp = w.unify(ctx, in_axis, lx[-1], why)
    _mark_in(ctx, w, in_axis)
    ctx.tap(x, len(lx) - 1, inp)
    out = w.take(ctx, out_axis)
    if b is not None:
        out = b.unify(ctx, 0, out, why)
    ctx.producer(node, out, value_of(node).shape[-1])
    ctx.tap(node, len(lx) - 1, out, out=True)
    return TensorLabel(tuple(ctx.tlabel(x).axes[:-1]) + (out,))


def linear_module(ctx: InferContext, node: fx.Node):
    return _linear(ctx, node, node.args[0], _param(ctx, node, "weight"), _param(ctx, node, "bias"))


def linear_function(ctx: InferContext, node: fx.Node):
    w = _operand(ctx, arg(node, 1, "weight"))
    if w is None or len(w.label) != 2:
        return fallback(ctx, node, "F.linear with an unexpected weight")
    return _linear(ctx, node, node.args[0], w, _operand(ctx, arg(node, 2, "bias")))


def _conv_output(ctx: InferContext, node: fx.Node, x: fx.Node, ch: int, out: AxisLabel,
                 b: Optional[Operand], why: str) -> TensorLabel:
    """Shared tail of conv and conv_transpose: bias, coverage, taps, spatial axes fixed."""
    if b is not None:
        out = b.unify(ctx, 0, out, why)
    ctx.producer(node, out, value_of(node).shape[ch])
    ctx.tap(node, ch, out, out=True)
    lx = ctx.tlabel(x)
    for a in lx.axes[ch + 1:]:
        ctx.fix(a, f"spatial axis of {node.name}")
    return TensorLabel(tuple(ctx.tlabel(x).axes[:ch]) + (out,) + (None,) * (len(lx) - ch - 1))


def _conv(ctx: InferContext, node: fx.Node, x: fx.Node, w: Operand, b: Optional[Operand], groups: int):
    lx, sx = ctx.tlabel(x), ctx.shape(x)
    ch = 1 if len(sx) == len(w.label) else 0
    cin = sx[ch]
    why = f"conv {node.name}"
    lin = lx[ch]
    if groups == 1:
        inp = w.unify(ctx, 1, lin, why)
        _mark_in(ctx, w, 1)
        ctx.tap(x, ch, inp)
        out = w.take(ctx, 0)
    elif w.use is None:
        return fallback(ctx, node, "grouped conv with a computed weight")
    else:
        wshape = w.use.shape
        cout = wshape[0]
        if wshape[1] == 1 and groups == cin and cout == cin and isinstance(lin, Within):
            # one depthwise filter bank for every block (heads folded into the batch axis): the
            # blocks still move, the units inside them stay; the filters do not move
            ctx.identity_within(lin.space)
            w.unify(ctx, 0, None, why)
            if b is not None:
                b.unify(ctx, 0, None, why)
            return _conv_output(ctx, node, x, ch, lin, None, why)
        if wshape[1] == 1 and groups == cin:  # depthwise: out unit o reads input unit o // mult
            src = lin if is_layout(lin) and not is_head(ctx, lin) else None
            if src is None:
                ctx.fix(lin, why)
            out = w.unify(ctx, 0, None if src is None else kron(src, 1, cout // cin), why)
        else:  # grouped: one block permutation on input and output, free within groups
            out_space = w.take(ctx, 0)
            lin_r = ctx.resolve(lin)
            ok_out = isinstance(out_space, Plain) and ctx.set_blocks(out_space.space, groups, cout // groups)
            ok_in = isinstance(lin_r, Plain) and not is_head(ctx, lin_r) and \
                ctx.set_blocks(lin_r.space, groups, cin // groups)
            if not ok_out:
                ctx.fix(out_space, why)
            if ok_in and ok_out:
                ctx.tie(lin_r.space, out_space.space)
                w.use.set_grouped_input(1, lin_r, groups)
                ctx.tap(x, ch, lin_r)
            else:
                ctx.fix(lin, why)
                ctx.fix(w.label[1], why)
                if ok_out:
                    ctx.fix_space(ctx.head_of(out_space.space), why)
            out = w.take(ctx, 0)
    return _conv_output(ctx, node, x, ch, out, b, why)


def _module_rule(core):
    """Rule for an nn.Module form: its own parameters become the operands."""
    def rule(ctx: InferContext, node: fx.Node):
        m = ctx.module(node)
        return core(ctx, node, node.args[0], _param(ctx, node, "weight"), _param(ctx, node, "bias"), m.groups)
    return rule


def _function_rule(core, name: str):
    """Rule for a functional form F.conv*(input, weight, bias, stride, padding, dilation, groups)."""
    def rule(ctx: InferContext, node: fx.Node):
        w = _operand(ctx, arg(node, 1, "weight"))
        if w is None:
            return fallback(ctx, node, f"{name} with an unexpected weight")
        return core(ctx, node, node.args[0], w, _operand(ctx, arg(node, 2, "bias")), arg(node, 6, "groups", 1))
    return rule


conv_module = _module_rule(_conv)
conv_function = _function_rule(_conv, "conv")


def _conv_transpose(ctx: InferContext, node: fx.Node, x: fx.Node, w: Operand, b: Optional[Operand], groups: int):
    """ConvTranspose stores [in, out/groups, k...]."""
    lx, sx = ctx.tlabel(x), ctx.shape(x)
    ch = 1 if len(sx) == len(w.label) else 0
    why = f"conv_transpose {node.name}"
    lin = lx[ch]
    if groups == 1:
        inp = w.unify(ctx, 0, lin, why)
        _mark_in(ctx, w, 0)
        ctx.tap(x, ch, inp)
        out = w.take(ctx, 1)
    elif w.use is None:
        return fallback(ctx, node, "grouped conv_transpose with a computed weight")
    else:
        cin, per = w.use.shape[0], w.use.shape[1]
        cout = per * groups
        out_space = ctx.new_space(cout)
        ctx.set_blocks(out_space, groups, per)
        lin_r = ctx.resolve(lin)
        if isinstance(lin_r, Plain) and not is_head(ctx, lin_r) and ctx.set_blocks(lin_r.space, groups, cin // groups):
            ctx.tie(lin_r.space, out_space)
            w.unify(ctx, 0, lin_r, why)
            w.use.mark_in(0)
            ctx.tap(x, ch, lin_r)
        else:
            ctx.fix(lin, why)
            w.unify(ctx, 0, None, why)
            ctx.fix_space(ctx.head_of(out_space), why)
        ctx.fix(w.label[1], why)  # the short axis is re-expressed through the full output space
        w.use.layouts[1] = Plain(out_space)
        w.use.groups[1] = groups
        out = Plain(ctx.find(out_space))
    return _conv_output(ctx, node, x, ch, out, b, why)


conv_transpose_module = _module_rule(_conv_transpose)
conv_transpose_function = _function_rule(_conv_transpose, "conv_transpose")


def _embedding(ctx: InferContext, node: fx.Node, idx: fx.Node, w: Operand):
    why = f"embedding {node.name}"
    w.unify(ctx, 0, None, why)  # rows are addressed by token id
    out = w.take(ctx, 1)
    ctx.producer(node, out, value_of(node).shape[-1])
    li = ctx.tlabel(idx)
    ctx.tap(node, len(li), out, out=True)
    return TensorLabel(li.axes + (out,))


def embedding_module(ctx: InferContext, node: fx.Node):
    return _embedding(ctx, node, node.args[0], _param(ctx, node, "weight"))


def embedding_function(ctx: InferContext, node: fx.Node):
    w = _operand(ctx, arg(node, 1, "weight"))
    if w is None:
        return fallback(ctx, node, "F.embedding with an unexpected weight")
    return _embedding(ctx, node, node.args[0], w)


# ---------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------
def _channel_norm(ctx: InferContext, node: fx.Node, x: fx.Node, params: list[Optional[Operand]]):
    """BatchNorm / InstanceNorm: per-channel statistics and affine on axis 1."""
    lx = ctx.tlabel(x)
    ch = 1 if len(lx) > 1 else 0
    cur = lx[ch]
    for p in params:
        if p is not None:
            cur = p.unify(ctx, 0, cur, f"norm {node.name}")
    return ctx.tlabel(x).replace(ch, ctx.resolve(cur))


def channel_norm_module(ctx: InferContext, node: fx.Node):
    names = ("weight", "bias", "running_mean", "running_var")
    return _channel_norm(ctx, node, node.args[0], [_param(ctx, node, n) for n in names])


def batch_norm_function(ctx: InferContext, node: fx.Node):
    ops = [_operand(ctx, arg(node, i, n)) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    return _channel_norm(ctx, node, node.args[0], ops)


def instance_norm_function(ctx: InferContext, node: fx.Node):
    ops = [_operand(ctx, arg(node, i, n)) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    return _channel_norm(ctx, node, node.args[0], ops)


def _layer_norm(ctx: InferContext, node: fx.Node, x: fx.Node, k: int, params: list[Optional[Operand]]):
    """LayerNorm / RMSNorm over the last k axes: statistics are invariant under permutations
    of each normalised axis; the affine parameters follow the axes."""
    lx = ctx.tlabel(x)
    axes = list(lx.axes)
    for j in range(k):
        ax = len(axes) - k + j
        for p in params:
            if p is not None:
                axes[ax] = p.unify(ctx, j, axes[ax], f"norm {node.name}")
    return TensorLabel(tuple(ctx.resolve(a) for a in axes))


def layer_norm_module(ctx: InferContext, node: fx.Node):
    m = ctx.module(node)
    k = len(m.normalized_shape)
    return _layer_norm(ctx, node, node.args[0], k, [_param(ctx, node, "weight"), _param(ctx, node, "bias")])


def layer_norm_function(has_bias: bool):
    """F.layer_norm(x, shape, weight, bias) / F.rms_norm(x, shape, weight)."""
    def rule(ctx: InferContext, node: fx.Node):
        shape = arg(node, 1, "normalized_shape")
        k = 1 if isinstance(shape, int) else len(shape)
        params = [_operand(ctx, arg(node, 2, "weight"))]
        if has_bias:
            params.append(_operand(ctx, arg(node, 3, "bias")))
        return _layer_norm(ctx, node, node.args[0], k, params)
    return rule


def _group_norm(ctx: InferContext, node: fx.Node, x: fx.Node, groups: int, params: list[Optional[Operand]]):
    """Rule 10: GroupNorm(G, C) makes the channel space blocks(G, C/G)."""
    lx, sx = ctx.tlabel(x), ctx.shape(x)
    lin = ctx.resolve(lx[1])
    why = f"group_norm {node.name}"
    if not (isinstance(lin, Plain) and not is_head(ctx, lin) and ctx.set_blocks(lin.space, groups, sx[1] // groups)):
        ctx.fix(lin, why)
        lin = None
    cur = lin
    for p in params:
        if p is not None:
            cur = p.unify(ctx, 0, cur, why)
    return ctx.tlabel(x).replace(1, ctx.resolve(cur))


def group_norm_module(ctx: InferContext, node: fx.Node):
    m = ctx.module(node)
    return _group_norm(ctx, node, node.args[0], m.num_groups, [_param(ctx, node, "weight"), _param(ctx, node, "bias")])


def group_norm_function(ctx: InferContext, node: fx.Node):
    ops = [_operand(ctx, arg(node, 2, "weight")), _operand(ctx, arg(node, 3, "bias"))]
    return _group_norm(ctx, node, node.args[0], arg(node, 1, "num_groups"), ops)


def prelu_module(ctx: InferContext, node: fx.Node):
    return _channel_norm(ctx, node, node.args[0], [_param(ctx, node, "weight")])


# ---------------------------------------------------------------------------------------
# attention (rule 9)
# ---------------------------------------------------------------------------------------
def _qkv_spaces(ctx: InferContext, embed: int, heads: int) -> tuple[int, int]:
    """A q/k space and a v space, blocks(heads, embed/heads), sharing the head permutation."""
    qk, v = ctx.new_space(embed), ctx.new_space(embed)
    ctx.set_blocks(qk, heads, embed // heads)
    ctx.set_blocks(v, heads, embed // heads)
    ctx.tie(qk, v)
    return qk, v


def multihead_attention(ctx: InferContext, node: fx.Node):
    m = ctx.module(node)
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    lq, lk, lv = ctx.tlabel(q), ctx.tlabel(k), ctx.tlabel(v)
    why = f"attention {node.name}"
    E, H = m.embed_dim, m.num_heads
    qk, vs = _qkv_spaces(ctx, E, H)
    packed = Concat((Plain(qk), Plain(qk), Plain(vs)))
    t = node.target
    if m._qkv_same_embed_dim:
        w = _param(ctx, node, "in_proj_weight")
        x_in = ctx.unify(ctx.unify(lq[-1], lk[-1], why), lv[-1], why)
        w.unify(ctx, 0, packed, why)
        x_in = w.unify(ctx, 1, x_in, why)
        w.use.mark_in(1)
        ctx.tap(q, len(lq) - 1, x_in)
        projs = [(q, f"{t}.in_proj_weight", 0, qk), (k, f"{t}.in_proj_weight", E, qk), (v, f"{t}.in_proj_weight", 2 * E, vs)]
    else:
        projs = []
        for src, lab, name, sp in ((q, lq, "q_proj_weight", qk), (k, lk, "k_proj_weight", qk), (v, lv, "v_proj_weight", vs)):
            w = _param(ctx, node, name)
            w.unify(ctx, 0, Plain(sp), why)
            w.unify(ctx, 1, lab[-1], why)
            w.use.mark_in(1)
            ctx.tap(src, len(lab) - 1, ctx.resolve(w.label[1]))
            projs.append((src, f"{t}.{name}", 0, sp))
    b = _param(ctx, node, "in_proj_bias")
    if b is not None:
        b.unify(ctx, 0, packed, why)
    for name, sp in (("bias_k", qk), ("bias_v", vs)):
        p = _param(ctx, node, name)
        if p is not None:
            p.unify(ctx, 2, Plain(sp), why)
    bias_name = f"{t}.in_proj_bias" if b is not None else None
    for src, wname, off, sp in projs:
        boff = off if m._qkv_same_embed_dim else {qk: 0, vs: 2 * E}[sp] + (E if wname.endswith("k_proj_weight") else 0)
        ctx.tap(src, len(ctx.tlabel(src)) - 1, Plain(sp), proj=(wname, bias_name, off, off + E, boff))
    for lab in (lk, lv):  # key/value tokens are contracted inside the module
        for a in lab.axes[:-1]:
            ctx.fix(a, why)
    wo = _param(ctx, node, "out_proj.weight")
    wo.unify(ctx, 1, Plain(vs), why)
    wo.use.mark_in(1)
    out = wo.take(ctx, 0)
    bo = _param(ctx, node, "out_proj.bias")
    if bo is not None:
        out = bo.unify(ctx, 0, out, why)
    ctx.producer(node, ctx.resolve_layout(packed), 3 * E)
    ctx.producer(node, out, E)
    attn_out = TensorLabel(tuple(ctx.tlabel(q).axes[:-1]) + (out,))
    weights = value_of(node)[1]
    if isinstance(weights, TensorValue):
        wl = fixed_label(weights.ndim)
        if weights.ndim == 4:  # per-head weights [B, H, L, S]
            wl = wl.replace(1, Plain(ctx.head_of(qk)))
        return (attn_out, wl)
    return (attn_out, None)
