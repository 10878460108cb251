"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
arXiv 2405.17461): elect, mask, rescale, with bit-packed task masks.

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

Everything but the rescalers is local to a scalar, and both L1 statistics are sums of
per-chunk terms, so the whole merge is one streamed pass: ``tau_uni`` goes to its sink (a
tensor in memory or straight into the artifact file) chunk by chunk, masks are packed as they
come (N bits per scalar), and the rescalers are divided out at the end.

Differences from the reference scripts: they treat ``sum_t tau_t == 0`` as a negative sign
(``(s > 0) * 2 - 1``); here ``gamma`` is 0 there, as the paper's ``sign`` says. Masks are
stored as bits (the references keep bool bytes, 8x larger).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoints import SAFETENSORS_SUFFIX, PathLike, SafetensorsWriter, check_output_path
from .arithmetic import summed
from .driver import MergeFileResult, file_result
from .emr_artifact import (RESCALE_MODES, EMRArtifact, MaskPacker, artifact_metadata, artifact_specs, base_digest,
                           kept_key)
from .emr_model import EMRModel, write_state
from .vector_layout import KeepSpec
from .registry import Option, TaskVectorMethod, choice, register_method
from .stream import DEFAULT_CHUNK_SIZE, ModelSource, TaskVectorStream, as_sources, open_stream

__all__ = ["emr_merge", "EMR", "elect_and_mask", "run_emr"]

log = logging.getLogger(__name__)


def elect_and_mask(taus: Tensor) -> tuple[Tensor, Tensor]:
    """``(tau_uni, masks)`` of an (N, c) chunk of task vectors (modifies ``taus``)."""
    gamma = summed(taus).sign_()
    agreeing = taus.mul_(gamma)  # |tau_t| where task t agrees with gamma, <= 0 elsewhere
    masks = agreeing > 0
    epsilon = agreeing.clamp_(min=0).amax(0)
    return gamma.mul_(epsilon), masks


def _l1_rows(values: Tensor) -> Tensor:
    """Sum of |values| per row, accumulated in float64 (numpy's float64 reduction of float32 is
    several times faster than torch's on CPU)."""
    return torch.from_numpy(np.add.reduce(np.abs(values.numpy()), axis=1, dtype=np.float64))


def run_emr(stream: TaskVectorStream, rescale: str, write_tau: Callable[[int, Tensor], None]) -> tuple[Tensor, Tensor]:
    """One pass: ``tau_uni`` (storage dtype) to ``write_tau(offset, values)`` chunk by chunk.

    Returns the packed masks (N, ceil(P/8)) and the rescalers (N,) float64.
    """
    layout = stream.layout
    packer = MaskPacker(stream.num_models, layout.num_scalars)
    numerators = torch.zeros(stream.num_models, dtype=torch.float64)
    denominators = torch.zeros(stream.num_models, dtype=torch.float64)
    for chunk in stream.chunks():
        weight = 1.0 if rescale == "paper" else 1.0 / chunk.entry.numel
        numerators += _l1_rows(chunk.taus).mul_(weight)
        tau_uni, masks = elect_and_mask(chunk.taus)
        stored = tau_uni.to(layout.storage_dtype)
        write_tau(chunk.offset, stored)
        denominators += _l1_rows(chunk.taus.copy_(masks).mul_(stored.to(layout.work_dtype))).mul_(weight)
        packer.append(masks)
    rescalers = torch.where(denominators > 0, numerators / denominators, 0.0)
    return packer.finish(), rescalers


def _aligned_sources(base: nn.Module, sources: list[ModelSource], data: object, method: object) -> list[nn.Module]:
    try:
        from mudsc_fx.merge import align_models
    except ImportError as err:
        raise NotImplementedError(f"emr_merge(align={method!r}) needs mudsc_fx.merge.align_models, "
                                  f"which is not available ({err})") from err
    # Private copies: alignment permutes weights, and inputs must not change. The base is the
    # anchor, so every fine-tuned model lands in the basis its task vector is taken in.
    stream = open_stream(base, sources)
    modules = []
    try:
        for reader in stream.models:
            module = copy.deepcopy(base)
            write_state(module, reader.state_dict())
            modules.append(module)
    finally:
        stream.close()
    aligned = list(align_models([base] + modules, data, method=method))[1:]
    if len(aligned) != len(modules):
        raise ValueError(f"align_models returned {len(aligned)} models for {len(modules)} inputs")
    return aligned


