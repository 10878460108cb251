"""EMR-Merging (Elect, Mask, Rescale; arXiv 2405.17461) with bit-packed task masks.

For task vectors ``tau_t = theta_t - theta_0`` over the merged scalars:

- elect ``gamma = sign(sum_t tau_t)`` and ``epsilon = max |tau_t|`` over the tasks whose
  ``tau_t`` has sign ``gamma`` (zero where none does, and where ``gamma == 0``);
  ``tau_uni = gamma * epsilon``;
- mask ``m_t = [tau_t * gamma > 0]``;
- rescale ``lambda_t = L1(tau_t) / L1(m_t * tau_uni)``, with ``L1`` either
  ``"paper"``: the sum of absolute values over the whole model, or
  ``"per_tensor_mean"``: the sum over merged tensors of the per-tensor mean absolute value,
  which is what the public reference scripts compute (``scales[m] += torch.mean(torch.abs(p))``
  per tensor, then ``rescalers = scales / new_scales``); both accumulate in float64 and skip
  empty tensors. ``lambda_t`` is 0 when ``m_t * tau_uni`` is all zero (the task is then
  ``theta_0`` whatever ``lambda_t`` is);
- task t is ``theta_0 + lambda_t * (m_t * tau_uni)``, with task t's own kept (head) entries.

Differences from the reference scripts: they treat ``sum_t tau_t == 0`` as a negative sign
(``(s > 0) * 2 - 1``); here ``gamma`` is 0 there, as the paper's ``sign`` says. Masks are
stored as bits (the references keep bool bytes, 8x larger).
"""

from __future__ import annotations

import copy
import logging
import operator
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .emr_artifact import RESCALE_MODES, EMRArtifact, base_digest, pack_mask, read_artifact, unpack_mask, write_artifact
from .sources import KeepSpec, Layout, ModelSource, as_module, as_sources, iter_task_vectors, write_state

__all__ = ["emr_merge", "EMRModel", "EMRSize", "TaskIndexError"]

log = logging.getLogger(__name__)


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


def _l1(values: Tensor, layout: Layout, rescale: str) -> float:
    """The rescaler's magnitude statistic of a flat vector (see the module docstring)."""
    if rescale == "paper":
        return float(torch.linalg.vector_norm(values, ord=1, dtype=torch.float64))
    return sum(float(torch.linalg.vector_norm(values[span], ord=1, dtype=torch.float64)) / entry.numel
               for entry, span in layout.segments() if entry.numel)


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
    def layout(self) -> Layout:
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
        self.layout.check(state, "module")
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
            layout.check(base_state, "base_module")
            for entry in layout.entries:
                if base_state[entry.name].dtype != entry.dtype:
                    raise ValueError(f"base_module: parameter {entry.name!r} is {base_state[entry.name].dtype}, "
                                     f"the artifact was merged with {entry.dtype}")
            if Layout.of(base_state, keep={entry.name for entry in layout.kept}) != layout:
                raise ValueError("base_module orders or classifies its entries differently")
            if base_digest(layout, base_state) != artifact.base_sha256:
                raise ValueError("base_module's values differ from the base the artifact was merged from")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return cls(base, artifact)


def _aligned_sources(base: nn.Module, layout: Layout, sources: list[ModelSource], data: object,
                     method: object) -> list[nn.Module]:
    try:
        from mudsc_fx.merge import align_models
    except ImportError as err:
        raise NotImplementedError(f"emr_merge(align={method!r}) needs mudsc_fx.merge.align_models, "
                                  f"which is not available ({err})") from err
    # Private copies: alignment permutes weights, and inputs must not change. The base is the
    # anchor, so every fine-tuned model lands in the basis its task vector is taken in.
    modules = [as_module(source, index, base, layout) for index, source in enumerate(sources)]
    aligned = list(align_models([base] + modules, data, method=method))[1:]
    if len(aligned) != len(modules):
        raise ValueError(f"align_models returned {len(aligned)} models for {len(modules)} inputs")
    return aligned


def emr_merge(base: nn.Module, models: Iterable[ModelSource], rescale: str = "paper", keep: KeepSpec = None,
              align: object = None, data: object = None) -> EMRModel:
    """EMR-Merging of models fine-tuned from ``base`` (see the module docstring).

    ``models`` items are modules, state dicts, ``.pt``/``.safetensors`` paths or zero-argument
    callables returning one; they are loaded lazily, once per pass (two passes). ``keep``
    (regex, ``callable(name)``, or names) selects per-task entries such as heads. With
    ``align`` set (act_align, mudsc_align or rebasin), ``mudsc_fx.merge.align_models`` first
    permutes every fine-tuned model into the base's basis (the base is the anchor and is not
    changed); this loads all of them at once.

    >>> import torch.nn as nn
    >>> torch.manual_seed(0) and None
    >>> base, tuned = nn.Linear(4, 2), nn.Linear(4, 2)
    >>> emr = emr_merge(base, [tuned])
    >>> torch.testing.assert_close(emr.task(0).weight, tuned.weight)
    """
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    sources = as_sources(models)
    base = copy.deepcopy(base)
    base_state = base.state_dict()
    layout = Layout.of(base_state, keep)
    layout.check(base_state, "base")
    if align is not None:
        sources = _aligned_sources(base, layout, sources, data, align)

    # Pass 1: elect the sign; each task's L1 statistic and kept entries.
    summed, task_l1, kept = layout.zeros(), [], []
    for _, tau, heads in iter_task_vectors(sources, layout, base_state, with_kept=True):
        summed.add_(tau)
        task_l1.append(_l1(tau, layout, rescale))
        kept.append(heads)
    gamma = summed.sign_()

    # Pass 2: tau_t * gamma is |tau_t| where task t agrees with gamma and <= 0 elsewhere.
    epsilon = layout.zeros()
    masks = torch.empty((len(sources), (layout.num_scalars + 7) // 8), dtype=torch.uint8)
    for index, tau, _ in iter_task_vectors(sources, layout, base_state):
        agreeing = tau.mul_(gamma)
        masks[index] = pack_mask(agreeing > 0)
        torch.maximum(epsilon, agreeing.clamp_(min=0), out=epsilon)
    tau_uni = gamma.mul_(epsilon).to(layout.storage_dtype)
    del epsilon

    unified = tau_uni.to(layout.work_dtype)
    rescalers = []
    for index, numerator in enumerate(task_l1):
        denominator = _l1(unified * unpack_mask(masks[index], layout.num_scalars), layout, rescale)
        rescalers.append(numerator / denominator if denominator > 0 else 0.0)
    artifact = EMRArtifact(layout, rescale, tau_uni, masks, torch.tensor(rescalers, dtype=torch.float64),
                           tuple(kept), base_digest(layout, base_state))
    log.info("emr_merge: %d tasks, %d merged scalars, rescale=%s, rescalers=%s",
             len(sources), layout.num_scalars, rescale, [round(r, 4) for r in rescalers])
    return EMRModel(base, artifact)
