"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
arXiv 2306.01708): trim, elect sign, disjoint mean.

Per task, keep the top ``k`` fraction of ``|tau_t|`` and zero the rest. The fraction is taken
over all merged scalars of the model by default (the paper's choice) or within each tensor
(``per_tensor=True``). A span of n scalars keeps ``max(1, round(k * n))`` of them: every value
whose magnitude is at least the kept-count-th largest magnitude, so ties at the threshold are
all kept, as in the reference code. Then elect ``gamma = sign(sum_t trimmed_t)``, average per
scalar the trimmed values whose sign equals ``gamma`` (scalars with ``gamma == 0`` or no
agreeing task stay at ``theta_0``) and return ``theta_0 + lam * merged``. The paper's setting
is k = 20 % and lam = 1 (the defaults).

Streaming: the thresholds are exact k-th largest magnitudes found by radix selection over
the streamed task vectors (:mod:`.topk`: two extra passes in float32); a tensor that fits in
one chunk is thresholded from that chunk directly. The merge is then one more pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from .arithmetic import summed
from .driver import checkpoint_method
from .vector_layout import Entry, KeepSpec
from .registry import Option, flag, fraction, nonnegative_number, register_method
from .stream import Chunk, ModelSource, TaskVectorStream
from .topk import kth_largest, kth_largest_dense

__all__ = ["ties_merge", "TIES", "K", "LAM", "trim_elect_merge"]

K = 0.2
LAM = 1.0


def trim_elect_merge(taus: Tensor, thresholds: Tensor) -> Tensor:
    """The disjoint mean of an (N, c) chunk trimmed at per-task ``thresholds`` (modifies ``taus``).

    Masks are 0/1 floats multiplied in (one work buffer for both masks); a dropped value may
    become -0.0, which changes no sum and no result.
    """
    keep = taus.abs().ge_(thresholds[:, None])  # 1 where |tau_t| >= the task's threshold
    trimmed = taus.mul_(keep)
    gamma = summed(trimmed).sign_()
    agrees = torch.mul(trimmed, gamma, out=keep).gt_(0)  # 1 where task t's sign is the elected one
    count = summed(agrees).clamp_(min=1)
    return summed(trimmed.mul_(agrees)).div_(count)


def _merged_values(stream: TaskVectorStream, options: dict) -> Iterator[tuple[Entry, int, Tensor]]:
    k, lam, rows = options["k"], options["lam"], stream.num_models
    merged = stream.layout.merged
    groups = [(entry,) for entry in merged] if options["per_tensor"] else [merged]
    for entries in groups:
        size = sum(entry.numel for entry in entries)
        if size == 0:
            continue
        rank = min(size, max(1, round(k * size)))
        chunks: Iterable[Chunk]
        if len(entries) == 1 and size <= stream.chunk_size:  # one chunk: threshold it in memory
            chunks = list(stream.chunks(entries))
            thresholds = kth_largest_dense(chunks[0].taus.abs(), rank)
        else:
            thresholds = kth_largest(lambda entries=entries: (c.taus.abs_() for c in stream.chunks(entries)),
                                     rank, rows, stream.layout.work_dtype)
            chunks = stream.chunks(entries)
        for chunk in chunks:
            yield chunk.entry, chunk.start, chunk.base.add_(trim_elect_merge(chunk.taus, thresholds).mul_(lam))


TIES = register_method(checkpoint_method(
    "ties", "trim to the top-k |tau|, elect signs, disjoint mean (Yadav et al. 2023)",
    (Option("k", K, fraction, "kept fraction of each task vector"),
     Option("lam", LAM, nonnegative_number, "scale of the merged task vector"),
     Option("per_tensor", False, flag, "top-k within each tensor instead of over the whole model")),
    _merged_values))


def ties_merge(base: nn.Module, models: Iterable[ModelSource], k: float = K, lam: float = LAM,
               per_tensor: bool = False, keep: KeepSpec = None) -> nn.Module:
    """TIES-Merging (see the module docstring); a new module, inputs never modified.

    ``models`` items are modules, state dicts, checkpoint paths (``.safetensors`` read lazily)
    or zero-argument callables returning one. Kept entries come from the base.

    >>> import torch, torch.nn as nn
    >>> base = nn.Linear(3, 2)
    >>> merged = ties_merge(base, [base.state_dict()], k=0.5, per_tensor=True)
    >>> torch.equal(merged.bias, base.bias)
    True
    """
    resolved = TIES.resolve({"k": k, "lam": lam, "per_tensor": per_tensor})
    return TIES.merge_modules(base, models, keep, resolved)
