"""Checks on what users hand the pipeline, before any long work starts: models of one
function family (names, shapes, devices, finite values, the same module tree and traced graph),
calibration batches that match the first one, and options of the right kind. Every error names
the model, parameter, node, batch or option at fault."""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from .ir.inputs import ModelCall, model_call
from .ir.trace import untouched
from .passes.apply import named_tensors


def check_real(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def check_int(name: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def validate_models(models: Sequence[nn.Module], min_models: int = 2) -> None:
    """Clear errors for inputs that cannot be merged (named model, parameter or problem)."""
    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models must be a list of nn.Module, got {type(models).__name__}")
    if len(models) < min_models:
        raise ValueError(f"merging needs at least {min_models} models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {i} is a {type(m).__name__}, not an nn.Module")
    ref = named_tensors(models[0])
    ref_t = next((t for t in ref.values() if t.is_floating_point()), None)
    for i, m in enumerate(models):
        own = named_tensors(m)
        for name in ref:
            if name not in own:
                raise ValueError(f"model {i} has no parameter/buffer {name!r} that model 0 has")
            if own[name].shape != ref[name].shape:
                raise ValueError(f"model {i} parameter {name!r} has shape {tuple(own[name].shape)}, "
                                 f"model 0 has {tuple(ref[name].shape)}")
        for name in own:
            if name not in ref:
                raise ValueError(f"model {i} has parameter/buffer {name!r} that model 0 does not have")
        for name, t in own.items():
            if t.is_meta:
                raise ValueError(f"model {i} parameter {name!r} is on the meta device (no data): "
                                 "materialise the model (load its weights) before merging")
            if not t.is_floating_point():
                continue
            if ref_t is not None and (t.device != ref_t.device or t.dtype != ref_t.dtype):
                raise ValueError(f"model {i} parameter {name!r} is {t.dtype} on {t.device}, but model 0 "
                                 f"is {ref_t.dtype} on {ref_t.device}: move all models to one device and dtype")
            if not torch.isfinite(t).all():
                raise ValueError(f"model {i} parameter {name!r} contains NaN or inf")
    compare_structures(models)


def _module_tree(model: nn.Module) -> list[tuple[str, str, str]]:
    return [(name, type(m).__name__, m.extra_repr()) for name, m in model.named_modules()]


def _graph_signature(model: nn.Module) -> Optional[list[tuple[str, ...]]]:
    tracer = fx.Tracer()
    try:
        with untouched(model):
            graph = tracer.trace(model)
    except Exception:  # fx cannot trace it: the module trees are compared alone
        return None
    constants = {name: t for t, name in tracer.tensor_attrs.items()} if hasattr(tracer, "tensor_attrs") else {}
    index = {n: k for k, n in enumerate(graph.nodes)}

    def norm(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: f"%{index[n]}")

    def target(n: fx.Node) -> str:
        if n.op == "get_attr" and n.target in constants:  # a tensor constant: compare its value
            t = constants[n.target]
            return f"constant {t.dtype} {tuple(t.shape)} {hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()}"
        if isinstance(n.target, str):
            return n.target
        return f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', repr(n.target))}"

    return [(n.op, target(n), repr(norm(n.args)), repr(norm(n.kwargs)), n.format_node()) for n in graph.nodes]


def compare_structures(models: Sequence[nn.Module]) -> None:
    """Models must be one function family: the same module tree (types and settings) and,
    when torch.fx traces them, the same graph. Class identity is not required (every fx
    GraphModule has its own class)."""
    tree0 = _module_tree(models[0])
    for i, m in enumerate(models[1:], 1):
        tree = _module_tree(m)
        for a, b in zip(tree0, tree):
            if a != b:
                raise ValueError(f"model {i} differs from model 0 at module {b[0] or '(root)'!r}: "
                                 f"{b[1]}({b[2]}) where model 0 has {a[1]}({a[2]}); merging needs one architecture")
        if len(tree) != len(tree0):
            raise ValueError(f"model {i} has {len(tree)} modules, model 0 has {len(tree0)}")
    sig0 = _graph_signature(models[0])
    if sig0 is None:
        return
    for i, m in enumerate(models[1:], 1):
        sig = _graph_signature(m)
        if sig is None:
            raise ValueError(f"torch.fx traces model 0 but not model {i}: they are not one architecture")
        for k, (a, b) in enumerate(zip(sig0, sig)):
            if a[:4] != b[:4] and a[0] == b[0] == "get_attr" and a[1].startswith("constant"):
                raise ValueError(f"model {i} holds a different tensor constant than model 0 at node {k} "
                                 f"(`{b[4]}`): a plain tensor attribute used in forward is not merged, so it "
                                 "must be equal in every model (register it as a buffer to merge it)")
            if a[:4] != b[:4]:
                raise ValueError(f"model {i} computes a different graph from model 0: node {k} is "
                                 f"`{b[4]}` where model 0 has `{a[4]}`")
        if len(sig) != len(sig0):
            raise ValueError(f"model {i}'s graph has {len(sig)} nodes, model 0's has {len(sig0)}")


def _input_signature(call: ModelCall) -> list[Any]:
    """Per input (position or keyword name): rank, shape after the batch axis and dtype."""
    inputs = list(enumerate(call.args)) + list(call.kwargs.items())
    return [(k, (x.dim(), tuple(x.shape[1:]), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__)
            for k, x in inputs]


def _describe(sig: Any) -> str:
    if isinstance(sig, tuple):
        return f"a {sig[0]}-d {str(sig[2]).replace('torch.', '')} tensor of shape [batch, {', '.join(map(str, sig[1]))}]"
    return f"a {sig}"


class CheckedBatches:
    """Calibration data that can be read several times, each batch's inputs checked against the
    first batch's (rank, shape except the batch axis, dtype): a wrong batch gets a clear error
    naming it, never a raw error from inside torch."""

    def __init__(self, data: Iterable, input_fn: Callable):
        if isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable):
            raise TypeError("data must be an iterable of batches (e.g. a DataLoader or a list of tensors), "
                            f"got {type(data).__name__}")
        self.data = list(data) if iter(data) is data else data  # keep a generator's batches
        self.input_fn = input_fn
        self.first: Optional[ModelCall] = None
        for batch in self.data:
            self.first = model_call(input_fn(batch))
            break
        if self.first is None:
            raise ValueError("the calibration data is empty")
        self.signature = _input_signature(self.first)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator:
        for k, batch in enumerate(self.data):
            sig = _input_signature(model_call(self.input_fn(batch)))
            if sig != self.signature:
                bad = next(j for j in range(max(len(sig), len(self.signature)))
                           if j >= len(sig) or j >= len(self.signature) or sig[j] != self.signature[j])
                got = _describe(sig[bad][1]) if bad < len(sig) else "nothing"
                want = _describe(self.signature[bad][1]) if bad < len(self.signature) else "nothing"
                which = (sig if bad < len(sig) else self.signature)[bad][0]
                raise ValueError(f"calibration batch {k}: input {which!r} is {got}, but the first batch's is {want}; "
                                 "every batch must match the first (except the batch size)")
            yield batch


def small_example(inputs: ModelCall, n: int = 4) -> ModelCall:
    """The first n samples of a batch (when every tensor input shares its leading size)."""
    sizes: set[int] = set()
    inputs.map_tensors(lambda x: sizes.add(x.shape[0]) if x.dim() > 0 else None)
    if len(sizes) != 1 or sizes.pop() <= n:
        return inputs
    return inputs.map_tensors(lambda x: x[:n] if x.dim() > 0 else x)


def check_leaf_modules(leaf_modules: Any) -> tuple[type, ...]:
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable):
        leaf_modules = (leaf_modules,)
    out = tuple(leaf_modules)
    for m in out:
        if not (isinstance(m, type) and issubclass(m, nn.Module)):
            raise ValueError(f"leaf_modules must be nn.Module subclasses (classes, not names or instances), "
                             f"got {m!r}")
    return out


def check_fixed_params(fixed_params: Any) -> tuple[str, ...]:
    if isinstance(fixed_params, str):
        fixed_params = (fixed_params,)
    out = tuple(fixed_params)
    for p in out:
        if not isinstance(p, str):
            raise ValueError(f"fixed_params must be parameter names (str), got {p!r}")
    return out
