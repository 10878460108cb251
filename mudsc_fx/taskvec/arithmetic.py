"""Task Arithmetic and TIES-Merging: one merged model from models fine-tuned from one base.

Both return a new module (a deep copy of ``base``) and never modify their inputs. Entries
selected by ``keep`` (task heads) are *not* merged: the returned module carries the base's
values for them, and :func:`task_heads` hands back each task's kept tensors so the caller can
swap in the head it needs (``write_state(model, heads[t])`` or ``load_state_dict(strict=False)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .sources import KeepSpec, Layout, ModelSource, as_sources, iter_task_vectors, load_state, write_state

__all__ = ["task_arithmetic", "ties_merge", "task_heads"]


def _module_from_delta(base: nn.Module, layout: Layout, delta: Tensor) -> nn.Module:
    """A deep copy of ``base`` with ``theta_0 + delta`` written over the merged entries."""
    merged = copy.deepcopy(base)
    base_state = base.state_dict()
    values = {entry.name: (base_state[entry.name].detach().reshape(-1).to(delta.dtype) + delta[span])
              .reshape(entry.shape) for entry, span in layout.segments()}
    write_state(merged, values)
    return merged


def task_arithmetic(base: nn.Module, models: Iterable[ModelSource], lam: float = 0.3,
                    keep: KeepSpec = None) -> nn.Module:
    """Task Arithmetic: ``theta_0 + lam * sum_t (theta_t - theta_0)`` (arXiv 2212.04089).

    ``models`` items are modules, state dicts, ``.pt``/``.safetensors`` paths or zero-argument
    callables returning one; they are loaded one at a time. Kept entries come from the base.

    >>> import torch.nn as nn
    >>> base = nn.Linear(3, 2)
    >>> merged = task_arithmetic(base, [base.state_dict(), base.state_dict()], lam=0.5)
    >>> torch.equal(merged.weight, base.weight)
    True
    """
    sources = as_sources(models)
    base_state = base.state_dict()
    layout = Layout.of(base_state, keep)
    layout.check(base_state, "base")
    total = layout.zeros()
    for _, tau, _ in iter_task_vectors(sources, layout, base_state):
        total.add_(tau)
    return _module_from_delta(base, layout, total.mul_(lam))


def _trim_(tau: Tensor, layout: Layout, k: float, per_tensor: bool) -> Tensor:
    """Zero, in place, all but the top-``k`` fraction of ``|tau|``, globally or per tensor.

    A span of n scalars keeps ``max(1, round(k * n))`` of them: every value whose magnitude is
    at least the threshold (the kept-count-th largest magnitude), so ties at the threshold are
    all kept, as in the TIES reference code.
    """
    spans = [span for _, span in layout.segments()] if per_tensor else [slice(0, tau.numel())]
    for span in spans:
        segment = tau[span]
        n = segment.numel()
        n_keep = max(1, round(k * n))
        if n == 0 or n_keep >= n:
            continue
        magnitude = segment.abs()
        threshold = magnitude.kthvalue(n - n_keep + 1).values
        segment.masked_fill_(magnitude < threshold, 0)
    return tau


def ties_merge(base: nn.Module, models: Iterable[ModelSource], k: float = 0.2, lam: float = 1.0,
               per_tensor: bool = False, keep: KeepSpec = None) -> nn.Module:
    """TIES-Merging: trim, elect sign, disjoint mean (arXiv 2306.01708).

    Per task, keep the top ``k`` fraction of ``|tau_t|`` — over all merged scalars of the
    model by default, within each tensor if ``per_tensor`` — and zero the rest; elect
    ``gamma = sign(sum_t trimmed_t)``; average, per scalar, the trimmed values whose sign
    equals ``gamma`` (scalars with ``gamma == 0`` or no agreeing task stay at ``theta_0``);
    return ``theta_0 + lam * merged``. Two lazy passes over ``models``: the first elects the
    sign, the second accumulates the disjoint mean. Kept entries come from the base.

    >>> import torch.nn as nn
    >>> base = nn.Linear(3, 2)
    >>> merged = ties_merge(base, [base.state_dict()], k=0.5, per_tensor=True)
    >>> torch.equal(merged.bias, base.bias)
    True
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is the kept fraction of each task vector and must be in (0, 1], got {k}")
    sources = as_sources(models)
    base_state = base.state_dict()
    layout = Layout.of(base_state, keep)
    layout.check(base_state, "base")

    elected = layout.zeros()
    for _, tau, _ in iter_task_vectors(sources, layout, base_state):
        elected.add_(_trim_(tau, layout, k, per_tensor))
    gamma = elected.sign_()

    total, count = layout.zeros(), torch.zeros(layout.num_scalars, dtype=torch.int32)
    for _, tau, _ in iter_task_vectors(sources, layout, base_state):
        trimmed = _trim_(tau, layout, k, per_tensor)
        agrees = trimmed * gamma > 0
        total.add_(trimmed.masked_fill_(~agrees, 0))
        count.add_(agrees)
    merged = total.div_(count.clamp_(min=1))
    return _module_from_delta(base, layout, merged.mul_(lam))


def task_heads(base: nn.Module, models: Iterable[ModelSource], keep: KeepSpec) -> list[dict[str, Tensor]]:
    """Each task's kept entries (private CPU copies), in ``models`` order.

    >>> import torch.nn as nn
    >>> base = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    >>> [sorted(h) for h in task_heads(base, [base], keep=r"^1\\.")]
    [['1.bias', '1.weight']]
    """
    base_state = base.state_dict()
    layout = Layout.of(base_state, keep)
    heads = []
    for index, source in enumerate(as_sources(models)):
        state = load_state(source, index)
        layout.check(state, f"model {index}")
        heads.append(layout.kept_of(state))
    return heads