def _merge_modules(base: nn.Module, models: Iterable[ModelSource], keep: KeepSpec, options: dict,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, align: object = None, data: object = None) -> EMRModel:
    rescale = options["rescale"]
    sources = as_sources(models)
    base = copy.deepcopy(base)
    if align is not None:
        sources = _aligned_sources(base, sources, data, align)
    stream = open_stream(base, sources, keep, chunk_size)
    try:
        layout = stream.layout
        tau_uni = torch.empty(layout.num_scalars, dtype=layout.storage_dtype)
        masks, rescalers = run_emr(stream, rescale, lambda offset, values: tau_uni[offset:offset + len(values)].copy_(values))
        kept = tuple(stream.kept(index) for index in range(stream.num_models))
        artifact = EMRArtifact(layout, rescale, tau_uni, masks, rescalers, kept, base_digest(layout, stream.base, stream.chunk_size))
    finally:
        stream.close()
    log.info("emr_merge: %d tasks, %d merged scalars, rescale=%s, rescalers=%s",
             artifact.num_tasks, layout.num_scalars, rescale, [round(r, 4) for r in rescalers.tolist()])
    return EMRModel(base, artifact)


def _merge_files(base: ModelSource, models: Iterable[ModelSource], output: PathLike, keep: KeepSpec, options: dict,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> MergeFileResult:
    started = time.perf_counter()
    output = check_output_path(output, (SAFETENSORS_SUFFIX,), "EMR artifact")
    stream = open_stream(base, models, keep, chunk_size)
    try:
        layout = stream.layout
        kept_dtypes = [{entry.name: reader.specs[entry.name].dtype for entry in layout.kept} for reader in stream.models]
        metadata = artifact_metadata(layout, stream.num_models, options["rescale"], base_digest(layout, stream.base, stream.chunk_size))
        with SafetensorsWriter(output, artifact_specs(layout, kept_dtypes), metadata) as out:
            masks, rescalers = run_emr(stream, options["rescale"], lambda offset, values: out.write("tau_uni", values))
            for index, reader in enumerate(stream.models):
                for entry in layout.kept:
                    for piece in stream.pieces(reader, entry):
                        out.write(kept_key(index, entry.name), piece)
            out.write_tensor("masks", masks)
            out.write("rescalers", rescalers)
        return file_result("emr", stream, output, options, started, tuple(rescalers.tolist()))
    finally:
        stream.close()


EMR: TaskVectorMethod = register_method(TaskVectorMethod(
    "emr", "elect, mask, rescale: one shared task vector, per-task masks and rescalers (Huang et al. 2024)",
    (Option("rescale", "paper", choice(*RESCALE_MODES),
            "rescaler statistic: 'paper' (whole-model L1) or 'per_tensor_mean' (the reference scripts)"),),
    "emr", _merge_modules, _merge_files, (SAFETENSORS_SUFFIX,)))


def emr_merge(base: nn.Module, models: Iterable[ModelSource], rescale: str = "paper", keep: KeepSpec = None,
              align: object = None, data: object = None) -> EMRModel:
    """EMR-Merging of models fine-tuned from ``base`` (see the module docstring).

    ``models`` items are modules, state dicts, checkpoint paths (``.safetensors`` read lazily,
    chunk by chunk) or zero-argument callables returning one. ``keep`` (regex,
    ``callable(name)``, or names) selects per-task entries such as heads. With ``align`` set
    (act_align, mudsc_align or rebasin), ``mudsc_fx.merge.align_models`` first permutes every
    fine-tuned model into the base's basis (the base is the anchor and is not changed); this
    loads all of them at once. To write an artifact from checkpoint files without holding the
    result, use ``merge_checkpoints("emr", ...)``.

    >>> import torch, torch.nn as nn
    >>> torch.manual_seed(0) and None
    >>> base, tuned = nn.Linear(4, 2), nn.Linear(4, 2)
    >>> emr = emr_merge(base, [tuned])
    >>> torch.testing.assert_close(emr.task(0).weight, tuned.weight)
    """
    return _merge_modules(base, models, keep, EMR.resolve({"rescale": rescale}), align=align, data=data)

