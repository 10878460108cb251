"""Each task's kept entries (task heads), which the merges do not combine."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from .vector_layout import KeepSpec
from .stream import ModelSource, open_stream

__all__ = ["task_heads"]


def task_heads(base: nn.Module, models: Iterable[ModelSource], keep: KeepSpec) -> list[dict[str, Tensor]]:
    """Each task's kept entries (private CPU copies), in ``models`` order.

    >>> import torch.nn as nn
    >>> base = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    >>> [sorted(h) for h in task_heads(base, [base], keep=r"^1\\.")]
    [['1.bias', '1.weight']]
    """
    stream = open_stream(base, models, keep)
    try:
        return [stream.kept(index) for index in range(stream.num_models)]
    finally:
        stream.close()
