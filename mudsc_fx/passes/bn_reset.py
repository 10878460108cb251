"""BatchNorm repair after a merge: recompute every BatchNorm's running statistics on the
calibration data (a merged unit's statistics are not the average of its members')."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .. import distributed
from ..ir.inputs import call_model
from .stats import default_input_fn


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reset_bn(model: nn.Module, data: Iterable, input_fn: Optional[Callable] = None, *,
             outputs: Optional[list] = None) -> nn.Module:
    """Recompute BatchNorm running statistics on ``data`` (cumulative average), in place;
    returns ``model`` in eval mode. Models without BatchNorm are returned unchanged. With
    ``outputs`` (a list), the model's output on every batch of the pass is appended to it
    (computed with the batch statistics).

    >>> # merged = mf.reset_bn(merged, loader)
    """
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    input_fn = input_fn or default_input_fn
    saved = [(m, m.momentum) for _, m in bns]
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()  # dropout and friends stay off: only the statistics are recomputed
    for _, m in bns:
        m.train()
    n = 0
    sharding = distributed.resolve()  # under torch.distributed: this rank's batches, averaged below
    try:
        with distributed.together(sharding, "reset_bn"), torch.no_grad():
            for batch in distributed.shard(data, sharding):
                try:
                    out = call_model(model, input_fn(batch))
                    if outputs is not None:
                        outputs.append(out)
                except ValueError as e:
                    if "more than 1 value per channel" in str(e):
                        raise ValueError(f"reset_bn: calibration batch {n} gives BatchNorm one value per channel "
                                         "(a batch of one sample?): use batches of at least 2 samples, or "
                                         "reset_bn=False") from None
                    raise
                n += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()
    n = distributed.average_batchnorm(model, n, sharding)
    if n == 0:
        raise ValueError("reset_bn: the data is empty")
    for name, m in bns:
        if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
            raise ValueError(f"reset_bn: the calibration data drives the statistics of BatchNorm {name!r} to "
                             "inf/NaN (inputs far outside the model's range?); check the data or use reset_bn=False")
    return model
