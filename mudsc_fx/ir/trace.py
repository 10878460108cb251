"""Stage 1: trace a model with torch.fx and record what every node produces.

:func:`trace` returns a ``GraphModule`` whose nodes carry one frozen record each under
``node.meta[META_KEY]`` (shape propagation with the example inputs, in eval mode). Read it
with :func:`value_of`; it raises if the model was not traced by :func:`trace`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from . import conventions

log = logging.getLogger(__name__)

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
    """Positional inputs only (kept for callers that splat a tuple); see :func:`model_call`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, ModelCall) and not example_inputs.kwargs:
        return example_inputs.args
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


# ---------------------------------------------------------------------------------------
# inputs as users have them: one place that turns a batch into the model's call arguments
# and into the traced graph's placeholders (trace, check, stats, merge and reset_bn use it)
# ---------------------------------------------------------------------------------------
INPUTS_KEY = "mudsc_fx.inputs"  # gm.meta: how a call maps onto the graph's placeholders
LABEL_KEYS = ("labels", "label")  # dropped from dict batches: targets, not model inputs


@dataclass(frozen=True)
class ModelCall:
    """A batch as the model's call arguments: ``model(*args, **kwargs)``."""
    args: tuple
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def map_tensors(self, fn: Callable[[torch.Tensor], Any]) -> "ModelCall":
        """The same call with ``fn`` applied to every tensor (nested tuples/lists/dicts too)."""
        return ModelCall(_map_tensors(self.args, fn), _map_tensors(dict(self.kwargs), fn))


def _map_tensors(v: Any, fn: Callable) -> Any:
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, tuple):
        return tuple(_map_tensors(x, fn) for x in v)
    if isinstance(v, list):
        return [_map_tensors(x, fn) for x in v]
    if isinstance(v, Mapping):
        return {k: _map_tensors(x, fn) for k, x in v.items()}
    return v


def model_call(example_inputs: Any, model: Optional[nn.Module] = None) -> ModelCall:
    """Example inputs as call arguments: a tensor, a tuple/list of positional inputs, or a
    dict (any Mapping, e.g. a tokenizer's BatchEncoding) of keyword inputs.

    For a Hugging Face model that takes ``use_cache`` and is not told otherwise, the call
    asks for no key/value cache: the cache is internal state for generation (permuted
    consistently with the weights), not an output whose value the symmetry must keep."""
    if isinstance(example_inputs, ModelCall):
        call = example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        call = ModelCall((example_inputs,))
    elif isinstance(example_inputs, (tuple, list)):
        call = ModelCall(tuple(example_inputs))
    elif isinstance(example_inputs, Mapping):
        call = ModelCall((), dict(example_inputs))
    else:
        raise TypeError(f"example inputs must be a tensor, a tuple/list of positional inputs or a dict of "
                        f"keyword inputs, got {type(example_inputs).__name__}")
    if model is not None and _is_transformers(model) and "use_cache" not in call.kwargs:
        params = _forward_params(model)
        if "use_cache" in params and params.index("use_cache") >= len(call.args):
            call = ModelCall(call.args, {**call.kwargs, "use_cache": False})
    return call


def _is_transformers(model: nn.Module) -> bool:
    return any(k.__module__.startswith("transformers.") for k in type(model).__mro__)


def _forward_params(model: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs or a prepared call (see :func:`model_call`)."""
    call = model_call(inputs, model)
    return model(*call.args, **call.kwargs)


def default_input_fn(batch: Any) -> Any:
    """The model inputs in a calibration batch: a tensor; the first item of a tuple/list
    (the rest are labels); a dict of keyword inputs (``labels``/``label`` keys dropped; a
    dict with an ``input`` key gives that value)."""
    if isinstance(batch, (torch.Tensor, ModelCall)):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return batch[0] if isinstance(batch[0], torch.Tensor) else default_input_fn(batch[0])
    if isinstance(batch, Mapping):
        if "input" in batch:
            return batch["input"]
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    raise TypeError(f"cannot find the model input in a batch of type {type(batch).__name__}: pass input_fn=")


def graph_inputs(gm: fx.GraphModule, inputs: Any) -> tuple:
    """The values of ``gm``'s placeholders, in order, for the given model inputs (what a
    GraphModule copied from ``gm``'s graph, e.g. a statistics tap module, is called with)."""
    binder = gm.meta.get(INPUTS_KEY)
    if binder is None:
        binder = _SignatureInputs([n.target for n in gm.graph.nodes if n.op == "placeholder"],
                                  inspect.signature(gm.forward))
    return binder.flatten(model_call(inputs))


@dataclass(frozen=True)
class _SignatureInputs:
    """torch.fx graphs: one placeholder per parameter of the model's forward."""
    names: list
    signature: inspect.Signature

    def flatten(self, call: ModelCall) -> tuple:
        if not call.kwargs:
            return call.args
        try:
            bound = self.signature.bind(*call.args, **call.kwargs)
        except TypeError as e:
            raise TypeError(f"inputs do not match the traced forward{self.signature}: {e}") from None
        bound.apply_defaults()
        return tuple(bound.arguments.values())


def _user_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if "/torch/" not in fr.filename and "mudsc_fx" not in fr.filename:
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}"
    return "(no user frame found)"


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
                f"  at {_user_frame(e)}\n"
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
