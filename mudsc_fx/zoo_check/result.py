"""What a zoo check records per model, and the report file (JSON) that is also a baseline.

Besides the check's numbers, a result keeps each free space's *signature* (its size and the
parameter axes it moves, written without space ids, which change when inference changes), so
a later run can name the spaces that became fixed."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

from ..ir.graph import Member, PermutationGraph
from ..ir.layout import Concat, Fixed, Kron, Layout, Plain

STATUSES = ("ok", "FAIL", "error", "skipped")
MAX_MEMBERS = 8   # per space signature: enough to recognise and name it
FORMAT = "mudsc-fx zoo report 1"


@dataclass(frozen=True)
class SpaceSignature:
    """A free space as a later run can recognise it: ``members`` are the first (sorted)
    ``param[axis]`` that carry its units, with the position when the space is only part of the
    axis (``cat2/5``: part 2 of 5 of a concatenation; ``kron(*,1,49)``: a flatten). Head
    spaces list the members of the unit spaces whose blocks they move, prefixed ``heads:``."""
    id: int
    size: int
    kind: str
    members: tuple[str, ...]
    n_members: int = 0   # before the list was cut to MAX_MEMBERS (0: not cut)

    def label(self, limit: int = 3) -> str:
        total = max(self.n_members, len(self.members))
        shown = ", ".join(self.members[:limit])
        more = f", +{total - limit} more" if total > limit else ""
        return f"S{self.id} ({self.kind}, size {self.size}: {shown}{more})"


@dataclass(frozen=True)
class ModelResult:
    """One model of a zoo check. ``status``: ok (proven), FAIL (outputs differ), error (the
    model could not be built, traced or checked, or hit a limit), skipped (``error`` holds the
    reason). ``seconds`` and ``peak_rss_mb`` are measurements; everything else is determined by
    the model, the seed and the code."""
    model: str
    status: str
    input: str = ""
    n_params: Optional[int] = None
    spaces: Optional[int] = None
    free: Optional[int] = None
    coverage: Optional[float] = None
    max_abs_err: Optional[float] = None
    tolerance: Optional[float] = None
    barriers: tuple[str, ...] = ()
    free_spaces: tuple[SpaceSignature, ...] = ()
    failing_spaces: tuple[SpaceSignature, ...] = ()
    error: Optional[str] = None
    seconds: float = 0.0
    peak_rss_mb: Optional[float] = None

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "error")

    def failure(self) -> str:
        """What went wrong, in one line (FAIL: the error and the failing spaces)."""
        if self.status != "FAIL":
            return self.error or self.status
        text = (f"outputs differ after a valid permutation of every free space: max abs err "
                f"{self.max_abs_err:.3g} > tolerance {self.tolerance:.3g}")
        if self.failing_spaces:
            text += "; failing spaces: " + "; ".join(s.label() for s in self.failing_spaces[:4])
            if len(self.failing_spaces) > 4:
                text += f"; +{len(self.failing_spaces) - 4} more"
        return text

    def outcome(self) -> dict:
        """Everything but the measurements: equal for a serial and a parallel run."""
        d = self.to_dict()
        d.pop("seconds")
        d.pop("peak_rss_mb")
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        d["barrier_nodes"] = list(d.pop("barriers"))
        d["barriers"] = len(self.barriers)
        for key in ("free_spaces", "failing_spaces"):
            d[key] = [{"id": s.id, "size": s.size, "kind": s.kind, "members": list(s.members),
                       **({"n_members": s.n_members} if s.n_members else {})} for s in getattr(self, key)]
        if self.status == "skipped":
            d["reason"] = d.pop("error")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelResult":
        if d.get("status") not in STATUSES or "model" not in d:
            raise ValueError(f"not a zoo report row (model and status in {STATUSES}): {str(d)[:120]}")
        def spaces(key):
            return tuple(SpaceSignature(s["id"], s["size"], s.get("kind", "unit"), tuple(s["members"]),
                                        s.get("n_members", 0)) for s in d.get(key) or ())
        return cls(model=d["model"], status=d["status"], input=d.get("input") or "", n_params=d.get("n_params"),
                   spaces=d.get("spaces"), free=d.get("free"), coverage=d.get("coverage"),
                   max_abs_err=d.get("max_abs_err"), tolerance=d.get("tolerance"),
                   barriers=tuple(d.get("barrier_nodes") or ()), free_spaces=spaces("free_spaces"),
                   failing_spaces=spaces("failing_spaces"),
                   error=d.get("error") or d.get("reason"), seconds=d.get("seconds") or 0.0,
                   peak_rss_mb=d.get("peak_rss_mb"))


@dataclass(frozen=True)
class ZooReport:
    """A whole run: its results in zoo order, the seed, and the library versions."""
    zoo: str
    results: tuple[ModelResult, ...]
    seed: int = 0
    versions: dict = field(default_factory=dict, compare=False)
    jobs: int = 1
    seconds: float = 0.0

    def by_model(self) -> dict[str, ModelResult]:
        return {r.model: r for r in self.results}

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def to_json(self) -> str:
        head = {"format": FORMAT, "zoo": self.zoo, "seed": self.seed, "jobs": self.jobs,
                "seconds": round(self.seconds, 1), "versions": self.versions, "counts": self.counts()}
        # one line per model keeps the file diffable
        rows = ",\n".join("  " + json.dumps(r.to_dict()) for r in self.results)
        return json.dumps(head, indent=1)[:-2] + ',\n "results": [\n' + rows + "\n ]\n}\n"

    def write(self, path) -> None:
        Path(path).write_text(self.to_json())

    def merged_into(self, older: "ZooReport") -> "ZooReport":
        """``older`` with this run's results replacing or extending its rows (a run over part
        of a zoo updates only those models of a baseline)."""
        mine = self.by_model()
        rows = [mine.pop(r.model, r) for r in older.results] + list(mine.values())
        return replace(self, results=tuple(rows))


def load_report(path) -> ZooReport:
    """Read a report written by :meth:`ZooReport.write` (or the older list-of-rows JSON)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no zoo report at {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not a zoo report (invalid JSON: {e})") from None
    if isinstance(data, list):
        return ZooReport(zoo="", results=tuple(ModelResult.from_dict(d) for d in data))
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError(f"{p} is not a zoo report (no 'results')")
    try:
        rows = tuple(ModelResult.from_dict(d) for d in data["results"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from None
    return ZooReport(zoo=data.get("zoo", ""), results=rows, seed=data.get("seed", 0),
                     versions=data.get("versions", {}), jobs=data.get("jobs", 1),
                     seconds=data.get("seconds", 0.0))


def library_versions() -> dict:
    import sys
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "transformers", "mudsc_fx"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            out[name] = str(mod.__version__)
    return out


# -- signatures ---------------------------------------------------------------------------

def space_signatures(pg: PermutationGraph, ids) -> tuple[SpaceSignature, ...]:
    """Signatures of spaces ``ids``. Only the axes that carry the space's units (role ``out``)
    are listed: they identify the space (a space that becomes fixed loses all of them) at a
    fraction of the size (a DenseNet space is read by every later layer of its block)."""
    ties = pg.ties()
    out = []
    for sid in ids:
        space = pg.spaces[sid]
        if space.kind == "head":
            members = ["heads:" + sig for t in ties.get(sid, ()) for sig in _member_signatures(pg.spaces[t].members, t)]
        else:
            members = _member_signatures(space.members, sid)
        members = sorted(set(members))
        out.append(SpaceSignature(sid, space.size, space.kind, tuple(members[:MAX_MEMBERS]),
                                  len(members) if len(members) > MAX_MEMBERS else 0))
    return tuple(out)


def _member_signatures(members: Sequence[Member], sid: int) -> list[str]:
    carriers = [m for m in members if m.role == "out"] or list(members)
    return [_member_signature(m, sid) for m in carriers]


def _member_signature(m: Member, sid: int) -> str:
    base = f"{m.fqn}[{m.axis}]" + ("" if m.role == "out" else f"<{m.role}>")
    if isinstance(m.layout, Plain):
        return base
    return f"{base} {_position(m.layout, sid)}"


def _position(layout: Layout, sid: int) -> Optional[str]:
    """Where space ``sid`` sits in a composite axis layout, without other space ids:
    ``cat2/5`` (part 2 of 5), ``kron(*,1,49)`` (a flatten), nested as needed."""
    if isinstance(layout, Plain):
        return "*" if layout.space == sid else None
    if isinstance(layout, Fixed):
        return None
    if isinstance(layout, Concat):
        hits = [(i, _position(p, sid)) for i, p in enumerate(layout.parts)]
        hits = [f"{i}" if h == "*" else f"{i}({h})" for i, h in hits if h is not None]
        return f"cat{','.join(hits)}/{len(layout.parts)}" if hits else None
    if isinstance(layout, Kron):
        inner = _position(layout.inner, sid)
        return None if inner is None else f"kron({inner},{layout.outer},{layout.inner_rep})"
    return type(layout).__name__


def rows_equal(a: Sequence[ModelResult], b: Sequence[ModelResult]) -> bool:
    """Same models in the same order with the same outcomes (measurements aside)."""
    return [r.outcome() for r in a] == [r.outcome() for r in b]
