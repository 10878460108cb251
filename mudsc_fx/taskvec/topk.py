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
    prefix = [0] * rows  # the digits found so far, per row
    remaining = [int(rank)] * rows  # the rank still to find among the values sharing the prefix
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        top = shift + _DIGIT == bits
        counts = torch.zeros((rows, _BINS), dtype=torch.int64)
        seen = 0
        for chunk in passes():
            if chunk.dtype != dtype or chunk.dim() != 2 or chunk.shape[0] != rows:
                raise ValueError(f"kth_largest: expected ({rows}, c) {dtype} chunks, got {tuple(chunk.shape)} {chunk.dtype}")
            seen += chunk.shape[1]
            for row, pattern in enumerate(chunk.view(int_dtype)):
                if top:  # the sign bit is 0: the top digit needs no mask
                    digits = pattern >> shift
                else:  # only values whose higher digits equal the prefix found so far
                    digits = pattern[(pattern >> (shift + _DIGIT)) == prefix[row]]
                    digits = (digits >> shift) & (_BINS - 1) if shift else digits & (_BINS - 1)
                counts[row] += torch.bincount(digits, minlength=_BINS)
        if top and seen < rank:
            raise ValueError(f"kth_largest: rank {rank} exceeds the {seen} values of a row")
        # from the top digit down: the digit holding the remaining-th largest candidate
        at_or_above = counts.flip(1).cumsum(1)
        for row in range(rows):
            position = int(torch.searchsorted(at_or_above[row], remaining[row]))
            digit = _BINS - 1 - position
            remaining[row] -= int(at_or_above[row, position]) - int(counts[row, digit])
            prefix[row] = (prefix[row] << _DIGIT) | digit
    return torch.tensor(prefix, dtype=int_dtype).view(dtype)
