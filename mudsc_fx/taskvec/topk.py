"""Exact k-th largest magnitude per row over data that is streamed, not held (radix selection).

TIES keeps, per task, the scalars whose ``|tau|`` is at least the k-th largest ``|tau|`` of the
whole model. Holding every task vector to sort it would cost N models of memory; instead
:func:`kth_largest` finds the exact value in passes over the streamed chunks, each keeping one
histogram of 2^16 counts per row:

Non-negative IEEE floats order like their bit patterns read as integers. Pass 1 counts the top
16 bits of every magnitude; scanning the counts from the top finds the 16-bit prefix of the
k-th largest value and its rank among the values sharing that prefix. Pass 2 counts the next
16 bits of those values only, and so on: float32 needs 2 passes, float64 4. The result is the
exact k-th largest value (the value ``torch.kthvalue`` returns on the whole row, ties
included), not an approximation; ``tests/test_taskvec.py`` checks that on data with ties,
zeros and subnormals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["kth_largest", "kth_largest_dense"]

_DIGIT = 16
_BINS = 1 << _DIGIT
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def kth_largest_dense(magnitudes: Tensor, rank: int) -> Tensor:
    """The ``rank``-th largest value of each row of an (R, n) tensor held in memory."""
    return magnitudes.kthvalue(magnitudes.shape[1] - rank + 1, dim=1).values


def kth_largest(passes: Callable[[], Iterable[Tensor]], rank: int, rows: int, dtype: torch.dtype) -> Tensor:
    """The exact ``rank``-th largest value of each of ``rows`` streamed rows.

    ``passes()`` starts a new pass and yields (rows, c) chunks of finite non-negative values
    of ``dtype`` (float32 or float64) that together form the rows; ``1 <= rank <= n``.
    Returns a (rows,) tensor of ``dtype``.
    """
    int_dtype = _INT_OF.get(dtype)
    if int_dtype is None:
        raise TypeError(f"kth_largest works on float32 or float64 magnitudes, not {dtype}")
    bits = torch.finfo(dtype).bits
    prefix = torch.zeros(rows, dtype=torch.int64)
    remaining = torch.full((rows,), int(rank), dtype=torch.int64)
    row_base = (torch.arange(rows, dtype=torch.int64) * _BINS)[:, None]
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        counts = torch.zeros(rows * _BINS, dtype=torch.int64)
        seen = torch.zeros(rows, dtype=torch.int64)
        for chunk in passes():
            if chunk.dtype != dtype or chunk.dim() != 2 or chunk.shape[0] != rows:
                raise ValueError(f"kth_largest: expected ({rows}, c) {dtype} chunks, got {tuple(chunk.shape)} {chunk.dtype}")
            pattern = chunk.view(int_dtype).to(torch.int64) if int_dtype is torch.int32 else chunk.view(int_dtype)
            digit = (pattern >> shift) & (_BINS - 1)
            index = digit + row_base
            if shift + _DIGIT < bits:  # only values whose higher digits equal the prefix found so far
                index = index[(pattern >> (shift + _DIGIT)) == prefix[:, None]]
            else:
                seen += chunk.shape[1]
                index = index.reshape(-1)
            counts += torch.bincount(index, minlength=rows * _BINS)
        if shift + _DIGIT == bits and bool((seen < remaining).any()):
            raise ValueError(f"kth_largest: rank {rank} exceeds the {int(seen.min())} values of a row")
        # at_or_above[r, j]: values of row r among the candidates whose digit is >= 65535 - j
        at_or_above = counts.view(rows, _BINS).flip(1).cumsum(1)
        position = torch.searchsorted(at_or_above, remaining[:, None]).squeeze(1)
        digit_value = _BINS - 1 - position
        above = at_or_above.gather(1, position[:, None]).squeeze(1) - counts.view(rows, _BINS).gather(
            1, digit_value[:, None]).squeeze(1)
        remaining -= above
        prefix = (prefix << _DIGIT) | digit_value
    if int_dtype is torch.int32:
        return prefix.to(torch.int32).view(torch.float32)
    return prefix.view(torch.float64)
