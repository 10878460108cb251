"""PyTorch checkpoint files, read with the weights-only unpickler only."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from .readers import CheckpointError

__all__ = ["load_torch_object", "load_torch_state"]

PathLike = Union[str, os.PathLike]


def _unpickling_reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines()]
    for line in lines:
        if "unsupported" in line.lower() or "GLOBAL" in line:
            return line
    return lines[0] if lines else type(err).__name__


def load_torch_object(path: PathLike, label: str) -> object:
    """``torch.load(path, weights_only=True)`` on CPU, every failure a CheckpointError naming ``label``.

    The weights-only unpickler refuses anything beyond tensors and plain containers, so a
    malicious pickle is refused before any of it runs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{label}: refused by the weights-only loader (torch.load weights_only=True): not a PyTorch "
            f"weights file, or it holds objects other than tensors and plain containers "
            f"({_unpickling_reason(err)}); nothing in the file was executed") from None
    except EOFError:
        raise CheckpointError(f"{label}: not a PyTorch file: it is empty or truncated") from None
    except Exception as err:  # noqa: BLE001 (junk bytes surface as KeyError, RuntimeError, zip errors, ...)
        text = str(err).split(". ")[0].splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise CheckpointError(f"{label}: not a readable PyTorch file ({reason})") from None


def load_torch_state(path: Path, label: str) -> Mapping[str, object]:
    obj = load_torch_object(path, label)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning-style checkpoints
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    return obj
