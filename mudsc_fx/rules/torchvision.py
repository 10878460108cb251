"""Rows for torchvision: functions torchvision hides from fx with ``torch.fx.wrap``.

Registered through :func:`mudsc_fx.rules.table.register_library` on the first lookup after
torchvision is imported (a model that calls them has imported it)."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..ir.layout import Concat, Plain
from .common import arg, fallback, is_head, is_layout
from .context import InferContext, TensorLabel
from .elementwise import passthrough
from .layers import _operand, _qkv_spaces


def register(add: Callable) -> None:
    from torchvision.ops import stochastic_depth
    from torchvision.models import swin_transformer as swin
    add(stochastic_depth, passthrough)
    add(swin._patch_merging_pad, swin_patch_merging_pad)
    add(swin._get_relative_position_bias, swin_relative_position_bias)
    add(swin.shifted_window_attention, swin_window_attention)


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


def swin_window_attention(ctx: InferContext, node: fx.Node):
    a = {n: arg(node, i, n) for i, n in enumerate(_SWIN_ARGS)}
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
