"""Inputs as users have them: one place that turns an example or a calibration batch into the
model's call arguments and into a traced graph's placeholders (trace, check, statistics,
merge and reset_bn all use it), and the eval-mode guard every stage runs under."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

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


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor leaf of a model output (tensor, tuple/list, dict, dataclass/ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    if hasattr(out, "__dict__"):
        return [t for v in vars(out).values() for t in flat_tensors(v)]
    return []
