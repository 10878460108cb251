"""The torch.export front end: an ATen-level graph in the form the passes read.

``torch.export.export(model, args, kwargs, strict=False)`` traces what torch.fx cannot
(Python control flow on shapes, decorated ``**kwargs`` forwards, item assignment: Hugging
Face transformers 5.x). Its graph lifts parameters, buffers and constants to placeholders;
:func:`export_trace` turns it back into the form ``trace`` produces:

- every parameter and buffer is a ``get_attr`` node whose target is the model's own
  state_dict name (the export signature maps placeholders to those names), so rules,
  statistics and rewriting address the user's tensors; the GraphModule shares them with the
  model (nothing is copied);
- the placeholders are the user inputs, flattened in the order of the export's input spec
  (tensors and the Python values the call passed, e.g. ``use_cache=False``), then the lifted
  constant tensors; :func:`mudsc_fx.ir.trace.graph_inputs` produces their values from a
  batch, so a graph copied from this one (statistics taps) runs on the same call;
- with ``dynamic`` the batch axis of every input tensor is ``Dim.AUTO``: it stays symbolic
  where the model allows it (an example batch of one sample is specialised), so calibration
  batches of another batch size (a DataLoader's last batch) run on the same graph; every other
  axis is specialised to the example's size.

The merged model is the user's own class: the graph is only read, never run as the result.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .inputs import INPUTS_KEY, ModelCall, flat_tensors
from .errors import TraceError, user_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportInputs:
    """How a call maps onto an exported graph's placeholders: the pytree spec of
    ``(args, kwargs)``, the shape every input tensor leaf must have on its specialised axes
    (None where the axis is symbolic), and the lifted constants that follow the inputs."""
    in_spec: Any
    names: tuple[str, ...]
    shapes: tuple[Optional[tuple[Optional[int], ...]], ...]
    constants: tuple[torch.Tensor, ...]
    # the example's non-tensor inputs: export specialised the graph on them (use_cache=False)
    values: tuple[Any, ...] = ()
    keyword_values: tuple[tuple[str, Any], ...] = ()

    def flatten(self, call: ModelCall) -> tuple:
        kwargs = dict(self.keyword_values)
        kwargs.update(call.kwargs)
        try:
            leaves = _flatten_to_spec((tuple(call.args), kwargs), self.in_spec)
        except Exception as e:
            raise TypeError(f"the inputs do not match the exported graph's inputs ({', '.join(self.names)}): "
                            f"{type(e).__name__}: {e}") from None
        for name, v, shape, ref in zip(self.names, leaves, self.shapes, self.values):
            if not isinstance(ref, torch.Tensor) and not isinstance(v, torch.Tensor) and v != ref:
                raise ValueError(f"input {name!r} is {v!r}, but the graph was exported with {ref!r}: "
                                 "export fixes Python values; trace again with this value")
            if shape is None or not isinstance(v, torch.Tensor):
                continue
            if v.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, v.shape)):
                want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"input {name!r} has shape {tuple(v.shape)}, but the exported graph needs {want} "
                                 "(* = any size): torch.export specialised the other axes on the example inputs")
        return tuple(leaves) + self.constants


def _flatten_to_spec(tree: Any, spec: Any) -> list:
    leaves, got = pytree.tree_flatten(tree)
    if got == spec:
        return leaves
    # keyword inputs in another order, or extra keys the graph does not take: read by name
    args, kwargs = tree
    want_args, want_kwargs = pytree.tree_unflatten([object()] * spec.num_leaves, spec)
    if len(args) != len(want_args):
        raise ValueError(f"{len(args)} positional inputs, the graph takes {len(want_args)}")
    missing = [k for k in want_kwargs if k not in kwargs]
    if missing:
        raise KeyError(f"missing keyword inputs {missing}")
    extra = [k for k in kwargs if k not in want_kwargs]
    if extra:
        raise KeyError(f"keyword inputs {extra} were not in the example the graph was exported with")
    leaves, got = pytree.tree_flatten((args, {k: kwargs[k] for k in want_kwargs}))
    if got != spec:
        raise ValueError("the structure of the inputs differs from the example's")
    return leaves


def _dynamic_shapes(call: ModelCall) -> Any:
    """Dim.AUTO on the batch axis of every input tensor, keyed like the wrapper's
    forward(*args, **kwargs). Only the batch axis: calibration batches share every other size
    with the first batch, and each symbolic axis makes export slower."""
    auto = torch.export.Dim.AUTO

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {0: auto} if v.dim() else None
        if isinstance(v, (tuple, list)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    out = {}
    if call.args:
        out["args"] = spec(tuple(call.args))
    if call.kwargs:
        out["kwargs"] = spec(dict(call.kwargs))
    return out


class _TensorLeaves(nn.Module):
    """The model with its output flattened to a tuple of tensors: export accepts only outputs
    whose types pytree knows, and every output tensor is a barrier anyway. Its parameters are
    the model's under the prefix ``model.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return tuple(flat_tensors(self.model(*args, **kwargs)))


