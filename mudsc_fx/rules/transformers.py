"""Rows for Hugging Face transformers modules, for graphs where they are fx leaf modules.

transformers 5.x models are traced by the torch.export front end, whose ATen graphs need no
library rows (``rules/aten.py``). These rows serve torch.fx graphs in which transformers'
building blocks are kept as leaves (``leaf_modules=[Conv1D]``, or a user model that embeds
them): GPT-2's ``Conv1D`` stores its weight as [in, out]; the activation modules are
elementwise. Registered through :data:`mudsc_fx.rules.table.LIBRARIES` once transformers is
imported.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..ir.values import value_of
from .context import InferContext, TensorLabel
from .elementwise import passthrough
from .layers import _param

_ACTIVATIONS = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                "GELUTanh", "PytorchGELUTanh", "ClippedGELUActivation", "AccurateGELUActivation",
                "MishActivation", "LinearActivation", "LaplaceActivation", "ReLUSquaredActivation",
                "SiLUActivation", "GELUActivation")


def register(add: Callable) -> None:
    from transformers import activations
    from transformers.pytorch_utils import Conv1D
    add(Conv1D, conv1d)
    add([getattr(activations, n) for n in _ACTIVATIONS if isinstance(getattr(activations, n, None), type)],
        passthrough)


def conv1d(ctx: InferContext, node: fx.Node):
    """GPT-2's Conv1D: ``x @ weight + bias`` with weight [in, out] (rule 1 with the axes swapped)."""
    x = node.args[0]
    lx = ctx.tlabel(x)
    w, b = _param(ctx, node, "weight"), _param(ctx, node, "bias")
    why = f"Conv1D {node.name}"
    inp = w.unify(ctx, 0, lx[-1], why)
    w.mark_in(ctx, 0)
    ctx.tap(x, len(lx) - 1, inp)
    out = w.take(ctx, 1)
    if b is not None:
        out = b.unify(ctx, 0, out, why)
    ctx.producer(node, out, value_of(node).shape[-1])
    ctx.tap(node, len(lx) - 1, out, out=True)
    return TensorLabel(tuple(ctx.tlabel(x).axes[:-1]) + (ctx.resolve(out),))
