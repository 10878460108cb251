"""Check the models of a zoo, each in a worker process with a time limit and a memory guard.

Every model is checked in a process forked for it alone (one torch thread), so a model that
crashes, hangs or grows past the memory limit is killed and reported while the sweep goes on,
and each model starts from the same state: its weights are seeded from ``seed``, not from
whatever ran before. With ``jobs=J`` up to J such processes run at once, the longest first;
the results come back in zoo order and equal those of ``jobs=1``."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from typing import Callable, Iterable, Mapping, Optional

import torch

from ..sources import ZooEntry
from .result import ModelResult, space_signatures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Per model: wall-clock ``seconds``, resident memory ``memory_gb`` of its worker (polled;
    the worker is killed above it), and ``max_params``: larger models are skipped without being
    built (a proof holds the model and its float64 copy, about 12 bytes per parameter, on top
    of ~0.7 GB of libraries)."""
    seconds: float = 900.0
    memory_gb: float = 4.0
    max_params: int = 250_000_000

    def __post_init__(self):
        for name in ("seconds", "memory_gb", "max_params"):
            if not getattr(self, name) > 0:
                raise ValueError(f"limit {name} must be positive, got {getattr(self, name)!r}")


_POLL_S = 0.05


def check_model(entry: ZooEntry, seed: int = 0, max_params: int = Limits.max_params) -> ModelResult:
    """Check one zoo entry in this process; any exception becomes an ``error`` result."""
    import mudsc_fx as mf
    t0 = time.perf_counter()
    if entry.skip:
        return ModelResult(entry.name, "skipped", entry.describe_input(), error=entry.skip)
    n_params = entry.n_params if entry.n_params is not None else count_params(entry)
    if n_params is not None and n_params > max_params:
        return ModelResult(entry.name, "skipped", entry.describe_input(), n_params,
                           error=f"{_count(n_params)} parameters (> {_count(max_params)})")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)   # the weights do not depend on what ran before in this process
            model = entry.build()
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"the factory returned a {type(model).__name__}, not an nn.Module")
            model.eval()
            example = entry.example_inputs(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = mf.check(model, example, seed=seed, name=entry.name)
        if n_params is None:
            n_params = sum(p.numel() for p in model.parameters())
    except Exception as ex:  # one broken model must not hide the others
        return ModelResult(entry.name, "error", entry.describe_input(), n_params,
                           error=f"{type(ex).__name__}: {ex}"[:500], seconds=round(time.perf_counter() - t0, 2))
    status = "ok" if rep.ok else ("error" if rep.error else "FAIL")
    pg = rep.graph
    return ModelResult(
        entry.name, status, entry.describe_input(example), n_params, rep.n_spaces, rep.n_free,
        round(rep.coverage, 4), rep.max_abs_err, rep.tolerance,
        tuple(f"{b.node} ({b.op})" for b in rep.barriers),
        *_signatures(pg, rep.failing_spaces), rep.error, round(time.perf_counter() - t0, 2))


def _signatures(pg, failing: tuple[int, ...]) -> tuple[tuple, tuple]:
    """(free spaces that passed, failing spaces) as signatures."""
    if pg is None:
        return (), ()
    passed = [s for s in pg.free_spaces if s not in set(failing)]
    return space_signatures(pg, passed), space_signatures(pg, failing)


def _count(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 10**7 else f"{n:,}"


def count_params(entry: ZooEntry) -> Optional[int]:
    """Parameter count without allocating weights (a build on the meta device); None when the
    factory cannot build there (it loads a checkpoint, calls .item(), ...)."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            m = entry.build()
        return sum(p.numel() for p in m.parameters())
    except Exception:
        return None


def check_zoo(entries: Iterable[ZooEntry], *, jobs: int = 1, seed: int = 0, limits: Limits = Limits(),
              cost: Optional[Mapping[str, float]] = None,
              on_result: Optional[Callable[[ModelResult], None]] = None) -> tuple[ModelResult, ...]:
    """Check every entry, ``jobs`` worker processes at a time; results in entry order.

    ``cost``: expected seconds per model name (e.g. from a previous report) to start the
    longest first; unknown models are ordered by parameter count. ``on_result`` is called with
    each result in entry order as soon as it and all before it are done."""
    entries = list(entries)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"zoo lists model {dup!r} twice")
    if "fork" not in mp.get_all_start_methods():
        log.warning("no fork on this platform: checking in this process, without limits or workers")
        return _in_process(entries, seed, limits, on_result)
    return _Pool(entries, jobs, seed, limits, cost or {}, on_result).run()


def _in_process(entries, seed, limits, on_result) -> tuple[ModelResult, ...]:
    out = []
    for e in entries:
        out.append(check_model(e, seed, limits.max_params))
        if on_result:
            on_result(out[-1])
    return tuple(out)


@dataclass
class _Job:
    index: int
    proc: mp.process.BaseProcess
    conn: object
    start: float
    peak_rss: int = 0


class _Pool:
    """Fork one process per model, at most ``jobs`` at once; poll their memory and time."""

    def __init__(self, entries, jobs, seed, limits, cost, on_result):
        self.entries, self.jobs, self.seed, self.limits = entries, jobs, seed, limits
        self.on_result = on_result
        self.results: list[Optional[ModelResult]] = [None] * len(entries)
        self.emitted = 0
        order = sorted(range(len(entries)), key=lambda i: -_expected(entries[i], cost))
        self.pending = list(reversed(order))   # pop() takes the most expensive first
        self.ctx = mp.get_context("fork")

    def run(self) -> tuple[ModelResult, ...]:
        _warm_up()
        running: list[_Job] = []
        try:
            while self.pending or running:
                while self.pending and len(running) < self.jobs:
                    running.append(self._start(self.pending.pop()))
                wait([j.conn for j in running] + [j.proc.sentinel for j in running], timeout=_POLL_S)
                for job in list(running):
                    result = self._poll(job)
                    if result is not None:
                        running.remove(job)
                        self._finish(job.index, result)
        finally:
            for job in running:   # interrupted: leave no orphans
                job.proc.kill()
                job.proc.join()
        return tuple(self.results)

    def _start(self, index: int) -> _Job:
        receiver, sender = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, args=(sender, self.entries[index], self.seed,
                                                      self.limits.max_params, os.getpid()),
                                name=f"mudsc-fx check {self.entries[index].name}", daemon=True)
        proc.start()
        sender.close()
        return _Job(index, proc, receiver, time.perf_counter())

    def _poll(self, job: _Job) -> Optional[ModelResult]:
        entry = self.entries[job.index]
        if job.conn.poll() or (not job.proc.is_alive() and job.conn.poll()):
            try:
                payload = job.conn.recv()
            except EOFError:
                payload = None
            job.proc.join()
            job.conn.close()
            if isinstance(payload, dict):
                return ModelResult.from_dict(payload)
            return self._died(job, entry)
        if not job.proc.is_alive():
            return self._died(job, entry)
        rss = _rss_bytes(job.proc.pid)
        job.peak_rss = max(job.peak_rss, rss)
        elapsed = time.perf_counter() - job.start
        limit = self.limits.memory_gb * 2**30
        if rss > limit:
            return self._kill(job, entry, f"memory limit: the worker reached {rss / 2**30:.2f} GB RSS "
                                          f"(limit {self.limits.memory_gb:.2f} GB)")
        if elapsed > self.limits.seconds:
            return self._kill(job, entry, f"time limit: still running after {elapsed:.0f} s "
                                          f"(limit {self.limits.seconds:g} s)")
        return None

    def _kill(self, job: _Job, entry: ZooEntry, why: str) -> ModelResult:
        job.proc.kill()
        job.proc.join()
        job.conn.close()
        log.warning("%s: %s", entry.name, why)
        return self._error(job, entry, why)

    def _died(self, job: _Job, entry: ZooEntry) -> ModelResult:
        job.proc.join()
        code = job.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return self._error(job, entry, f"the worker died ({how}) without a result")

    def _error(self, job: _Job, entry: ZooEntry, why: str) -> ModelResult:
        return ModelResult(entry.name, "error", entry.describe_input(), entry.n_params, error=why,
                           seconds=round(time.perf_counter() - job.start, 2),
                           peak_rss_mb=round(job.peak_rss / 2**20, 1))

    def _finish(self, index: int, result: ModelResult) -> None:
        self.results[index] = result
        while self.emitted < len(self.results) and self.results[self.emitted] is not None:
            if self.on_result:
                self.on_result(self.results[self.emitted])
            self.emitted += 1


def _warm_up() -> None:
    """One tiny check here, before forking: the lazy imports and first-call setup of tracing
    then happen once, not in every worker (about 0.2 s per model)."""
    import mudsc_fx as mf
    from torch import nn
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # no OpenMP pool in the parent that forked workers would inherit
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 2))
            mf.check(m, torch.randn(1, 3, 8, 8))
    finally:
        torch.set_num_threads(threads)


def _expected(entry: ZooEntry, cost: Mapping[str, float]) -> float:
    if entry.name in cost:
        return float(cost[entry.name])
    return (entry.n_params or 0) * 1e-6   # ~1 s per million parameters


def _worker(conn, entry: ZooEntry, seed: int, max_params: int, parent: int) -> None:
    _die_with(parent)
    torch.set_num_threads(1)
    try:
        result = check_model(entry, seed, max_params)
        payload = replace(result, peak_rss_mb=round(_peak_rss_bytes() / 2**20, 1)).to_dict()
    except BaseException as ex:  # the parent must get an answer, whatever happened
        payload = ModelResult(entry.name, "error", error=f"{type(ex).__name__}: {ex}"[:500]).to_dict()
        log.debug("worker for %s failed:\n%s", entry.name, traceback.format_exc())
    conn.send(payload)
    conn.close()


def _die_with(parent: int) -> None:
    """A worker must not outlive a parent that was killed (a cancelled CI job): Linux delivers
    SIGKILL to it when the parent dies."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the parent died before the request
        os._exit(1)


def _status_kb(pid, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rss_bytes(pid: int) -> int:
    return _status_kb(pid, "VmRSS:") * 1024


def _peak_rss_bytes() -> int:
    peak = _status_kb("self", "VmHWM:") * 1024
    if peak:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
