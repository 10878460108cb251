"""Rows for torchvision: functions torchvision hides from fx with ``torch.fx.wrap`` (Swin's
and video Swin's window attention and helpers, video MViT's squeeze helpers, stochastic depth).

Registered through :func:`mudsc_fx.rules.table.register_library` on the first lookup after
torchvision is imported (a model that calls them has imported it)."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..ir.layout import Concat, Plain
from .common import arg, fallback, is_head, is_layout, out_value
from .context import InferContext, TensorLabel
from .elementwise import non_tensor, passthrough
from .shape import reshape_label
from .layers import _operand, _qkv_spaces


def register(add: Callable) -> None:
    from torchvision.ops import stochastic_depth
    from torchvision.models import swin_transformer as swin
    from torchvision.models.video import mvit, swin_transformer as swin3d
    add(stochastic_depth, passthrough)
    add(swin._patch_merging_pad, swin_patch_merging_pad)
    add((swin._get_relative_position_bias, swin3d._get_relative_position_bias), swin_relative_position_bias)
    add(swin.shifted_window_attention, swin_window_attention)
    add(swin3d.shifted_window_attention_3d, swin3d_window_attention)
    add((swin3d._get_window_and_shift_size, swin3d._compute_pad_size_3d), non_tensor)
    add(mvit._unsqueeze, mvit_unsqueeze)
    add(mvit._squeeze, mvit_squeeze)


def mvit_unsqueeze(ctx: InferContext, node: fx.Node):
    """video MViT's ``_unsqueeze(x, target_dim, expand_dim) -> (x or x.unsqueeze(expand_dim), x.dim())``:
    a size-1 axis may be inserted; the labels of the other axes move along."""
    x, out = node.args[0], out_value(node)
    lab = reshape_label(ctx, ctx.tlabel(x), ctx.shape(x), out[0].shape, f"_unsqueeze {node.name}")
    return (lab, None)


def mvit_squeeze(ctx: InferContext, node: fx.Node):
    """video MViT's ``_squeeze``: the inverse, a size-1 axis may be dropped."""
    x = node.args[0]
    return reshape_label(ctx, ctx.tlabel(x), ctx.shape(x), out_value(node).shape, f"_squeeze {node.name}")


def swin_patch_merging_pad(ctx: InferContext, node: fx.Node):
    """Pads H, W and concatenates the four 2x2 phases along channels: [..., H/2, W/2, 4C]."""
    lx = ctx.tlabel(node.args[0])
    for a in lx.axes[:-1]:
        ctx.fix(a, f"padding {node.name}")
    c = lx[-1]
    if not (is_layout(c) and not is_head(ctx, c)):
        ctx.fix(c, f"patch merging {node.name}")
        c = None
    return TensorLabel((None,) * (len(lx) - 1) + (None if c is None else Concat((c,) * 4),))


def swin_relative_position_bias(ctx: InferContext, node: fx.Node):
    table = ctx.tlabel(node.args[0])  # [(2W-1)^2, heads]
    ctx.fix(table[0], f"position index of {node.name}")
    ctx.fix(ctx.label(node.args[1]), f"position index of {node.name}")
    return TensorLabel((None, ctx.resolve(table[1]), None, None))


_SWIN_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
              "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
_SWIN3D_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "training")


def swin_window_attention(ctx: InferContext, node: fx.Node):
    return _window_attention(ctx, node, {n: arg(node, i, n) for i, n in enumerate(_SWIN_ARGS)})


def swin3d_window_attention(ctx: InferContext, node: fx.Node):
    """Video Swin's 3-d windows: the same attention over [B, T, H, W, C] (no logit scale)."""
    a = {n: arg(node, i, n) for i, n in enumerate(_SWIN3D_ARGS)}
    a["logit_scale"] = None
    return _window_attention(ctx, node, a)


def _window_attention(ctx: InferContext, node: fx.Node, a: dict):
    x = a["input"]
    lx, sx = ctx.tlabel(x), ctx.shape(x)
    E, H = sx[-1], a["num_heads"]
    why = f"window attention {node.name}"
    qk, vs = _qkv_spaces(ctx, E, H)
    packed = Concat((Plain(qk), Plain(qk), Plain(vs)))
    wqkv, wproj = _operand(ctx, a["qkv_weight"]), _operand(ctx, a["proj_weight"])
    if wqkv is None or wproj is None or wqkv.use is None or wproj.use is None:
        return fallback(ctx, node, "window attention with computed weights")
    wqkv.unify(ctx, 0, packed, why)
    x_in = wqkv.unify(ctx, 1, lx[-1], why)
    wqkv.use.mark_in(1)
    ctx.tap(x, len(lx) - 1, x_in)
    bq = _operand(ctx, a["qkv_bias"])
    if bq is not None:
        bq.unify(ctx, 0, packed, why)
    head = Plain(ctx.head_of(qk))
    rpb = _operand(ctx, a["relative_position_bias"])
    if rpb is not None:
        for i, lab in enumerate(rpb.label.axes):
            ctx.unify(lab, head, why) if i == 1 else ctx.fix(lab, why)
    ls = _operand(ctx, a["logit_scale"])
    if ls is not None:
        ls.unify(ctx, 0, head, why)
    bname = a["qkv_bias"].target if isinstance(a["qkv_bias"], fx.Node) and a["qkv_bias"].op == "get_attr" else None
    for off, sp in ((0, qk), (E, qk), (2 * E, vs)):
        ctx.tap(x, len(lx) - 1, Plain(sp), proj=(wqkv.use.fqn, bname, off, off + E, off))
    wproj.unify(ctx, 1, Plain(vs), why)
    wproj.use.mark_in(1)
    out = wproj.take(ctx, 0)
    bp = _operand(ctx, a["proj_bias"])
    if bp is not None:
        out = bp.unify(ctx, 0, out, why)
    ctx.producer(node, ctx.resolve_layout(packed), 3 * E)
    ctx.producer(node, out, E)
    for lab in lx.axes[:-1]:
        ctx.fix(lab, why)
    return TensorLabel((None,) * (len(sx) - 1) + (out,))
