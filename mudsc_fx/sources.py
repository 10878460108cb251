"""Where models come from, and the model zoos that ``mudsc-fx check --zoo`` sweeps.

A model spec is ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` (a local transformers directory
or config, see :mod:`mudsc_fx.hf`), ``path/file.py:factory`` or
``package.module:factory`` (imported from the current directory too). A zoo is a name mapped
to a function that yields :class:`ZooEntry` items (or ``(name, factory, example)`` tuples);
``torchvision``, ``timm`` and ``hf`` are registered, :func:`register_zoo` adds more, and a
user's own ``module:attr`` / ``file.py:attr`` naming a dict or a function is a zoo as well.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

DEFAULT_SHAPE = (1, 3, 64, 64)   # when neither the user nor the model's library gives a size
MIN_SIDE = 64                    # torchvision inputs: the model's declared minimum, at least this


class ModelSpecError(ValueError):
    pass


# -- model specs --------------------------------------------------------------------------

def import_object(spec: str, what: str = "model spec") -> Any:
    """The object ``attr`` of ``file.py:attr`` or ``package.module:attr``. A module is looked
    up in the current directory as well (``python -m`` puts it on the path; a console script
    does not)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ModelSpecError(f"{what} {spec!r} must look like file.py:NAME or package.module:NAME")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ModelSpecError(f"{what} {spec!r}: no such file: {where}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules.setdefault(path.stem, module)  # dataclasses and pickling look the module up
        mod_spec.loader.exec_module(module)
    else:
        module = _import_from_cwd(where, spec, what)
    if not hasattr(module, attr):
        raise ModelSpecError(f"{what} {spec!r}: module {where} has no attribute {attr!r}")
    return getattr(module, attr)


def _import_from_cwd(name: str, spec: str, what: str):
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)   # after the installed packages: the cwd never shadows them
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ModelSpecError(f"{what} {spec!r}: cannot import module {name!r} "
                             f"(looked in the current directory {cwd} too): {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)


def load_model(spec: str, **kwargs) -> nn.Module:
    """Build a model from a spec string (random weights for torchvision/timm: no downloads)."""
    kind, _, name = spec.partition(":")
    if not name:
        raise ModelSpecError(f"model spec {spec!r} must look like torchvision:NAME, timm:NAME, "
                             "file.py:factory or package.module:factory")
    if kind == "torchvision":
        import torchvision
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError as e:
            raise ModelSpecError(f"torchvision has no model {name!r}") from e
    if kind == "timm":
        import timm
        if not timm.is_model(name):
            raise ModelSpecError(f"timm has no model {name!r}")
        return timm.create_model(name, pretrained=False, **kwargs)
    if kind == "hf":  # a local transformers directory or config, or a tiny HF zoo model
        from .hf import HFSourceError, load_hf
        try:
            return load_hf(name)
        except HFSourceError as e:
            raise ModelSpecError(str(e)) from None
    factory = import_object(spec)
    model = factory(**kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def default_example(spec: str) -> Any:
    """The example input of a model spec: a shape (see :func:`default_input_shape`), or for
    ``hf:`` specs a function returning the keyword inputs HF users pass."""
    kind, _, name = spec.partition(":")
    if kind == "hf":
        from .hf import example_for
        return lambda: example_for(name)
    return default_input_shape(spec)


def default_input_shape(spec: str) -> tuple[int, ...]:
    """The example input shape for a model spec: the model's own input size where its library
    declares one (timm's pretrained config, torchvision's minimum size), else 1x3x64x64."""
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        return torchvision_input_shape(name)
    if kind == "timm":
        return timm_input_shape(name)
    return DEFAULT_SHAPE


def torchvision_input_shape(name: str) -> tuple[int, ...]:
    """64x64, or the model's declared minimum when it needs more (ViT, Swin, MaxViT,
    Inception): small inputs keep float64 proofs of big models quick."""
    import torchvision
    try:
        h, w = torchvision.models.get_model_weights(name).DEFAULT.meta["min_size"]
    except Exception:  # no weights enum or no min_size: nothing declared
        return DEFAULT_SHAPE
    return (1, 3, max(MIN_SIDE, h), max(MIN_SIDE, w))


def timm_input_shape(name: str) -> tuple[int, ...]:
    import timm
    cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    size = getattr(cfg, "input_size", None)
    return (1,) + tuple(size) if size else (1, 3, 224, 224)


def example_from_shape(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- zoos -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    """One model of a zoo. ``example``: a shape (a tuple of ints: a seeded standard-normal
    tensor), the inputs themselves as ``mf.check`` takes them, or a function returning them
    (built in the worker). ``n_params``: the count when known without building (else it is
    counted on the meta device before the real build). ``skip``: a reason not to check it."""
    name: str
    build: Callable[[], nn.Module]
    example: Any
    skip: Optional[str] = None
    n_params: Optional[int] = None

    def example_inputs(self, seed: int = 0) -> Any:
        ex = self.example() if callable(self.example) and not isinstance(self.example, nn.Module) else self.example
        if isinstance(ex, (tuple, list)) and ex and all(isinstance(v, int) for v in ex):
            return example_from_shape(tuple(ex), seed)
        return ex

    def describe_input(self, built: Any = None) -> str:
        """The example's shapes, e.g. ``1x3x224x224`` (``built``: the inputs, when a function makes them)."""
        if isinstance(self.example, (tuple, list)) and all(isinstance(v, int) for v in self.example):
            return "x".join(map(str, self.example))
        if callable(self.example) and not isinstance(self.example, nn.Module):
            return "(built by a function)" if built is None else describe_inputs(built)
        return describe_inputs(self.example)


def describe_inputs(ex: Any) -> str:
    if isinstance(ex, torch.Tensor):
        return "x".join(map(str, ex.shape))
    if isinstance(ex, dict):
        return ",".join(f"{k}={describe_inputs(v)}" for k, v in ex.items())
    if isinstance(ex, (tuple, list)):
        return ",".join(describe_inputs(v) for v in ex)
    return type(ex).__name__


ZooFunction = Callable[..., Iterable]
_ZOOS: dict[str, Union[ZooFunction, str]] = {}


def register_zoo(name: str, fn: Union[ZooFunction, str]) -> None:
    """Register a zoo: ``fn(pattern=None)`` yields :class:`ZooEntry` items or ``(name,
    factory, example)`` tuples (``pattern``: a glob the zoo may use to list fewer models), or a
    ``"module:attr"`` string naming such a function, imported on first use."""
    if ":" in name or not name:
        raise ValueError(f"zoo name {name!r} must be non-empty and contain no ':'")
    _ZOOS[name] = fn


def zoo_names() -> tuple[str, ...]:
    return tuple(_ZOOS)


def zoo(spec: str, only: Optional[str] = None) -> list[ZooEntry]:
    """The entries of zoo ``spec``: a registered name, optionally ``:PATTERN`` (a glob on model
    names, e.g. ``timm:convnext*``), or ``module:attr`` / ``file.py:attr`` (optionally
    ``:PATTERN``) naming a dict ``{name: (factory, example)}``, a list of entries or a function
    yielding them. ``only``: comma-separated names or globs to keep."""
    head, _, rest = spec.partition(":")
    if head in _ZOOS:
        pattern = rest or None
        fn = _ZOOS[head]
        if isinstance(fn, str):
            fn = _lazy_zoo(head, fn)
        entries = as_entries(_call_zoo(fn, pattern), spec)
    else:
        if not rest:
            raise ModelSpecError(f"unknown zoo {spec!r}: choose one of {', '.join(_ZOOS)} (optionally "
                                 "NAME:PATTERN), or module:attr / file.py:attr naming your own zoo")
        target, pattern = _split_user_spec(spec)
        obj = import_object(target, "zoo")
        entries = as_entries(_call_zoo(obj, pattern) if callable(obj) else obj, spec)
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatchcase(e.name, pattern)]
    if only:
        keep = [p.strip() for p in only.split(",") if p.strip()]
        entries = [e for e in entries if any(fnmatch.fnmatchcase(e.name, p) for p in keep)]
    if not entries:
        raise ModelSpecError(f"zoo {spec!r}{f' with --only {only}' if only else ''} has no models")
    return entries


def _split_user_spec(spec: str) -> tuple[str, Optional[str]]:
    """``my.zoo:ZOO`` or ``my.zoo:ZOO:pattern``; ``zoo.py:ZOO`` or ``zoo.py:ZOO:pattern``."""
    parts = spec.split(":")
    if len(parts) >= 3 and parts[-1] and (parts[-2].isidentifier()):
        return ":".join(parts[:-1]), parts[-1]
    return spec, None


def _lazy_zoo(name: str, target: str) -> ZooFunction:
    try:
        fn = import_object(target, f"zoo {name!r}")
    except ModelSpecError as e:
        raise ModelSpecError(f"the {name} zoo is not available: {e}") from e
    _ZOOS[name] = fn
    return fn


def _call_zoo(fn: Callable, pattern: Optional[str]) -> Iterable:
    import inspect
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    return fn(pattern) if params else fn()


def as_entries(obj: Any, spec: str = "zoo") -> list[ZooEntry]:
    """Normalise what a zoo gives: ZooEntry items, ``(name, factory, example)`` tuples, or a
    dict ``{name: (factory, example)}`` / ``{name: ZooEntry}``."""
    if isinstance(obj, dict):
        items = [v if isinstance(v, ZooEntry) else (k, *_pair(k, v, spec)) for k, v in obj.items()]
    else:
        try:
            items = list(obj)
        except TypeError:
            raise ModelSpecError(f"zoo {spec!r} is a {type(obj).__name__}; expected a dict "
                                 "{name: (factory, example)} or a function yielding (name, factory, "
                                 "example)") from None
    out, seen = [], set()
    for item in items:
        entry = item if isinstance(item, ZooEntry) else _entry(item, spec)
        if entry.name in seen:
            raise ModelSpecError(f"zoo {spec!r} lists model {entry.name!r} twice")
        seen.add(entry.name)
        out.append(entry)
    return out


def _pair(name: str, value: Any, spec: str) -> tuple:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return tuple(value)
    raise ModelSpecError(f"zoo {spec!r}: entry {name!r} must be (factory, example input), "
                         f"got {type(value).__name__}")


def _entry(item: Any, spec: str) -> ZooEntry:
    if not (isinstance(item, (tuple, list)) and len(item) == 3 and isinstance(item[0], str)):
        raise ModelSpecError(f"zoo {spec!r}: each item must be (name, factory, example input) or a "
                             f"ZooEntry, got {item!r:.80}")
    name, factory, example = item
    if isinstance(factory, nn.Module):
        module = factory
        factory = (lambda: module)   # the check works on a copy: the module is not modified
    if not callable(factory):
        raise ModelSpecError(f"zoo {spec!r}: the factory of {name!r} is a {type(factory).__name__}, "
                             "not a function returning an nn.Module")
    return ZooEntry(name, factory, example)


# -- the built-in zoos ----------------------------------------------------------------------

def torchvision_zoo(pattern: Optional[str] = None) -> list[ZooEntry]:
    """Every torchvision classification model, random weights, at :func:`torchvision_input_shape`."""
    import torchvision
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        build = (lambda n=name: torchvision.models.get_model(n, weights=None))
        out.append(ZooEntry(name, build, torchvision_input_shape(name), n_params=_tv_param_count(name)))
    return out


def _tv_param_count(name: str) -> Optional[int]:
    """From the weights' metadata (no download, no build); None lets the checker count."""
    import torchvision
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return None


def timm_zoo(pattern: Optional[str] = None, names: Optional[Iterable[str]] = None) -> list[ZooEntry]:
    """timm architectures (all, or those matching ``pattern``, or ``names``), random weights,
    at the input size of each model's pretrained config."""
    import timm
    names = list(names) if names is not None else timm.list_models(pattern or "*")
    out = []
    for name in names:
        build = (lambda n=name: timm.create_model(n, pretrained=False))
        out.append(ZooEntry(name, build, timm_input_shape(name)))
    return out


# small representatives of timm's families (random init, CPU-sized)
TIMM_SAMPLE = ("resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
               "vit_tiny_patch16_224", "deit_tiny_patch16_224", "regnety_002", "resnext26ts",
               "mixer_s32_224", "poolformer_s12", "levit_128s", "cait_xxs24_224", "swin_tiny_patch4_window7_224")

register_zoo("torchvision", torchvision_zoo)
register_zoo("timm", timm_zoo)
register_zoo("hf", "mudsc_fx.hf_zoo:hf_zoo")   # tiny transformers configs, from the HF front end
