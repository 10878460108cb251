"""``mudsc-fx``: inspect, check, merge, demo. Each command is a module here that only parses,
validates and calls the library; ``main`` turns every expected error into one clear line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from . import check, demo, inspect, merge
from .common import fail

COMMANDS = (inspect, check, merge, demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mudsc-fx", description="Merge neural networks without training.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:
        return fail(str(e))
