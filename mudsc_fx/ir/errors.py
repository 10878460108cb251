"""Errors of the front ends, and where in the user's code they happened."""
from __future__ import annotations

import traceback


class TraceError(ValueError):
    """The model could not be traced; the message says where and what to do."""


def user_frame(exc: BaseException) -> str:
    """The innermost frame of ``exc`` in the user's code (not torch's, not ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if "/torch/" not in fr.filename and "mudsc_fx" not in fr.filename:
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}"
    return "(no user frame found)"
