"""The matching methods: a registry of named presets (the rows of the MuDSC paper and any a user
adds), each a :class:`MatchConfig` of one matching family, and :func:`method_config`, which
resolves a method name and ``alpha`` to the config a solve runs.

A family (``MatchConfig.match``) names the matcher that turns similarities into matchings
(:mod:`mudsc_fx.solvers.families`: "align", "zip"). Within a family up to three rows share
the matcher and differ in what they measure: the activation-only row (alpha 0), the
dual-space row (any alpha in [0, 1]) and the weight-only row (alpha 1).

Adding a method is one module that defines its matcher (if it is a new family) and calls
:func:`register_method`::

    class Nearest(Matcher): ...
    register_method("nearest", MatchConfig(match="nearest", alpha=0.5), matcher=Nearest())
    mf.merge(models, data, method="nearest")
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any, Optional

from .passes.solve import MatchConfig
from .solvers.families import MATCHERS, Matcher, register_matcher
from .validation import check_bool, check_int, check_real

__all__ = ["PRESETS", "ROWS", "register_method", "method_config", "family_methods", "default_method"]

PRESETS: dict[str, MatchConfig] = {
    "average": MatchConfig(match=None, alpha=0.0, iterate=False),
    "rebasin": MatchConfig(match="align", alpha=1.0, iterate=True, weight_kind="inner", patience=1),
    "act_align": MatchConfig(match="align", alpha=0.0, iterate=False),
    "mudsc_align": MatchConfig(match="align", alpha=0.5, iterate=True),
    "zipit": MatchConfig(match="zip", alpha=0.0, iterate=False),
    "weight_zip": MatchConfig(match="zip", alpha=1.0, iterate=True),
    "mudsc_zip": MatchConfig(match="zip", alpha=0.5, iterate=True),
}
ROWS = ("activation", "dual", "weight")
# per matching family: (activation-only row, dual-space row, weight-only row); None: no such row
_FAMILY: dict[str, tuple[Optional[str], Optional[str], Optional[str]]] = {
    "align": ("act_align", "mudsc_align", "rebasin"), "zip": ("zipit", "mudsc_zip", "weight_zip")}
_ZIP_ONLY = ("zip_a", "zip_b", "zip_b_blocked")


def register_method(name: str, config: MatchConfig, *, row: str = "dual", matcher: Optional[Matcher] = None,
                    replace_existing: bool = False) -> None:
    """Add the preset ``name`` (usable as ``method=name`` everywhere a method is named).

    ``config.match`` is its family; ``matcher`` registers that family's matcher when it is a
    new one. ``row``: "dual" (takes any alpha; alpha 0 and 1 resolve to the family's
    activation and weight rows when it has them), "activation" (alpha 0 only) or "weight"
    (alpha 1 only)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier-like string, got {name!r}")
    if name in PRESETS and not replace_existing:
        raise ValueError(f"method {name!r} is already registered (pass replace_existing=True to redefine it)")
    if not isinstance(config, MatchConfig):
        raise TypeError(f"method {name!r}: config must be a mudsc_fx.MatchConfig, got {type(config).__name__}")
    if row not in ROWS:
        raise ValueError(f"method {name!r}: row must be one of {', '.join(ROWS)}, got {row!r}")
    family = config.match
    if family is None:
        raise ValueError(f"method {name!r}: config.match names the matching family (e.g. 'align', 'zip'); "
                         "plain averaging is the 'average' method")
    if matcher is not None:
        register_matcher(family, matcher)
    elif family not in MATCHERS:
        raise ValueError(f"method {name!r}: no matcher for family {family!r}; pass matcher= "
                         f"(registered families: {', '.join(MATCHERS)})")
    want = {"activation": 0.0, "weight": 1.0}.get(row)
    if want is not None and config.alpha != want:
        raise ValueError(f"method {name!r}: the {row}-only row has alpha {want:g}, got {config.alpha!r}")
    _check_match_options(config)
    rows = list(_FAMILY.get(family, (None, None, None)))
    rows[ROWS.index(row)] = name
    PRESETS[name] = config
    _FAMILY[family] = tuple(rows)


def family_methods(family: str) -> tuple[str, ...]:
    """The registered rows of a matching family (activation, dual, weight; missing ones left out)."""
    return tuple(m for m in _FAMILY.get(family, ()) if m is not None)


