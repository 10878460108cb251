"""The API rules are written against: labels, parameter uses and :class:`InferContext`.

A rule is ``rule(ctx, node) -> label``: it reads the labels and shapes of the node's arguments
through ``ctx``, restricts the symmetry group through ``ctx`` (unify axes, fix them, give a
space block structure, tie head permutations) and returns the label of the node's output
(a :class:`TensorLabel` per tensor, tuples for tuple outputs, ``None`` for non-tensors).

Soundness contract (checked by the driver, not trusted): every axis of every tensor the rule
consumes (its tensor arguments, and the parameters it asks for with :meth:`InferContext.param`)
must be *accounted for* by the rule: unified with another axis, fixed, declared
:meth:`~InferContext.invariant` (a reduction), given structure, or passed on in the output
label. An axis the rule does not account for is fixed after the rule, with the node and the
rule named in the reason: a tensor axis is FIXED unless a rule gives it a layout.

Axis labels: ``None`` (fixed), a layout (``Plain`` / ``Concat`` / ``Kron`` of spaces),
``Within(s)`` (the within-block index of blocked space s, beside its head axis) or
``Parts(spaces)`` (an axis enumerating the parts of a fused projection); see ``unify``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.fx as fx
from torch import nn

from ..ir.graph import Barrier
from ..ir.layout import Fixed, Layout, Plain, spaces_of
from ..ir.values import TensorValue, value_of
from .unify import AxisLabel, Parts, SpaceTable, Within

__all__ = ["AxisLabel", "Within", "Parts", "TensorLabel", "fixed_label", "ParamUse", "InferContext",
           "NotATensor", "RuleError", "op_name", "label_spaces"]


@dataclass(frozen=True)
class TensorLabel:
    """One axis label per axis of a tensor value."""
    axes: tuple[AxisLabel, ...]

    def __len__(self) -> int:
        return len(self.axes)

    def __getitem__(self, i):
        return self.axes[i]

    def replace(self, i: int, label: AxisLabel) -> "TensorLabel":
        ax = list(self.axes)
        ax[i] = label
        return TensorLabel(tuple(ax))


def fixed_label(ndim: int) -> TensorLabel:
    return TensorLabel((None,) * ndim)


@dataclass
class ParamUse:
    """One use of a parameter/buffer at one call site: per axis a layout slot (a fresh space
    until a rule unifies it), a role and a groups count (see ``Member``)."""
    fqn: str
    shape: tuple[int, ...]
    layouts: list[Optional[Layout]]
    roles: list[str]
    groups: list[int]

    @property
    def label(self) -> TensorLabel:
        return TensorLabel(tuple(self.layouts))

    def mark_in(self, axis: int) -> None:
        """The axis consumes units (a weight's input axis): it is unmerged with U."""
        self.roles[axis % len(self.roles)] = "in"

    def set_grouped_input(self, axis: int, layout: Layout, groups: int) -> None:
        """The short input axis of a grouped weight: ``layout`` is the full (blocked) input
        space; each row reads the within-group indices of its own group."""
        self.layouts[axis] = layout
        self.groups[axis] = groups
        self.mark_in(axis)


class NotATensor(Exception):
    """Raised by ``ctx.tlabel`` / ``ctx.shape`` for an argument that is not a tensor."""


class RuleError(RuntimeError):
    """A rule failed on a node: the message names the node, its op and the rule."""


def label_spaces(label: Any) -> Iterator[int]:
    """Every space id an axis label mentions (Within / Parts included)."""
    if label is None:
        return
    if isinstance(label, Within):
        yield label.space
    elif isinstance(label, Parts):
        yield from label.spaces
    else:
        yield from spaces_of(label)


def op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {t}"
    if node.op == "call_method":
        return f"Tensor.{t}"
    if callable(t):
        mod = getattr(t, "__module__", None) or ""
        return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")
    return str(t)


def flat_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


class InferContext:
    """What a rule may read and do. Rules go through these methods only; the union-find
    (``SpaceTable``) behind them is private to inference."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        self.gm = gm
        self.model = model
        self._table = SpaceTable()
        self.labels: dict[fx.Node, Any] = {}
        self.uses: list[ParamUse] = []
        self._use_of_node: dict[fx.Node, ParamUse] = {}
        self.barriers: list[Barrier] = []
        self.in_taps: list[tuple[str, int, Layout, Any]] = []
        self.out_taps: list[tuple[str, int, Layout, Any]] = []
        self.producers: list[tuple[str, Layout]] = []
        self._touched: Optional[set[int]] = None
        named: dict[str, torch.Tensor] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            named[n] = p
        for n, b in model.named_buffers(remove_duplicate=False):
            named[n] = b
        first: dict[int, str] = {}
        self.canonical: dict[str, str] = {}
        for n, t in named.items():
            self.canonical[n] = first.setdefault(id(t), n)
        self.tensors = named

    @property
    def table(self) -> SpaceTable:
        """The union-find, for the inference driver only (rules use the methods below)."""
        return self._table

    # -- reading ----------------------------------------------------------------------
    def label(self, arg: Any) -> Any:
        """Resolved label of an argument: TensorLabel for tensors, tuples for tuples, None else."""
        if isinstance(arg, fx.Node):
            return self._resolve_any(self.labels.get(arg))
        if isinstance(arg, (tuple, list)):
            return tuple(self.label(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.label(a) for k, a in arg.items()}
        return None

    def _resolve_any(self, lab: Any) -> Any:
        if isinstance(lab, TensorLabel):
            return TensorLabel(tuple(self._table.resolve_label(a) for a in lab.axes))
        if isinstance(lab, tuple):
            return tuple(self._resolve_any(x) for x in lab)
        if isinstance(lab, dict):
            return {k: self._resolve_any(x) for k, x in lab.items()}
        return lab

    def tlabel(self, arg: Any) -> TensorLabel:
        """The label of a tensor argument (raises NotATensor otherwise: the driver turns that
        into a barrier)."""
        lab = self.label(arg)
        if not isinstance(lab, TensorLabel):
            raise NotATensor(arg)
        return lab

    @staticmethod
    def shape(arg: Any) -> tuple[int, ...]:
        v = value_of(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(v, TensorValue):
            raise NotATensor(arg)
        return v.shape

    @staticmethod
    def is_tensor(arg: Any) -> bool:
        return isinstance(arg, fx.Node) and isinstance(value_of(arg), TensorValue)

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def resolve(self, label: AxisLabel) -> AxisLabel:
        """An axis label in terms of the current root spaces (None when it became fixed)."""
        return self._table.resolve_label(label)

    def resolve_layout(self, layout: Layout) -> Layout:
        return self._table.resolve(layout)

    def find(self, space: int) -> int:
        return self._table.find(space)

    def space_size(self, space: int) -> int:
        return self._table.space_size(space)

    def head_of(self, space: int) -> Optional[int]:
        """The head space of blocked space ``space`` (None when it has no block structure)."""
        return self._table.head_of(space)

    def blocks_of(self, space: int) -> Optional[tuple[int, int]]:
        return self._table.blocks[self._table.find(space)]

    def is_head_space(self, space: int) -> bool:
        return self._table.is_head[self._table.find(space)]

    def fix_events(self) -> int:
        """A counter that grows whenever a space becomes fixed or a conflict is recorded."""
        return self._table.events

    # -- parameters -------------------------------------------------------------------
    def param(self, fqn: str) -> Optional[ParamUse]:
        """A fresh use of parameter/buffer ``fqn`` (None if the model has no such tensor).
        Every axis of it must be accounted for by the calling rule (else it is fixed)."""
        t = self.tensors.get(fqn)
        if t is None:
            return None
        use = ParamUse(fqn, tuple(t.shape), [Plain(self._table.new(n)) if n > 1 else None for n in t.shape],
                       ["out"] * t.dim(), [1] * t.dim())
        self.uses.append(use)
        return use

    def use_of(self, arg: Any) -> Optional[ParamUse]:
        """The parameter use of a ``get_attr`` argument (None for anything else)."""
        return self._use_of_node.get(arg) if isinstance(arg, fx.Node) else None

    def bind_use(self, node: fx.Node, use: ParamUse) -> None:
        self._use_of_node[node] = use

    def weight_sources(self, node: fx.Node) -> tuple[ParamUse, ...]:
        """The parameter uses a value is computed from when it depends on parameters only
        (a weight computed in forward); () when it also depends on the model's inputs."""
        seen: set[fx.Node] = set()
        found: list[ParamUse] = []
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                return ()
            use = self._use_of_node.get(n)
            if use is not None:
                found.append(use)
                continue
            stack.extend(flat_args(n))
        return tuple(found)

    def mark_in_through(self, sources: Iterable[ParamUse], label: AxisLabel, why: str) -> None:
        """Mark as input (unmerged with U) the axis of each source parameter that carries the
        same space as ``label``; an axis that cannot be told apart from another is fixed."""
        T = self._table
        label = T.resolve_label(label)
        if isinstance(label, Within):
            # the within-block index of a blocked space: a source axis carrying that whole space
            # (a flat [out * in] weight viewed as [out, in]) holds the head's units, block by
            # block, so it stays an `out` axis
            return
        want = {T.find(s) for s in label_spaces(label)}
        if not want:
            return
        for use in sources:
            hits = [j for j, lay in enumerate(use.layouts)
                    if {T.find(s) for s in label_spaces(T.resolve_label(lay))} == want]
            if len(hits) == 1:
                use.mark_in(hits[0])
            elif len(hits) > 1:
                self.fix(label, f"{why}: several axes of {use.fqn} carry the same space")

    # -- effects ----------------------------------------------------------------------
    def _touch(self, label: Any) -> None:
        if self._touched is not None:
            self._touched.update(label_spaces(label))

    def unify(self, a: AxisLabel, b: AxisLabel, why: str = "elementwise") -> AxisLabel:
        """Two axes must carry the same permutation; returns their common label."""
        self._touch(a)
        self._touch(b)
        return self._table.unify(a, b, why)

    def fix(self, label: Any, reason: str) -> None:
        """Fix an axis label, a TensorLabel, or every tensor label in a tuple/dict."""
        if isinstance(label, TensorLabel):
            for a in label.axes:
                self.fix(a, reason)
        elif isinstance(label, (tuple, list)):
            for x in label:
                self.fix(x, reason)
        elif isinstance(label, dict):
            for x in label.values():
                self.fix(x, reason)
        elif label is not None:
            self._touch(label)
            self._table.fix_label(label, reason)

    def fix_space(self, space: int, reason: str) -> None:
        self._touch(Plain(space))
        self._table.fix_space(space, reason)

    def invariant(self, label: AxisLabel) -> None:
        """The op is invariant under any permutation of this axis (a reduction over it): the
        axis is accounted for and simply disappears."""
        self._touch(label)

    def new_space(self, size: int) -> int:
        return self._table.new(size)

    def set_blocks(self, space: int, groups: int, group_size: int) -> bool:
        """Give ``space`` the structure blocks(groups, group_size); False if impossible."""
        self._touch(Plain(space))
        return self._table.set_blocks(space, groups, group_size)

    def tie(self, a: int, b: int) -> None:
        """Blocked spaces a and b share one block (head) permutation."""
        self._touch(Plain(a))
        self._touch(Plain(b))
        self._table.tie(a, b)

    def identity_within(self, space: int) -> None:
        """Blocked space ``space`` may move whole blocks only (no within-block permutation)."""
        self._touch(Within(space))
        self._table.identity_within(space)

    def split_space(self, space: int, sizes: list[int]) -> Optional[Layout]:
        self._touch(Plain(space))
        return self._table.split(space, sizes)

    def refine(self, layout: Layout, cuts: Iterable[int]) -> Optional[list[Layout]]:
        """``layout`` cut into consecutive pieces ending at ``cuts`` (None if impossible)."""
        self._touch(layout)
        return self._table.refine(layout, cuts)

    def barrier(self, node: fx.Node, reason: str) -> None:
        """Everything the node reads is fixed; recorded with the node and the reason."""
        why = f"barrier at {node.name}: {reason}"
        for a in flat_args(node):
            self.fix(self.label(a), why)
        self.barriers.append(Barrier(node.name, op_name(node), reason))

    def note_barrier(self, node: fx.Node, reason: str) -> None:
        """Record a structural barrier (the rule already fixed what it touches)."""
        self.barriers.append(Barrier(node.name, op_name(node), reason))

    def tap(self, node: fx.Node, axis: int, layout: AxisLabel, *, out: bool = False,
            proj: Any = None) -> None:
        """Activations of the layout's spaces can be read at axis ``axis`` of ``node``'s value
        (``out``: a producer's output rather than a weight's input)."""
        if layout is None or isinstance(layout, (Within, Parts, Fixed)):
            return
        (self.out_taps if out else self.in_taps).append((node.name, axis, layout, proj))

    def producer(self, node: fx.Node, layout: AxisLabel, size: int) -> None:
        """Record ``size`` output units of a weight-carrying op (for coverage)."""
        ok = layout is not None and not isinstance(layout, (Within, Parts))
        self.producers.append((node.name, layout if ok else Fixed(size)))

    # -- the soundness contract (driver side) -------------------------------------------
    def begin_rule(self) -> int:
        self._touched = set()
        return len(self.uses)

    def end_rule(self, node: fx.Node, rule_name: str, out: Any, first_use: int) -> None:
        """Fix every consumed axis that the rule did not account for (see module docstring)."""
        touched, self._touched = self._touched or set(), None
        T = self._table
        for s in _label_tree_spaces(out):
            touched.add(s)
        roots = {T.find(r) for s in touched for r in spaces_of(T.resolve(Plain(s)))} | \
                {T.find(s) for s in touched}
        # a blocked space carries its block structure: its head axis is accounted for with it
        # (a [heads, within] pair flattened into one axis)
        roots |= {h for h in (T.head_of(r) for r in list(roots)) if h is not None}
        consumed: list[tuple[str, int, AxisLabel]] = []
        for a in flat_args(node):
            lab = self.label(a)
            if isinstance(lab, TensorLabel):
                consumed += [(a.name, k, x) for k, x in enumerate(lab.axes)]
        for use in self.uses[first_use:]:
            consumed += [(use.fqn, k, x) for k, x in enumerate(use.layouts)]
        for name, k, lab in consumed:
            lab = T.resolve_label(lab)
            spaces = {T.find(s) for s in label_spaces(lab)}
            if spaces and not spaces & roots:
                T.fix_label(lab, f"axis {k} of {name} is not handled by {rule_name} at {node.name}")


def _label_tree_spaces(lab: Any) -> Iterator[int]:
    if isinstance(lab, TensorLabel):
        for a in lab.axes:
            yield from label_spaces(a)
    elif isinstance(lab, (tuple, list)):
        for x in lab:
            yield from _label_tree_spaces(x)
    elif isinstance(lab, dict):
        for x in lab.values():
            yield from _label_tree_spaces(x)
