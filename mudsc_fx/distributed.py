"""torch.distributed support: the statistics pass spread over ranks.

When a process group is initialised (``torchrun``, or ``torch.distributed.init_process_group``
in the user's code), :func:`mudsc_fx.collect_stats` and :func:`mudsc_fx.merge` run on every
rank: each rank reads its own shard of the calibration batches (batch k goes to rank
k % world, so every rank must iterate the same batches in the same order, or pass
``Sharding(presharded=True)`` with data already split), the sufficient statistics (counts,
means and centred second moments) are all-reduced (gloo on CPU, nccl on GPU), rank 0 solves,
and the others receive its result, so every rank returns the same merged model.

    torchrun --nproc_per_node 2 -m mudsc_fx.cli merge a.pt b.pt --data calib.pt -o merged.pt

Without a process group (or with ``sharding=None``) nothing here does anything.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Sharding:
    """How a pass is spread over ranks: ``group`` (None: the default process group) and
    whether ``data`` is already this rank's shard (``presharded``) or every rank holds all
    batches and keeps batch k when k % world == rank."""
    group: Any = None
    presharded: bool = False

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)


AUTO = "auto"
ShardingArg = Union[Sharding, str, None]


def resolve(sharding: ShardingArg = AUTO) -> Optional[Sharding]:
    """The sharding a pass uses: ``"auto"`` gives ``Sharding()`` when a default process group
    with more than one rank is initialised (else None: single process); ``None`` disables
    distribution; a :class:`Sharding` is used as given."""
    if sharding is None or isinstance(sharding, Sharding):
        if isinstance(sharding, Sharding) and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Sharding given but torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group first (or run under torchrun)")
        return sharding
    if sharding != AUTO:
        raise ValueError(f"sharding must be 'auto', None or a mudsc_fx.distributed.Sharding, got {sharding!r}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Sharding()
    return None


@contextmanager
def process_group_from_env(device: torch.device = torch.device("cpu")) -> Iterator[Optional[Sharding]]:
    """Join the process group a launcher such as ``torchrun`` describes in the environment
    (``WORLD_SIZE`` > 1; gloo for CPU models, nccl for CUDA ones) for the duration of the
    block, and give its sharding; None in a single process. A group that is already
    initialised is used as it is (and left alone).

    >>> with process_group_from_env() as sharding:  # a single process: nothing to join
    ...     print(sharding)
    None
    """
    if dist.is_available() and dist.is_initialized():
        yield resolve()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    log.info("joined a process group of %d ranks as rank %d", dist.get_world_size(), dist.get_rank())
    try:
        yield Sharding()
    finally:
        dist.destroy_process_group()


def is_main(sharding: Optional[Sharding]) -> bool:
    """True on rank 0 (and in a single process): the rank that solves and writes files."""
    return sharding is None or sharding.rank == 0


def shard(data: Iterable[T], sharding: Optional[Sharding]) -> Iterator[T]:
    """This rank's batches: all of them when ``sharding`` is None or presharded, else every
    world-th batch starting at the rank (deterministic: the same split on every run)."""
    if sharding is None or sharding.presharded:
        yield from data
        return
    rank, world = sharding.rank, sharding.world
    for k, batch in enumerate(data):
        if k % world == rank:
            yield batch


@contextmanager
def together(sharding: Optional[Sharding], what: str):
    """Run this rank's share of a step that ends in collectives: if the step raises on any
    rank, every rank raises (the failing one its own error), so no rank is left waiting in a
    collective for a rank that gave up."""
    error: Optional[BaseException] = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = e
    if sharding is not None:
        failed = torch.tensor([0.0 if error is None else 1.0],
                              device=_collective_device(sharding, torch.device("cpu")))
        dist.all_reduce(failed, group=sharding.group)
        if error is None and failed.item() > 0:
            raise RuntimeError(f"{what} failed on another rank (its error is reported there)")
    if error is not None:
        raise error


def _device_of(accs) -> torch.device:
    return next((a.flat.device for a in accs), torch.device("cpu"))


def _collective_device(sharding: Sharding, device: torch.device) -> torch.device:
    """nccl reduces CUDA tensors only; gloo CPU tensors (our accumulators already live on the
    models' device, so this only matters for the small bookkeeping tensors)."""
    backend = dist.get_backend(sharding.group)
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_moments(accs: dict, n_batches: int, sharding: Optional[Sharding]) -> int:
    """Join the :class:`~mudsc_fx.numerics.MomentAccumulator` of every rank (same keys on all
    ranks), in place; returns the total number of batches. Every rank ends with the moments
    of all the data: counts and means are summed, each rank's M2 is recentred on the joint
    mean (``M2_r + n_r (mu_r - mu)(mu_r - mu)^T``) and the M2 are summed."""
    if sharding is None:
        return n_batches
    keys = sorted(accs)
    device = _collective_device(sharding, _device_of(accs.values()))
    counts = torch.tensor([n_batches] + [accs[k].count for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(counts, group=sharding.group)
    if keys:
        weighted = torch.cat([accs[k].mean.to(device) * accs[k].count for k in keys])
        dist.all_reduce(weighted, group=sharding.group)
    offset = 0
    for k, total in zip(keys, counts[1:].tolist()):
        acc, m = accs[k], accs[k].m
        if total > 0:
            acc.recenter_(weighted[offset:offset + m] / total)
        offset += m
        if acc.flat.device != device:  # pragma: no cover - nccl with CPU accumulators
            flat = acc.flat.to(device)
            dist.all_reduce(flat, group=sharding.group)
            acc.flat.copy_(flat)
        else:
            dist.all_reduce(acc.flat, group=sharding.group)
        acc.count = int(total)
    log.debug("all-reduced %d accumulators over %d ranks", len(keys), sharding.world)
    return int(counts[0].item())


def broadcast_object(obj: Any, sharding: Optional[Sharding], src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if sharding is None:
        return obj
    box = [obj if sharding.rank == src else None]
    device = None
    if dist.get_backend(sharding.group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=dist.get_global_rank(sharding.group, src) if sharding.group is not None
                               else src, group=sharding.group, device=device)
    return box[0]


def on_main(fn: Callable[[], T], sharding: Optional[Sharding]) -> T:
    """``fn()`` computed on rank 0 only and broadcast to every rank (rank 0's exception, if
    any, is raised on every rank instead of leaving the others waiting)."""
    if sharding is None:
        return fn()
    result: Any = None
    if sharding.rank == 0:
        try:
            result = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result = ("error", e)
    status, value = broadcast_object(result, sharding)
    if status == "error":
        raise value
    return value


def average_batchnorm(model: torch.nn.Module, n_batches: int, sharding: Optional[Sharding]) -> int:
    """After each rank recomputed BatchNorm statistics on its own batches as cumulative
    averages (momentum None), make every rank hold the average over all batches: running
    mean and variance are weighted by each rank's batch count and summed. Returns the total
    number of batches."""
    if sharding is None:
        return n_batches
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    bufs = [b for m in bns for b in (m.running_mean, m.running_var) if b is not None]
    device = _collective_device(sharding, bufs[0].device if bufs else torch.device("cpu"))
    total = torch.tensor([float(n_batches)], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=sharding.group)
    n = float(total.item())
    if n == 0 or not bufs:
        return int(n)
    flat = torch.cat([b.detach().double().reshape(-1).to(device) for b in bufs]) * n_batches
    dist.all_reduce(flat, group=sharding.group)
    flat /= n
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
    for m in bns:
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(int(n))
    return int(n)
