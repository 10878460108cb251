"""Model libraries' own torch.fx conventions: the modules a library declares fx-unfriendly
(traced as leaves) and the helper functions it wants wrapped (recorded as one call).

timm keeps two registries for its fx feature extraction (``timm.layers._fx``:
``register_notrace_module`` / ``register_notrace_function``). :func:`trace_fx` traces with
plain torch.fx first; when tracing fails *inside* a module or function the model's library
registered, that class becomes a leaf (or that function is wrapped) and the trace is retried,
until it succeeds or fails somewhere no convention covers. Only what tracing needs becomes
opaque: a leaf or wrapped call needs a rule (``mudsc_fx.rules.timm``) or it is a barrier,
so tracing through a helper that does trace keeps its insides visible (more coverage).
"""
from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.fx as fx
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Convention:
    """One library's fx conventions: ``leaf_modules()`` and ``functions()`` read the
    library's registries (they grow as its model modules are imported); ``rule_leaves()``
    are classes always traced as leaves because a rule covers them whole."""
    library: str
    leaf_modules: Callable[[], frozenset]
    functions: Callable[[], frozenset]
    rule_leaves: Callable[[], tuple] = tuple


def _timm_leaf_modules() -> frozenset:
    from timm.layers import get_notrace_modules
    return frozenset(get_notrace_modules())


def _timm_functions() -> frozenset:
    """timm's registered helpers, and its SAME-padding helpers (shape arithmetic in Python:
    timm only calls them inside its registered leaf classes, a user's module may call them)."""
    from timm.layers import get_notrace_functions
    from timm.layers.padding import get_same_padding, pad_same
    registered = {f for f in get_notrace_functions() if isinstance(f, types.FunctionType)}
    return frozenset(registered | {get_same_padding, pad_same})


def _timm_rule_leaves() -> tuple:
    """timm layers a row in ``mudsc_fx.rules.timm`` covers whole: always leaves. Traced through,
    a weight-standardised conv is a conv with a weight computed in forward (for a grouped one,
    a barrier), and a SAME-padded layer computes its padding in Python."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    return (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, Conv2dSame, MaxPool2dSame, AvgPool2dSame)


CONVENTIONS: dict[str, Convention] = {
    "timm": Convention("timm", _timm_leaf_modules, _timm_functions, _timm_rule_leaves)}


def conventions_for(model: nn.Module) -> list[Convention]:
    """The conventions of the imported libraries (a model that uses a library's layers or
    helpers has imported it; a convention only acts where tracing fails inside the library's
    own registered modules and functions, or on the classes its rules cover whole)."""
    return [c for name, c in CONVENTIONS.items() if name in sys.modules]


@dataclass(frozen=True)
class Adopted:
    """What a trace adopted from the conventions: leaf classes and wrapped functions."""
    leaf_modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()

    def describe(self) -> str:
        names = [f"leaf {c.__module__}.{c.__qualname__}" for c in self.leaf_modules]
        names += [f"wrapped {f.__module__}.{f.__qualname__}" for f in self.functions]
        return ", ".join(names) or "nothing"


def _culprits(exc: BaseException, conventions: list[Convention], root: nn.Module) -> list[Any]:
    """The registered leaf classes and wrapped functions on the failing call stack, innermost
    first (an adopted one that did not help is followed by the next one out)."""
    if not conventions:
        return []
    leaves = frozenset().union(*(c.leaf_modules() for c in conventions))
    codes = {f.__code__: f for c in conventions for f in c.functions()}
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    found: list[Any] = []
    for frame in reversed(frames):  # innermost first
        fn = codes.get(frame.f_code)
        if fn is not None:
            found.append(fn)
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and owner is not root:
            found += [k for k in type(owner).__mro__ if k in leaves][:1]
    return list(dict.fromkeys(found))


def trace_fx(model: nn.Module, make_tracer: Callable[[tuple, tuple], fx.Tracer],
             concrete_args: Optional[dict] = None, max_rounds: int = 64) -> tuple[fx.Tracer, fx.Graph, Adopted]:
    """Trace ``model`` with ``make_tracer(leaf_classes, wrapped_functions)``, adopting the
    model library's conventions one by one where tracing fails inside them. The last error
    is raised when no convention covers it."""
    conventions = conventions_for(model)
    always = tuple(k for c in conventions for k in c.rule_leaves())
    leaves: list[type] = []
    functions: list[Callable] = []
    for _ in range(max_rounds):
        tracer = make_tracer(always + tuple(leaves), tuple(functions))
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            adopted = Adopted(tuple(leaves), tuple(functions))
            if leaves or functions:
                log.info("traced %s with %s", type(model).__name__, adopted.describe())
            return tracer, graph, adopted
        except Exception as e:
            found = next((c for c in _culprits(e, conventions, model) if c not in leaves and c not in functions), None)
            if found is None:
                raise
            (leaves if isinstance(found, type) else functions).append(found)
    raise RuntimeError(f"tracing {type(model).__name__} adopted {max_rounds} conventions and still fails")
