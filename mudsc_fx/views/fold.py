"""Fold runs of identical blocks (12 encoder layers, 18 Swin blocks) into one drawn block.

Two consecutive blocks are identical when their items have the same kinds, module chains
(relative to the block), space sizes and structure, status, and read and write the same bands:
a folded block stands for every copy, and keeps the spaces of each (``Item.copies``), so the
page can still list and find every space.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

from ..ir.graph import PermutationGraph
from .outline import Item

_LAST_INDEX = re.compile(r"\d+$")
_DIGITS = re.compile(r"\d+")


def _runs(items: Sequence[Item]) -> list[list[Item]]:
    """Consecutive items grouped by block (items outside any block stand alone)."""
    out: list[list[Item]] = []
    for it in items:
        if out and it.block and out[-1][0].block == it.block:
            out[-1].append(it)
        else:
            out.append([it])
    return out


def _signature(pg: PermutationGraph, group: list[Item]):
    block = group[0].block
    if not block:
        return None
    shape = []
    for it in group:
        spaces = tuple((pg.spaces[s].size, pg.spaces[s].kind, pg.spaces[s].blocks, pg.spaces[s].within,
                        pg.is_free(s), tuple(sorted(_DIGITS.sub("#", r) for r in pg.spaces[s].fixed_by)))
                       for s in it.spaces)
        # node names differ between copies (view_10, view_12): compare the reasons without numbers
        shape.append((it.kind, it.label if it.kind != "barrier" else "", spaces, it.reads, it.writes, _DIGITS.sub("#", it.note)))
    return _LAST_INDEX.sub("#", block), tuple(shape)


def fold(pg: PermutationGraph, items: Sequence[Item], min_run: int = 3) -> tuple[Item, ...]:
    """Items with every run of at least ``min_run`` identical consecutive blocks drawn once."""
    groups = _runs(items)
    sigs = [_signature(pg, g) for g in groups]
    out: list[Item] = []
    k = 0
    while k < len(groups):
        j = k + 1
        while sigs[k] is not None and j < len(groups) and sigs[j] == sigs[k]:
            j += 1
        if j - k >= min_run:
            run = groups[k:j]
            for idx, it in enumerate(run[0]):
                out.append(replace(it, copies=tuple(g[idx].spaces for g in run),
                                   blocks=tuple(g[0].block for g in run)))
        else:
            for g in groups[k:j]:
                out.extend(g)
        k = j
    return tuple(out)


def should_fold(items: Sequence[Item], mode: str) -> bool:
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"fold must be 'auto', 'always' or 'never', got {mode!r}")
    return mode == "always" or (mode == "auto" and len(items) > 24)
