"""Stage 1: trace a model (torch.fx, or torch.export when fx cannot) and record what every
node produces.

:func:`trace` returns a ``GraphModule`` whose nodes carry one frozen record each under
``node.meta[META_KEY]`` (shape propagation with the example inputs, in eval mode); read it
with :func:`mudsc_fx.ir.values.value_of`. Inputs are handled by :mod:`.inputs`, the records
by :mod:`.values`, the export front end by :mod:`.export`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import conventions
from .errors import TraceError, user_frame
from .inputs import ModelCall, eval_mode, graph_inputs, model_call
from .values import META_KEY, abstract

log = logging.getLogger(__name__)

class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...] = (), autowrap_functions: tuple = ()):
        super().__init__(autowrap_functions=autowrap_functions)
        self._leaf_types = leaf_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


def _mutable(a: Any) -> Any:
    """fx hands a node's list/dict arguments over as immutable containers; a helper that
    edits its argument in place (torchvision's video Swin) needs the plain ones that the
    GraphModule's generated code passes."""
    if isinstance(a, list):
        return [_mutable(x) for x in a]
    if type(a) is tuple:
        return tuple(_mutable(x) for x in a)
    if isinstance(a, dict):
        return {k: _mutable(v) for k, v in a.items()}
    return a


class _ShapeRecorder(fx.Interpreter):
    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:  # name the node: a bare torch error from deep inside is useless
            raise TraceError(f"running the traced graph failed at node {n.format_node()}: "
                             f"{type(e).__name__}: {e}") from e
        n.meta[META_KEY] = abstract(out)
        return out


@contextlib.contextmanager
def untouched(model: nn.Module):
    """torch.fx stores tensor constants it meets while tracing as ``_tensor_constantN``
    attributes of the traced module itself; remove them afterwards so that tracing never
    modifies the user's model (the GraphModule keeps its own references)."""
    before = set(vars(model))
    try:
        yield
    finally:
        for name in set(vars(model)) - before:
            if name.startswith("_tensor_constant"):
                delattr(model, name)


FRONTENDS = ("auto", "fx", "export")


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable[type] = (),
          concrete_args: dict[str, Any] | None = None, frontend: str = "auto",
          dynamic: bool = True) -> fx.GraphModule:
    """Trace ``model`` and record every node's output shape.

    ``frontend``: ``"fx"`` (torch.fx symbolic tracing, module calls kept as nodes), ``"export"``
    (torch.export, non-strict: an ATen-level graph whose parameters are read with get_attr
    under the model's own state_dict names) or ``"auto"``: fx, and export when fx fails.
    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``dynamic`` (export): the batch axis stays symbolic, so calibration batches of another
    batch size run on the same graph. The GraphModule shares parameters with ``model``
    (nothing is copied or changed).

    >>> import torch, mudsc_fx as mf
    >>> gm = mf.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), torch.randn(2, 4))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise ValueError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    call = model_call(example_inputs, model)
    if frontend == "export":
        return _export(model, call, dynamic)
    try:
        return _fx_trace(model, call, tuple(leaf_modules), concrete_args)
    except TraceError as fx_error:
        if frontend == "fx":
            raise
        log.info("torch.fx could not trace %s, trying torch.export: %s", type(model).__name__,
                 str(fx_error).splitlines()[0])
        try:
            return _export(model, call, dynamic)
        except TraceError as export_error:
            raise TraceError(f"{type(model).__name__} could not be traced by either front end.\n"
                             f"torch.fx: {fx_error}\ntorch.export: {export_error}") from export_error


def _export(model: nn.Module, call: ModelCall, dynamic: bool) -> fx.GraphModule:
    from .export import export_trace
    with eval_mode(model):
        gm = export_trace(model, call, dynamic=dynamic)
        record_shapes(gm, call)
    return gm


def _fx_trace(model: nn.Module, call: ModelCall, leaf_modules: tuple, concrete_args) -> fx.GraphModule:
    with eval_mode(model), untouched(model):
        try:  # with the model library's own fx conventions where plain tracing fails (timm)
            tracer, graph, _ = conventions.trace_fx(
                model, lambda leaves, fns: _Tracer(tuple(leaf_modules) + leaves, fns), concrete_args)
        except Exception as e:
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
                f"  at {user_frame(e)}\n"
                "  Fixes: make the offending submodule a leaf (trace(..., leaf_modules=[ThatClass]) — it then "
                "becomes a barrier unless a rule exists for it), pass concrete_args for Python-level flags, or "
                "wrap the helper function with torch.fx.wrap.") from e
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        record_shapes(gm, call)
    return gm


def record_shapes(gm: fx.GraphModule, inputs: Any) -> None:
    """Run ``gm`` once on ``inputs`` and store every node's abstract value (``value_of``)."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(*graph_inputs(gm, inputs))


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return gm.get_submodule(node.target)


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def flat_nodes(arg: Any) -> Sequence[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(arg, out.append)
    return out
