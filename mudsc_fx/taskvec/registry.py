"""The registry of task-vector methods: names, options with their defaults and checks, drivers.

A method is one :class:`TaskVectorMethod`: its name, a one-line summary, its :class:`Option` s
(default, check, help) and two drivers, one over modules in memory and one from checkpoint
files to an output file. The library functions (``task_arithmetic``, ...), the file API
(:func:`mudsc_fx.taskvec.merge_checkpoints`) and the command line (``mudsc-fx merge --method``,
its flags and their defaults) all read this table, so they agree by construction.

Adding a method: write its module (the per-chunk math and, for methods whose result is one
merged checkpoint, a generator for :func:`mudsc_fx.taskvec.driver.checkpoint_method`), call
:func:`register_method` at import, import the module in ``mudsc_fx/taskvec/__init__.py``, and
test it against a dense reference.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..validation import check_bool

__all__ = ["Option", "TaskVectorMethod", "register_method", "get_method", "method_names",
           "nonnegative_number", "fraction", "flag", "choice"]


def nonnegative_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} scales the task vectors and must be a finite number >= 0, got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} is the kept fraction of each task vector and must be in (0, 1], got {value!r}")
    return float(value)


flag = check_bool  # True or False, nothing else


def choice(*values: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in values:
            raise ValueError(f"{name} must be one of {values}, got {value!r}")
        return value
    check.choices = values  # type: ignore[attr-defined]  (the CLI lists them)
    return check


@dataclass(frozen=True)
class Option:
    """One option of a method: its name, default, check (returns the clean value) and help."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    help: str


@dataclass(frozen=True)
class TaskVectorMethod:
    """A registered task-vector method.

    ``output`` is ``"checkpoint"`` (one merged model) or ``"emr"`` (an EMR artifact: shared
    task vector, per-task masks and rescalers). ``merge_modules(base, models, keep, options)``
    works on modules in memory; ``merge_files(base, models, output, keep, options, chunk_size)``
    streams checkpoint files into ``output``. Both receive options resolved by
    :meth:`resolve`.
    """

    name: str
    summary: str
    options: tuple[Option, ...]
    output: str
    merge_modules: Callable[..., Any]
    merge_files: Callable[..., Any]
    output_suffixes: tuple[str, ...]

    @property
    def defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every value checked; unknown names are an error."""
        known = {option.name: option for option in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{self.name} has no option {unknown[0]!r} (its options: {sorted(known) or 'none'})")
        out = {}
        for name, option in known.items():
            try:
                out[name] = option.check(name, options.get(name, option.default))
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None
        return out


_METHODS: dict[str, TaskVectorMethod] = {}


def register_method(method: TaskVectorMethod) -> TaskVectorMethod:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if method.name in _METHODS:
        raise ValueError(f"a task-vector method named {method.name!r} is already registered")
    if method.output not in ("checkpoint", "emr"):
        raise ValueError(f"{method.name}: output must be 'checkpoint' or 'emr', got {method.output!r}")
    for option in method.options:
        option.check(option.name, option.default)  # a default must pass its own check
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> TaskVectorMethod:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task-vector method {name!r}; registered: {method_names()}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)
