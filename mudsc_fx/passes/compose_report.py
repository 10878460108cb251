"""What the compositional fallback merged and what it only averaged (frozen records + views)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class UnitReport:
    """A traced submodule: merged with its interface fixed. ``params``: floating parameter and
    buffer elements inside it; ``coverage``: fraction of its hidden units that can move."""
    path: str
    module: str
    params: int
    calls: int
    spaces: int
    free: int
    coverage: float
    barriers: int
    max_abs_err: float


@dataclass(frozen=True)
class AveragedPart:
    """Parameters owned directly by a module that is not inside any unit: only averaged."""
    path: str
    module: str
    params: int
    names: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Untraced:
    """A module with parameters that was tried and is not a unit (its children were tried)."""
    path: str
    module: str
    reason: str


@dataclass(frozen=True)
class CompositionReport:
    model: str
    whole_error: Optional[str]
    units: tuple[UnitReport, ...]
    averaged: tuple[AveragedPart, ...]
    untraced: tuple[Untraced, ...]
    total_params: int
    max_abs_err: Optional[float]     # whole-model proof with every unit permuted (None: not run)
    proof_dtype: str = "float64"     # float32 for models whose forward does not run in float64

    @property
    def merged_params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def averaged_params(self) -> int:
        return sum(a.params for a in self.averaged)

    @property
    def merged_fraction(self) -> float:
        return self.merged_params / self.total_params if self.total_params else 1.0

    def headline(self) -> str:
        return (f"{self.model} does not trace as a whole; merged {len(self.units)} traced submodules separately "
                f"with their interfaces fixed ({self.merged_fraction:.1%} of parameters); "
                f"{self.averaged_params} parameters in {len(self.averaged)} modules are only averaged")

    def summary(self) -> str:
        lines = [self.headline()]
        if self.whole_error:
            lines.append(f"  whole model: {self.whole_error.splitlines()[0][:200]}")
        if self.max_abs_err is not None:
            lines.append(f"  proof on the whole model (all units permuted, {self.proof_dtype}): "
                         f"max abs error {self.max_abs_err:.2g}")
        lines.append(f"  {'merged submodule':<36} {'module':<24} {'params':>10} {'calls':>5} {'spaces':>6} "
                     f"{'free':>5} {'coverage':>8} {'barriers':>8}")
        for u in self.units:
            lines.append(f"  {u.path:<36} {u.module:<24} {u.params:>10} {u.calls:>5} {u.spaces:>6} {u.free:>5} "
                         f"{u.coverage:>8.3f} {u.barriers:>8}")
        if self.averaged:
            lines.append(f"  {'only averaged':<36} {'module':<24} {'params':>10}  reason")
            for a in self.averaged:
                lines.append(f"  {a.path:<36} {a.module:<24} {a.params:>10}  {a.reason[:160]}")
        if self.untraced:
            lines.append("  not traced (its children were tried):")
            for t in self.untraced:
                lines.append(f"    {t.path:<34} {t.module:<24} {t.reason[:160]}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["merged_params"] = self.merged_params
        d["averaged_params"] = self.averaged_params
        d["merged_fraction"] = self.merged_fraction
        return d