def _run_export(model: nn.Module, call: ModelCall, dynamic: bool):
    args, kwargs = tuple(call.args), dict(call.kwargs)
    try:
        ds = _dynamic_shapes(call) if dynamic else None
        return torch.export.export(_TensorLeaves(model), args, kwargs, dynamic_shapes=ds, strict=False)
    except Exception as e:
        if not dynamic:
            raise TraceError(f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
                             f"{_first_lines(e)}\n  at {user_frame(e)}") from e
        log.info("dynamic export of %s failed (%s); exporting with the example's shapes",
                 type(model).__name__, type(e).__name__)
        return _run_export(model, call, False)


def _first_lines(e: BaseException, n: int = 6) -> str:
    return "\n".join(str(e).strip().splitlines()[:n])


def export_trace(model: nn.Module, call: ModelCall, *, dynamic: bool = True) -> fx.GraphModule:
    """Export ``model`` on ``call`` and return the graph with parameters as ``get_attr`` of
    their state_dict names (see the module docstring). Shapes are not recorded here."""
    from torch.export.graph_signature import InputKind

    ep = _run_export(model, call, dynamic)
    src = ep.graph_module.graph
    specs = ep.graph_signature.input_specs
    phs = [n for n in src.nodes if n.op == "placeholder"]
    if len(phs) != len(specs):  # pragma: no cover - torch guarantees this
        raise TraceError(f"torch.export gave {len(phs)} placeholders for {len(specs)} input specs")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    names, shapes, consts = [], [], []
    for node, spec in zip(phs, specs):
        if spec.kind == InputKind.USER_INPUT:
            env[node] = graph.node_copy(node, lambda n: env[n])
            names.append(node.name)
            shapes.append(_static_shape(node.meta.get("val")))
    for node, spec in zip(phs, specs):
        if spec.kind == InputKind.CONSTANT_TENSOR:
            env[node] = graph.placeholder(f"_const_{len(consts)}")
            env[node].meta = dict(node.meta)
            consts.append(ep.constants[spec.target])
        elif spec.kind not in (InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER):
            raise TraceError(f"torch.export graph of {type(model).__name__} has an input of kind "
                             f"{spec.kind.name} ({spec.target}), which mudsc_fx does not read")
    root: dict[str, Any] = {}
    for node, spec in zip(phs, specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and node.users:
            target = spec.target.removeprefix("model.")
            root[target] = _model_tensor(model, target)
            env[node] = graph.get_attr(target)
            env[node].meta = dict(node.meta)
    for node in src.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(root, graph, type(model).__name__)
    names = _input_names(model, call, len(names))
    values = tuple(pytree.tree_leaves((tuple(call.args), dict(call.kwargs))))
    if len(values) != len(names):  # pragma: no cover - one placeholder per input leaf
        values = (torch.empty(0),) * len(names)
    keyword_values = tuple((k, v) for k, v in call.kwargs.items() if not pytree.tree_leaves(v)
                           or not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v)))
    gm.meta[INPUTS_KEY] = ExportInputs(ep.call_spec.in_spec, tuple(names), tuple(shapes), tuple(consts),
                                       values, keyword_values)
    return gm


def _input_names(model: nn.Module, call: ModelCall, n: int) -> list[str]:
    """A readable name per input leaf: the forward's parameter name or the keyword, with the
    index or key inside containers (``input_ids``, ``pixel_values``, ``inputs[1]``)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    out = []
    for path, _ in pytree.tree_flatten_with_path((tuple(call.args), dict(call.kwargs)))[0]:
        top, rest = path[1], path[2:]
        if path[0].idx == 0:
            name = params[top.idx] if top.idx < len(params) else f"input {top.idx}"
        else:
            name = str(top.key)
        out.append(name + "".join(str(k) for k in rest))
    return out if len(out) == n else [f"input {i}" for i in range(n)]


def _static_shape(val: Any) -> Optional[tuple[Optional[int], ...]]:
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else None for d in val.shape)


def _model_tensor(model: nn.Module, target: str) -> torch.Tensor:
    mod_name, _, attr = target.rpartition(".")
    try:
        return getattr(model.get_submodule(mod_name) if mod_name else model, attr)
    except AttributeError:  # pragma: no cover - the export signature names the model's tensors
        raise TraceError(f"torch.export named a tensor {target!r} that {type(model).__name__} does not have") from None
