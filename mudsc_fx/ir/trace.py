"""Stage 1: trace a model with torch.fx and record what every node produces.

:func:`trace` returns a ``GraphModule`` whose nodes carry one frozen record each under
``node.meta[META_KEY]`` (shape propagation with the example inputs, in eval mode). Read it
with :func:`value_of`; it raises if the model was not traced by :func:`trace`.
"""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import conventions

META_KEY = "mudsc_fx.value"


class TraceError(ValueError):
    """The model could not be traced symbolically; the message says where and what to do."""


@dataclass(frozen=True)
class TensorValue:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Opaque:
    """A value that is neither a tensor, a number, nor a container of those."""
    type_name: str


def _abstract(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorValue(tuple(v.shape), v.dtype)
    if isinstance(v, (tuple, list)):
        return tuple(_abstract(x) for x in v)
    if isinstance(v, dict):
        return {k: _abstract(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.Size, slice, type(Ellipsis))):
        return tuple(v) if isinstance(v, torch.Size) else v
    return Opaque(type(v).__name__)


def value_of(node: fx.Node) -> Any:
    """The abstract value (TensorValue, tuple, number, ...) ``node`` produced while tracing."""
    try:
        return node.meta[META_KEY]
    except KeyError:
        raise RuntimeError(f"node {node.format_node()} has no shape record: run mudsc_fx.trace first") from None


def tensor_value(node: Any) -> TensorValue | None:
    if isinstance(node, fx.Node):
        v = value_of(node)
        return v if isinstance(v, TensorValue) else None
    return None


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
        n.meta[META_KEY] = _abstract(out)
        return out


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put models (and all submodules) in eval mode; restore each module's own flag after."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def as_input_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of model inputs, got {type(example_inputs).__name__}")


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


def _user_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if "/torch/" not in fr.filename and "mudsc_fx" not in fr.filename:
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}"
    return "(no user frame found)"


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable[type] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` symbolically and record every node's output shape.

    The returned GraphModule shares parameters with ``model`` (nothing is copied or changed).

    >>> import torch, mudsc_fx as mf
    >>> gm = mf.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), torch.randn(2, 4))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    with eval_mode(model), untouched(model):
        try:  # with the model library's own fx conventions where plain tracing fails (timm)
            tracer, graph, _ = conventions.trace_fx(
                model, lambda leaves, fns: _Tracer(tuple(leaf_modules) + leaves, fns), concrete_args)
        except Exception as e:
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
                f"  at {_user_frame(e)}\n"
                "  Fixes: make the offending submodule a leaf (trace(..., leaf_modules=[ThatClass]) — it then "
                "becomes a barrier unless a rule exists for it), pass concrete_args for Python-level flags, or "
                "wrap the helper function with torch.fx.wrap.") from e
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    return gm


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