def default_method(match: Optional[str] = None) -> str:
    """The method a merge uses when none is named: the dual-space row of family ``match``
    (of "zip" when no family is named either)."""
    if match is None:
        return "mudsc_zip"
    rows = _FAMILY[match]
    return rows[1] or next(m for m in rows if m is not None)


def _check_option_names(method: str, cfg: MatchConfig, overrides: dict) -> None:
    valid = {f.name for f in dataclasses.fields(MatchConfig)} - {"match", "alpha"}
    for key in overrides:
        if key not in valid:
            raise ValueError(f"unknown merge option {key!r}; valid options: {', '.join(sorted(valid))}, "
                             "leaf_modules, fixed_params, frontend, stats_budget_bytes, verify, progress")
    if cfg.match != "zip":
        for key in _ZIP_ONLY:
            if key in overrides:
                raise ValueError(f"{key} applies to the zip methods ({', '.join(family_methods('zip'))}), "
                                 f"not to method {method!r}")
    if cfg.match is None and overrides:
        raise ValueError(f"method 'average' matches nothing: options {sorted(overrides)} mean nothing for it")


def _check_match_options(cfg: MatchConfig) -> None:
    check_real("zip_a", cfg.zip_a, hi=1.0)
    check_real("zip_b", cfg.zip_b, 0.0, 1.0)
    check_real("zip_b_blocked", cfg.zip_b_blocked, 0.0, 1.0)
    if cfg.weight_kind not in ("pearson", "inner"):
        raise ValueError(f"weight_kind must be 'pearson' (MuDSC) or 'inner' (Git Re-Basin), got {cfg.weight_kind!r}")
    check_bool("weight_normalize", cfg.weight_normalize)
    check_bool("iterate", cfg.iterate)
    check_int("patience", cfg.patience, 1)
    check_int("max_sweeps", cfg.max_sweeps, 1)


def method_config(method: Optional[str] = None, alpha: Optional[float] = None, match: Optional[str] = None,
                  **overrides: Any) -> MatchConfig:
    """Resolve a preset name (or ``match=`` a family: "align", "zip", ...) and ``alpha`` to a
    MatchConfig.

    ``alpha`` weighs the weight similarity. The dual-space rows (mudsc_align, mudsc_zip) take
    any alpha in [0, 1]; 0 and 1 are the family's single-space rows. The single-space rows
    (act_align, zipit: alpha 0; rebasin, weight_zip: alpha 1) and average accept no other
    alpha: such a combination means nothing and is an error.

    >>> method_config("mudsc_zip", 0.3).alpha
    0.3
    """
    if match is not None:
        if match not in _FAMILY:
            raise ValueError(f"unknown match {match!r}; choose one of {', '.join(repr(f) for f in _FAMILY)}")
        if method is None:
            method = default_method(match)
        elif method not in family_methods(match):
            raise ValueError(f"match={match!r} contradicts method={method!r} (a "
                             f"{PRESETS[method].match if method in PRESETS else 'unknown'} method); "
                             f"{match} methods are {', '.join(family_methods(match))}")
    method = default_method() if method is None else method
    if not isinstance(method, str) or method not in PRESETS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[method]
    if alpha is not None:
        alpha = check_real("alpha", alpha, 0.0, 1.0)
        if cfg.match is None:
            raise ValueError("method 'average' does not use alpha (it matches nothing)")
        fam = _FAMILY[cfg.match]
        if method != fam[1]:
            if alpha != cfg.alpha:
                hint = f"; for alpha={alpha:g} use method {fam[1]!r}" if fam[1] else ""
                raise ValueError(f"method {method!r} is the {'activation' if cfg.alpha == 0 else 'weight'}-only row "
                                 f"(alpha={cfg.alpha:g}){hint}")
        elif alpha == 0.0 and fam[0]:
            cfg = PRESETS[fam[0]]
        elif alpha == 1.0 and fam[2]:
            cfg = PRESETS[fam[2]]
        else:
            cfg = replace(cfg, alpha=alpha)
    _check_option_names(method, cfg, overrides)
    cfg = replace(cfg, **overrides) if overrides else cfg
    _check_match_options(cfg)
    return cfg
