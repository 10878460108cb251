"""Submodule calls as stand-alone models: record what a submodule receives in a real forward of
the whole model, and wrap one call as a module whose inputs are just the call's tensors.

The compositional fallback (``compose``) traces, proves and merges such wrapped calls; the
wrapper keeps the submodule under ``inner``, so its parameter names are the submodule's own
names prefixed with ``inner.``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..ir.inputs import call_model

PREFIX = "inner."

_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, type(Ellipsis))


@dataclass(frozen=True)
class Call:
    """One call of a submodule: the tensor leaves of ``(args, kwargs)`` in order, the tree
    structure, and the other leaves (constants, baked into a trace) by leaf index.
    ``unsupported`` names a leaf type that is neither a tensor nor a plain constant."""
    tensors: tuple[torch.Tensor, ...]
    spec: pytree.TreeSpec
    constants: tuple[tuple[int, Any], ...]
    unsupported: Optional[str] = None

    def signature(self) -> tuple:
        """What a trace of this call bakes in: the tree structure and the constants."""
        return (self.spec, self.constants)


def make_call(args: tuple, kwargs: dict, keep_tensors: bool = True) -> Call:
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensors, constants, unsupported = [], [], None
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            # a clone: the submodule (or a later in-place op) may modify its input
            tensors.append(leaf.detach().clone() if keep_tensors else torch.empty(0))
        elif isinstance(leaf, _CONSTANTS):
            constants.append((i, leaf))
        elif unsupported is None:
            unsupported = type(leaf).__name__
    return Call(tuple(tensors), spec, tuple(constants), unsupported)


def same_signature(calls: Iterable[Call]) -> bool:
    """True when every call has the first call's structure and constants (one trace fits all)."""
    calls = list(calls)
    ref = calls[0].signature()
    for c in calls[1:]:
        try:
            if c.signature() != ref:
                return False
        except Exception:  # constants that cannot be compared
            return False
    return True


def record_calls(model: nn.Module, inputs: Any, paths: Optional[Iterable[str]] = None, *,
                 keep: str = "first") -> dict[str, list[Call]]:
    """Run ``model`` once on ``inputs`` (no grad; a tensor, a tuple of positional inputs, a
    dict of keyword inputs or a ``ModelCall``) and record every call of the submodules at
    ``paths`` (all submodules when None). ``keep="first"`` keeps the tensors of each module's
    first call only (later calls keep their structure and constants); ``keep="all"`` keeps all."""
    wanted = None if paths is None else set(paths)
    calls: dict[str, list[Call]] = {}
    handles = []
    for path, mod in model.named_modules():
        if wanted is not None and path not in wanted:
            continue

        def hook(_m, args, kwargs, _p=path):
            own = calls.setdefault(_p, [])
            own.append(make_call(args, kwargs, keep_tensors=keep == "all" or not own))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


class CallModule(nn.Module):
    """``inner`` called with one recorded call's structure and constants; the inputs are
    the call's tensors (positional), the outputs the tensor leaves of what ``inner`` returns."""

    def __init__(self, inner: nn.Module, call: Call):
        super().__init__()
        self.inner = inner
        self._spec = call.spec
        self._constants = call.constants
        self._n_leaves = len(call.tensors) + len(call.constants)

    def _call(self, tensors: tuple) -> tuple:
        leaves: list[Any] = [None] * self._n_leaves
        for i, v in self._constants:
            leaves[i] = v
        it = iter(tensors)
        fixed = {i for i, _ in self._constants}
        for i in range(self._n_leaves):
            if i not in fixed:
                leaves[i] = next(it)
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        out = self.inner(*args, **kwargs)
        return tuple(pytree.tree_leaves(out))


_CLASSES: dict[int, type] = {}


def call_module_class(n: int) -> type:
    """A CallModule subclass whose forward takes ``n`` named tensors. torch.fx makes one
    placeholder per named argument and cannot trace ``*args``, so the signature is generated;
    one class per arity, so the wrappers of N models share their class (as merging requires)."""
    cls = _CLASSES.get(n)
    if cls is None:
        names = [f"t{i}" for i in range(n)]
        src = f"def forward(self{''.join(', ' + a for a in names)}):\n" \
              f"    return self._call(({''.join(a + ', ' for a in names)}))\n"
        namespace: dict[str, Any] = {}
        exec(compile(src, f"<mudsc_fx call wrapper {n}>", "exec"), namespace)  # noqa: S102
        cls = type(f"Call{n}", (CallModule,), {"forward": namespace["forward"], "__module__": __name__})
        _CLASSES[n] = cls
    return cls


def wrap_call(inner: nn.Module, call: Call) -> CallModule:
    return call_module_class(len(call.tensors))(inner, call)
