"""Hugging Face models without a hub: the ``hf:`` model source and writing a merged model.

``hf:PATH`` is a local directory holding ``config.json`` (and usually the weights, as written
by ``save_pretrained``), or a config file (``.json``): the model class is the config's
``architectures[0]`` (else ``AutoModel``); a directory with weights is loaded with
``from_pretrained(PATH)``, a config alone builds the model with random weights. ``hf:NAME``
with a name of the tiny HF zoo (``mudsc_fx.hf_zoo.FAMILIES``) builds that tiny model.

:func:`save_pretrained` writes a merged model (the user's own class) as a directory that
``from_pretrained`` loads back: ``config.json`` and ``model.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from torch import nn


class HFSourceError(ValueError):
    """A bad ``hf:`` spec (``mudsc_fx.sources.load_model`` reports it as a ModelSpecError)."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise HFSourceError("hf: models need the transformers package (pip install 'mudsc_fx[hf]')") from None
    return transformers


def _model_class(config: Any):
    tf = _transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    return None


def load_hf(spec: str) -> nn.Module:
    """The model named by an ``hf:`` spec (without the prefix), in eval mode."""
    path = Path(spec)
    if path.is_dir():
        return _from_dir(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise HFSourceError(f"hf:{spec}: no such config file")
        return _from_config_file(path)
    from .hf_zoo import FAMILIES
    if spec in FAMILIES:
        return FAMILIES[spec].build()
    raise HFSourceError(f"hf:{spec}: not a directory, not a .json config, not a tiny zoo model "
                        f"({', '.join(FAMILIES)}); the hub is not used")


def _from_dir(path: Path) -> nn.Module:
    tf = _transformers()
    if not (path / "config.json").is_file():
        raise HFSourceError(f"hf:{path}: the directory has no config.json")
    config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = _model_class(config) or tf.AutoModel
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        return _build(cls, config)
    return cls.from_pretrained(str(path), local_files_only=True).eval()


def _from_config_file(path: Path) -> nn.Module:
    tf = _transformers()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFSourceError(f"hf:{path}: not a readable JSON config ({e})") from None
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise HFSourceError(f"hf:{path}: the config has no model_type")
    config = tf.AutoConfig.for_model(model_type, **raw)
    return _build(_model_class(config) or tf.AutoModel, config)


def _build(cls, config) -> nn.Module:
    return (cls.from_config(config) if hasattr(cls, "from_config") else cls(config)).eval()


def config_of(spec: str) -> Any:
    """The config an ``hf:`` spec builds from (no weights are read)."""
    path = Path(spec)
    if path.is_dir():
        return _transformers().AutoConfig.from_pretrained(str(path), local_files_only=True)
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        return _transformers().AutoConfig.for_model(raw.pop("model_type"), **raw)
    return load_hf(spec).config


def example_inputs(config: Any, main_input: str = "input_ids", batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """Inputs as HF users pass them: ``{"input_ids", "attention_mask"}`` (token ids below the
    config's vocab size) or ``{"pixel_values"}`` (the config's channels and image size)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    if main_input == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=g)}
    ids = torch.randint(0, min(getattr(config, "vocab_size", 100), 1000), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def example_for(spec: str, seed: int = 0) -> dict:
    """Example inputs for the model an ``hf:`` spec names (built from its config alone)."""
    from .hf_zoo import FAMILIES
    if spec in FAMILIES and not Path(spec).exists():
        return FAMILIES[spec].example(seed)
    config = config_of(spec)
    cls = _model_class(config)
    main = getattr(cls, "main_input_name", "input_ids") if cls is not None else "input_ids"
    return example_inputs(config, main, seed=seed)


def save_pretrained(model: nn.Module, out_dir: Union[str, Path]) -> Path:
    """Write ``model`` (a transformers model, e.g. a merge result) as a directory that
    ``from_pretrained`` loads: ``config.json`` and ``model.safetensors``."""
    if not hasattr(model, "save_pretrained"):
        raise HFSourceError(f"{type(model).__name__} is not a transformers model: it has no save_pretrained")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
