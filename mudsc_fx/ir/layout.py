"""Layouts: how the indices of one tensor axis map onto the units of channel spaces.

A layout is a small immutable tree:

- ``Plain(s)``: index i is unit i of space ``s``.
- ``Fixed(n)``: n indices that never move (only inside ``Concat`` / at the leaves).
- ``Concat(parts)``: a direct sum; part k owns the next ``size(part k)`` indices.
- ``Kron(inner, outer, inner_rep)``: index ``a * (m * r) + u * r + b`` is index u of ``inner``
  (m = size(inner), a < outer, b < inner_rep). ``Kron(L, 1, HW)`` is an NCHW flatten,
  ``Kron(L, HW, 1)`` the NHWC one.

Every transform in the package acts on a tensor axis through its layout with
:func:`transform_axis`, so a new layout kind is added here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch


@dataclass(frozen=True)
class Plain:
    space: int


@dataclass(frozen=True)
class Fixed:
    n: int


@dataclass(frozen=True)
class Concat:
    parts: tuple["Layout", ...]


@dataclass(frozen=True)
class Kron:
    inner: "Layout"
    outer: int
    inner_rep: int


Layout = Union[Plain, Fixed, Concat, Kron]


def layout_size(layout: Layout, space_size: Callable[[int], int]) -> int:
    if isinstance(layout, Plain):
        return space_size(layout.space)
    if isinstance(layout, Fixed):
        return layout.n
    if isinstance(layout, Concat):
        return sum(layout_size(p, space_size) for p in layout.parts)
    return layout.outer * layout.inner_rep * layout_size(layout.inner, space_size)


def spaces_of(layout: Layout) -> Iterator[int]:
    """Every space id the layout mentions (with repeats)."""
    if isinstance(layout, Plain):
        yield layout.space
    elif isinstance(layout, Concat):
        for p in layout.parts:
            yield from spaces_of(p)
    elif isinstance(layout, Kron):
        yield from spaces_of(layout.inner)


def map_spaces(layout: Layout, fn: Callable[[int], "Layout"]) -> Layout:
    """Replace every ``Plain(s)`` by ``fn(s)`` and normalise the result."""
    if isinstance(layout, Plain):
        return fn(layout.space)
    if isinstance(layout, Fixed):
        return layout
    if isinstance(layout, Concat):
        return concat([map_spaces(p, fn) for p in layout.parts])
    return kron(map_spaces(layout.inner, fn), layout.outer, layout.inner_rep)


def concat(parts: list[Layout]) -> Layout:
    """Normal form: nested concats flattened, neighbouring Fixed parts joined."""
    flat: list[Layout] = []
    for p in parts:
        for q in (p.parts if isinstance(p, Concat) else (p,)):
            if isinstance(q, Fixed) and flat and isinstance(flat[-1], Fixed):
                flat[-1] = Fixed(flat[-1].n + q.n)
            elif not (isinstance(q, Fixed) and q.n == 0):
                flat.append(q)
    return flat[0] if len(flat) == 1 else Concat(tuple(flat))


def kron(inner: Layout, outer: int, inner_rep: int) -> Layout:
    if isinstance(inner, Fixed):
        return Fixed(inner.n * outer * inner_rep)
    if outer == 1 and inner_rep == 1:
        return inner
    if isinstance(inner, Kron):
        return Kron(inner.inner, outer * inner.outer, inner.inner_rep * inner_rep)
    return Kron(inner, outer, inner_rep)


def is_fixed(layout: Layout | None) -> bool:
    return layout is None or isinstance(layout, Fixed)


def transform_axis(t: torch.Tensor, axis: int, layout: Layout,
                   space_op: Callable[[int, torch.Tensor, int], torch.Tensor],
                   space_size: Callable[[int], int]) -> torch.Tensor:
    """Apply ``space_op(space, tensor, axis)`` to every index range of ``axis`` that a
    ``Plain`` leaf of ``layout`` owns. ``space_op`` may change the axis length (zip merges
    map n units to a different width); Fixed ranges are kept as they are."""
    if isinstance(layout, Plain):
        return space_op(layout.space, t, axis)
    if isinstance(layout, Fixed):
        return t
    if isinstance(layout, Concat):
        sizes = [layout_size(p, space_size) for p in layout.parts]
        pieces = torch.split(t, sizes, dim=axis)
        return torch.cat([transform_axis(x, axis, p, space_op, space_size)
                          for x, p in zip(pieces, layout.parts)], dim=axis)
    # Kron: view the axis as (outer, m, inner_rep) and transform the middle axis.
    m = layout_size(layout.inner, space_size)
    shape = list(t.shape)
    t3 = t.reshape(shape[:axis] + [layout.outer, m, layout.inner_rep] + shape[axis + 1:])
    t3 = transform_axis(t3, axis + 1, layout.inner, space_op, space_size)
    new_m = t3.shape[axis + 1]
    return t3.reshape(shape[:axis] + [layout.outer * new_m * layout.inner_rep] + shape[axis + 1:])


def split_features(x: torch.Tensor, layout: Layout, space_size: Callable[[int], int]) -> list[tuple[int, torch.Tensor]]:
    """Split features ``x`` [samples, size(layout)] into (space, [samples', n]) blocks: each
    ``Plain`` leaf's units as features (a ``Kron`` leaf's repeats become more samples);
    Fixed indices are dropped."""
    if isinstance(layout, Plain):
        return [(layout.space, x)]
    if isinstance(layout, Fixed):
        return []
    if isinstance(layout, Concat):
        sizes = [layout_size(p, space_size) for p in layout.parts]
        return [f for piece, p in zip(torch.split(x, sizes, dim=1), layout.parts)
                for f in split_features(piece, p, space_size)]
    m = layout_size(layout.inner, space_size)
    y = x.reshape(x.shape[0], layout.outer, m, layout.inner_rep).permute(0, 1, 3, 2).reshape(-1, m)
    return split_features(y, layout.inner, space_size)


def leaf_units(layout: Layout, space_size: Callable[[int], int]) -> list[tuple[int | None, int]]:
    """(space, or None for fixed indices; how many axis indices) for each leaf of a layout."""
    if isinstance(layout, Plain):
        return [(layout.space, space_size(layout.space))]
    if isinstance(layout, Fixed):
        return [(None, layout.n)]
    if isinstance(layout, Concat):
        return [u for p in layout.parts for u in leaf_units(p, space_size)]
    rep = layout.outer * layout.inner_rep
    return [(s, n * rep) for s, n in leaf_units(layout.inner, space_size)]


def describe(layout: Layout | None) -> str:
    if layout is None:
        return "fixed"
    if isinstance(layout, Plain):
        return f"S{layout.space}"
    if isinstance(layout, Fixed):
        return f"fixed[{layout.n}]"
    if isinstance(layout, Concat):
        return "cat(" + ", ".join(describe(p) for p in layout.parts) + ")"
    return f"kron({describe(layout.inner)}, outer={layout.outer}, inner={layout.inner_rep})"
