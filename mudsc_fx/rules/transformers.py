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

from .context import InferContext
from .elementwise import passthrough
from .layers import _linear, _param

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
    return _linear(ctx, node, node.args[0], _param(ctx, node, "weight"), _param(ctx, node, "bias"),
                   in_axis=0, out_axis=1, what="Conv1D")
