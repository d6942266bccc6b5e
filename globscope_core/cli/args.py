"""Argument types shared by the subcommands: argparse refuses a bad value with one line naming the option.

Use them as ``type=`` (``p.add_argument("--epochs", type=positive_int)``), so a value is checked before any work.
"""
from __future__ import annotations

import argparse
import math


def _number(kind, text: str, what: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return v


def positive_int(text: str) -> int:
    v = _number(int, text, "an integer")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {v}")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(int, text, "an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {v}")
    return v


def positive_float(text: str) -> float:
    v = _number(float, text, "a number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return v


def nonnegative_float(text: str) -> float:
    v = _number(float, text, "a number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return v


def fraction(text: str) -> float:
    v = _number(float, text, "a number")
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, not {text}")
    return v


def csv_of(kind):
    """A comma-separated list whose items are checked by ``kind`` (one of the types above, or int/float/str)."""

    def parse(text: str) -> list:
        items = [t for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        out = []
        for t in items:
            try:
                out.append(kind(t.strip()))
            except ValueError:
                raise argparse.ArgumentTypeError(f"cannot parse '{t}' in '{text}'") from None
        return out

    parse.__name__ = f"list of {getattr(kind, '__name__', 'values')}"
    return parse
