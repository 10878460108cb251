"""Where models come from: ``torchvision:NAME``, ``timm:NAME``, ``path/file.py:factory``,
``package.module:factory``; and the model zoos that ``mudsc-fx check --zoo`` sweeps."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import nn

MAX_PARAMS = 300_000_000  # larger zoo members are listed as skipped (float64 proof copies)


class ModelSpecError(ValueError):
    pass


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
    if kind.endswith(".py"):
        path = Path(kind)
        if not path.exists():
            raise ModelSpecError(f"no such file: {kind}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        import sys
        sys.modules.setdefault(path.stem, module)  # dataclasses and pickling look the module up
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(kind)
        except ImportError as e:
            raise ModelSpecError(f"cannot import module {kind!r} from model spec {spec!r}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None:
        raise ModelSpecError(f"{kind} has no attribute {name!r}")
    model = factory(**kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    skip: Optional[str] = None


def _tv_input(name: str) -> tuple[int, ...]:
    # fixed-size position embeddings / partitions need 224; inception needs >= 75
    if name.startswith(("vit_", "maxvit")):
        return (1, 3, 224, 224)
    if "inception" in name:
        return (1, 3, 96, 96)
    return (1, 3, 64, 64)


def torchvision_zoo() -> list[ZooEntry]:
    import torchvision
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        build = (lambda n=name: torchvision.models.get_model(n, weights=None))
        n_params = _param_count(name)
        skip = f"{n_params / 1e6:.0f}M parameters (> {MAX_PARAMS / 1e6:.0f}M)" if n_params > MAX_PARAMS else None
        out.append(ZooEntry(name, build, _tv_input(name), skip))
    return out


def _param_count(name: str) -> int:
    """Parameter count without allocating weights: from the weights' metadata (no download),
    else by building on the meta device."""
    import torch
    import torchvision
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        with torch.device("meta"):
            m = torchvision.models.get_model(name, weights=None)
        return sum(p.numel() for p in m.parameters())


def timm_zoo(names: Optional[list[str]] = None) -> list[ZooEntry]:
    import timm
    names = names or TIMM_DEFAULT
    out = []
    for name in names:
        def build(n=name):
            return timm.create_model(n, pretrained=False)
        cfg = timm.get_pretrained_cfg(name)
        size = tuple(getattr(cfg, "input_size", (3, 224, 224)) or (3, 224, 224)) if cfg else (3, 224, 224)
        out.append(ZooEntry(name, build, (1,) + size))
    return out


# small representatives of timm's families (random init, CPU-sized)
TIMM_DEFAULT = ["resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
                "vit_tiny_patch16_224", "deit_tiny_patch16_224", "regnety_002", "resnext26ts",
                "mixer_s32_224", "poolformer_s12", "levit_128s", "cait_xxs24_224", "swin_tiny_patch4_window7_224"]


def zoo(name: str) -> list[ZooEntry]:
    if name == "torchvision":
        return torchvision_zoo()
    if name == "timm":
        return timm_zoo()
    raise ModelSpecError(f"unknown zoo {name!r}; choose torchvision or timm")
