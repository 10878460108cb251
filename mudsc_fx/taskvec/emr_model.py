"""The result of EMR-Merging: a shared task vector, per-task bit masks, rescalers and heads.

:class:`EMRModel` rebuilds any task's weights from the stored parts and a private copy of the
base (``task``, ``task_state``), switches a module between tasks in place (``apply``,
``remove``), and saves / loads the stored parts (:mod:`.emr_artifact`).
"""

from __future__ import annotations

import copy
import operator
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checkpoints import TensorMapReader, TensorSpec
from .emr_artifact import EMRArtifact, base_digest, read_artifact, unpack_mask, write_artifact
from .vector_layout import TaskVectorLayout

__all__ = ["EMRModel", "EMRSize", "TaskIndexError", "write_state", "specs_of"]


def specs_of(state: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
    """Name -> shape and dtype of a state dict's tensors."""
    return TensorMapReader(state, "state dict").specs


def write_state(module: nn.Module, values: Mapping[str, Tensor]) -> None:
    """Copy ``values`` into the matching ``state_dict`` tensors of ``module`` in place."""
    targets = module.state_dict()
    with torch.no_grad():
        for name, value in values.items():
            targets[name].copy_(value)


class TaskIndexError(IndexError, ValueError):
    """A task index outside ``range(len(emr))``."""


@dataclass(frozen=True)
class EMRSize:
    """Bytes of an EMR artifact by part (the base is not part of it), and of one checkpoint."""

    tau_uni: int
    masks: int
    rescalers: int
    kept: int
    checkpoint: int  # one full state dict of the architecture, for comparison

    @property
    def total(self) -> int:
        return self.tau_uni + self.masks + self.rescalers + self.kept


class EMRModel:
    """The EMR-Merging result: shared ``tau_uni``, per-task bit masks, rescalers and heads.

    Holds a private copy of the base (so applying a task to the caller's base module cannot
    corrupt it). Build with :func:`emr_merge` or :meth:`load`.
    """

    def __init__(self, base: nn.Module, artifact: EMRArtifact):
        self._base = base
        self._artifact = artifact
        self._applied: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return self._artifact.num_tasks

    def __repr__(self) -> str:
        return (f"EMRModel(tasks={len(self)}, scalars={self.num_scalars}, rescale={self.rescale!r}, "
                f"kept={[entry.name for entry in self.layout.kept]})")

    @property
    def layout(self) -> TaskVectorLayout:
        return self._artifact.layout

    @property
    def rescale(self) -> str:
        return self._artifact.rescale

    @property
    def num_scalars(self) -> int:
        return self.layout.num_scalars

    @property
    def rescalers(self) -> tuple[float, ...]:
        return tuple(self._artifact.rescalers.tolist())

    @property
    def tau_uni(self) -> Tensor:
        """A copy of the unified task vector (flat, merged entries in ``state_dict`` order)."""
        return self._artifact.tau_uni.clone()

    def _index(self, task: int) -> int:
        index = operator.index(task)
        if not 0 <= index < len(self):
            raise TaskIndexError(f"task index {index} out of range: this EMRModel has {len(self)} tasks")
        return index

    def mask(self, task: int) -> Tensor:
        """Task ``task``'s mask, unpacked to a flat bool tensor of ``num_scalars``."""
        return unpack_mask(self._artifact.masks[self._index(task)], self.num_scalars)

    def task_state(self, task: int) -> dict[str, Tensor]:
        """The full state dict of task ``task`` (new tensors, in the base's dtypes)."""
        index = self._index(task)
        mask, rescaler = self.mask(index), float(self._artifact.rescalers[index])
        work, base_state = self.layout.work_dtype, self._base.state_dict()
        values = {}
        for entry, span in self.layout.segments():
            base_value = base_state[entry.name]
            delta = (self._artifact.tau_uni[span].to(work) * mask[span]).mul_(rescaler)
            values[entry.name] = (base_value.reshape(-1).to(work) + delta.to(base_value.device)
                                  ).reshape(entry.shape).to(entry.dtype)
        for name, tensor in self._artifact.kept[index].items():
            values[name] = tensor.clone()
        for entry in self.layout.copied:
            values[entry.name] = base_state[entry.name].clone()
        return values

    def task(self, task: int) -> nn.Module:
        """A new module of the base's architecture holding task ``task``'s weights."""
        values = self.task_state(task)
        module = copy.deepcopy(self._base)
        write_state(module, values)
        return module

    def apply(self, module: nn.Module, task: int) -> None:
        """Write task ``task`` into ``module`` (the base's architecture) in place.

        The overwritten values are remembered for :meth:`remove`; applying again before
        removing switches tasks but keeps the values from before the first ``apply``.
        """
        values = self.task_state(task)
        state = module.state_dict()
        self.layout.check(specs_of(state), "module")
        if module not in self._applied:
            self._applied[module] = {name: state[name].detach().clone() for name in values}
        write_state(module, values)

    def remove(self, module: nn.Module) -> None:
        """Restore the values :meth:`apply` overwrote in ``module``."""
        saved = self._applied.pop(module, None)
        if saved is None:
            raise ValueError("remove: no task is applied to this module (apply() was not called on it "
                             "or it was already removed)")
        write_state(module, saved)

    def nbytes(self) -> EMRSize:
        """Artifact size by part, next to the size of one full checkpoint."""
        artifact = self._artifact
        return EMRSize(
            tau_uni=artifact.tau_uni.nbytes, masks=artifact.masks.nbytes, rescalers=artifact.rescalers.nbytes,
            kept=sum(tensor.nbytes for heads in artifact.kept for tensor in heads.values()),
            checkpoint=sum(entry.nbytes for entry in self.layout.entries))

    def save(self, path: str | os.PathLike) -> None:
        """Write the artifact (not the base) to a safetensors file; see ``emr_artifact``."""
        write_artifact(self._artifact, path)

    @classmethod
    def load(cls, path: str | os.PathLike, base_module: nn.Module) -> EMRModel:
        """Read an artifact written by :meth:`save`; ``base_module`` must be the same base."""
        artifact = read_artifact(path)
        base = copy.deepcopy(base_module)
        base_state = base.state_dict()
        layout = artifact.layout
        try:
            layout.check(specs_of(base_state), "base_module")
            for entry in layout.entries:
                if base_state[entry.name].dtype != entry.dtype:
                    raise ValueError(f"base_module: parameter {entry.name!r} is {base_state[entry.name].dtype}, "
                                     f"the artifact was merged with {entry.dtype}")
            if TaskVectorLayout.of(specs_of(base_state), keep={entry.name for entry in layout.kept}) != layout:
                raise ValueError("base_module orders or classifies its entries differently")
            if base_digest(layout, TensorMapReader(base_state, "base_module")) != artifact.base_sha256:
                raise ValueError("base_module's values differ from the base the artifact was merged from")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return cls(base, artifact)
