"""Compare a zoo run with a baseline run: what got worse (a regression fails CI), what got
better, what is still broken.

A regression is, per model: a new equivalence failure (FAIL), a new error (trace, build or
limit), a coverage drop, or a free space of the baseline whose parameter axes no longer all
move (named by its signature). A model the baseline does not know counts when it fails. A
model that still fails as it did in the baseline is known, not new."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .result import ModelResult, SpaceSignature, ZooReport

COVERAGE_EPS = 1e-6   # coverage is a ratio of unit counts, stored to 4 digits


@dataclass(frozen=True)
class Change:
    """One difference for one model. ``kind``: new FAIL, new error, coverage drop, spaces
    lost (regressions); fixed, coverage gain, new model, newly skipped, still failing."""
    model: str
    kind: str
    regression: bool
    detail: str
    lost: tuple[SpaceSignature, ...] = ()
    new_barriers: tuple[str, ...] = ()

    def line(self) -> str:
        head = "REGRESSION" if self.regression else "note"
        text = f"{head} {self.model}: {self.kind}: {self.detail}"
        if self.lost:
            text += "\n    free spaces that became fixed:" + "".join(f"\n      {s.label()}" for s in self.lost)
        if self.new_barriers:
            text += "\n    new barriers: " + "; ".join(self.new_barriers[:8])
            if len(self.new_barriers) > 8:
                text += f"; +{len(self.new_barriers) - 8} more"
        return text


@dataclass(frozen=True)
class Comparison:
    changes: tuple[Change, ...]
    not_run: tuple[str, ...] = ()          # baseline models this run did not include
    version_notes: tuple[str, ...] = ()    # library versions that differ from the baseline's

    @property
    def regressions(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.regression)

    @property
    def ok(self) -> bool:
        return not self.regressions

    def for_model(self, model: str) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.model == model)

    def summary(self) -> str:
        n_reg = len(self.regressions)
        n_better = sum(c.kind in ("fixed", "coverage gain") for c in self.changes)
        text = f"{n_reg} regression{'s' * (n_reg != 1)}, {n_better} improvement{'s' * (n_better != 1)}"
        if self.not_run:
            text += f", {len(self.not_run)} baseline models not in this run"
        return text

    def lines(self) -> list[str]:
        out = [f"compared with the baseline: {self.summary()}"]
        out += [f"  {note}" for note in self.version_notes]
        order = sorted(self.changes, key=lambda c: not c.regression)   # regressions first, stable
        out += ["  " + c.line().replace("\n", "\n  ") for c in order]
        return out


def compare(baseline: ZooReport, current: ZooReport) -> Comparison:
    base = baseline.by_model()
    changes: list[Change] = []
    for r in current.results:
        changes += _compare_model(base.get(r.model), r)
    seen = {r.model for r in current.results}
    not_run = tuple(m for m in base if m not in seen)
    return Comparison(tuple(changes), not_run, _version_notes(baseline.versions, current.versions))


def _compare_model(b: Optional[ModelResult], r: ModelResult) -> list[Change]:
    if b is None:
        if r.failed:
            return [Change(r.model, f"new {r.status}", True, f"not in the baseline; {r.failure()}")]
        return [Change(r.model, "new model", False, f"not in the baseline; {r.status}")]
    if r.failed:
        if r.status == b.status:
            return [Change(r.model, "still failing", False, r.failure())]
        return [Change(r.model, f"new {r.status}", True, f"was {b.status}; now {r.failure()}")]
    if b.failed and r.status == "ok":
        return [Change(r.model, "fixed", False, f"was {b.status}; now ok, coverage {r.coverage:.3f}")]
    if r.status == "skipped" and b.status != "skipped":
        return [Change(r.model, "newly skipped", False, f"was {b.status}; now skipped: {r.error}")]
    if r.status != "ok" or b.status != "ok":
        return []
    out = []
    lost = lost_spaces(b, r)
    new_barriers = tuple(x for x in r.barriers if x not in set(b.barriers))
    drop = (b.coverage or 0.0) - (r.coverage or 0.0)
    if drop > COVERAGE_EPS:
        out.append(Change(r.model, "coverage drop", True,
                          f"coverage {b.coverage:.4f} -> {r.coverage:.4f} (-{drop:.4f}); free spaces "
                          f"{b.free} -> {r.free}", lost, new_barriers))
    elif lost:
        out.append(Change(r.model, "spaces lost", True,
                          f"{len(lost)} free space{'s' * (len(lost) != 1)} of the baseline no longer move "
                          f"(coverage {r.coverage:.4f} unchanged)", lost, new_barriers))
    elif -drop > COVERAGE_EPS:
        out.append(Change(r.model, "coverage gain", False, f"coverage {b.coverage:.4f} -> {r.coverage:.4f}"))
    return out


def lost_spaces(b: ModelResult, r: ModelResult) -> tuple[SpaceSignature, ...]:
    """Baseline free spaces none of whose listed axes is in a free space of ``r``. A space that
    becomes fixed loses all of them; one split into finer free spaces keeps its first axis
    (the first of whichever part holds it). A space of which only a part became fixed shows
    as a coverage drop without a name."""
    now = {m for s in r.free_spaces for m in s.members}
    return tuple(s for s in b.free_spaces if s.members and not now & set(s.members))


def _version_notes(old: dict, new: dict) -> tuple[str, ...]:
    return tuple(f"{k} {old[k]} in the baseline, {new[k]} now" for k in sorted(set(old) & set(new))
                 if k != "python" and old[k] != new[k])
