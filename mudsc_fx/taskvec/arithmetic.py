"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089).

``theta = theta_0 + lam * sum_t tau_t``, scalar by scalar: one pass over the task vectors.
The paper tunes ``lam`` on held-out data; 0.3 is its typical value and the default here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from .driver import checkpoint_method
from .vector_layout import Entry, KeepSpec
from .registry import Option, nonnegative_number, register_method
from .stream import ModelSource, TaskVectorStream

__all__ = ["task_arithmetic", "TASK_ARITHMETIC", "LAM"]

LAM = 0.3


def summed(taus: Tensor) -> Tensor:
    """``sum_t tau_t`` of an (N, c) chunk, accumulated in task order (a new tensor)."""
    total = taus[0].clone()
    for tau in taus[1:]:
        total.add_(tau)
    return total


def _merged_values(stream: TaskVectorStream, options: dict) -> Iterator[tuple[Entry, int, Tensor]]:
    for chunk in stream.chunks():
        yield chunk.entry, chunk.start, chunk.base.add_(summed(chunk.taus).mul_(options["lam"]))


TASK_ARITHMETIC = register_method(checkpoint_method(
    "task_arithmetic", "theta_0 + lam * sum of task vectors (Ilharco et al. 2023)",
    (Option("lam", LAM, nonnegative_number, "scale of the summed task vectors"),),
    _merged_values))


def task_arithmetic(base: nn.Module, models: Iterable[ModelSource], lam: float = LAM, keep: KeepSpec = None) -> nn.Module:
    """Task Arithmetic: ``theta_0 + lam * sum_t (theta_t - theta_0)``; a new module.

    ``models`` items are modules, state dicts, checkpoint paths (``.safetensors`` read lazily,
    chunk by chunk) or zero-argument callables returning one. Entries selected by ``keep``
    (task heads) are not merged: the result carries the base's, and :func:`task_heads`
    returns each task's. Inputs are never modified.

    >>> import torch, torch.nn as nn
    >>> base = nn.Linear(3, 2)
    >>> merged = task_arithmetic(base, [base.state_dict(), base.state_dict()], lam=0.5)
    >>> torch.equal(merged.weight, base.weight)
    True
    """
    return TASK_ARITHMETIC.merge_modules(base, models, keep, TASK_ARITHMETIC.resolve({"lam": lam}))
