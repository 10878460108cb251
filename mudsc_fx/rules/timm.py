"""Rows for timm: the modules and helper functions timm registers as fx-unfriendly (they become
leaves / wrapped calls when tracing needs them, see :mod:`mudsc_fx.ir.conventions`), and
timm's weight-standardised convolutions, which that module always traces as leaves because
the rows here cover them whole (traced through, a grouped one is a conv with a computed
weight: a barrier).

Registered through :func:`mudsc_fx.rules.table.register_library` on the first lookup after
timm is imported. Each row is provably safe for what it covers:

- ``Conv2dSame``, ``StdConv2d(Same)``, ``ScaledStdConv2d(Same)``: a Conv2d whose input is
  padded on the spatial axes only; weight standardisation normalises each output row over its
  own (input, kernel) entries, which input permutations only reorder, so the conv rule holds;
  the scaled variant's ``gain`` belongs to the output units.
- ``MaxPool2dSame``, ``AvgPool2dSame``: pooling over the spatial axes after spatial padding.
- ``pad_same``: SAME padding of the last two (spatial) axes; ``get_same_padding``: an int.
- ``crossvit.scale_image``: a spatial resize or crop of an image batch.
- ``mvitv2.cal_rel_pos_type``: adds to the attention logits a per-head bias computed from q's
  head slices and position tables shared by all heads: head axes follow, q's within-head
  units stay in place (the tables are contracted with them), the tables are fixed.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from .common import arg
from .context import InferContext, TensorLabel, Within
from .elementwise import non_tensor
from .layers import _conv, _operand, _param, conv_module
from .shape import spatial


def register(add: Callable) -> None:
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    add(Conv2dSame, conv_module)
    add((StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame), std_conv_module)
    add((MaxPool2dSame, AvgPool2dSame), spatial(2))
    from timm.layers.padding import get_same_padding, pad_same
    add(pad_same, spatial(2))
    add(get_same_padding, non_tensor)
    try:
        from timm.models import crossvit, mvitv2
    except ImportError:  # pragma: no cover - a timm without these models
        return
    add(crossvit.scale_image, spatial(2))
    add(mvitv2.cal_rel_pos_type, mvitv2_rel_pos)


def std_conv_module(ctx: InferContext, node: fx.Node):
    """A weight-standardised Conv2d (optionally with SAME padding and a per-output gain)."""
    m = ctx.module(node)
    out = _conv(ctx, node, node.args[0], _param(ctx, node, "weight"), _param(ctx, node, "bias"), m.groups)
    gain = _param(ctx, node, "gain")
    if gain is not None:
        ch = 1 if len(out) == 4 else 0
        unit = gain.unify(ctx, 0, out[ch], f"gain of {node.name}")
        out = out.replace(ch, unit)
    return out


_REL_POS_ARGS = ("attn", "q", "has_cls_token", "q_size", "k_size", "rel_pos_h", "rel_pos_w")


def mvitv2_rel_pos(ctx: InferContext, node: fx.Node):
    a = {n: arg(node, i, n) for i, n in enumerate(_REL_POS_ARGS)}
    why = f"relative position bias {node.name}"
    attn, q = ctx.tlabel(a["attn"]), ctx.tlabel(a["q"])  # [B, heads, Nq, Nk], [B, heads, Nq, d]
    for t in ("rel_pos_h", "rel_pos_w"):
        table = _operand(ctx, a[t])
        if table is not None:
            ctx.fix(table.label, why)
    d = q[3]
    if isinstance(d, Within):
        ctx.identity_within(d.space)
    else:
        ctx.fix(d, why)
    ctx.fix(q[2], why)
    ctx.invariant(q[0])
    head = ctx.unify(attn[1], q[1], why)
    return TensorLabel((attn[0], head, attn[2], attn[3]))
