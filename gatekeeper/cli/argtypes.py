"""argparse types for numbers in a range, shared by the commands: one clear line when wrong."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def seconds_in(low: float, high: float) -> Callable[[str], float]:
    """A number of seconds with low < value <= high (low itself allowed when it is not 0)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (low < value if low == 0 else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{text} s is out of range ({low:g} to {high:g} s)")
        return value

    return parse


def whole_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({low} to {high})")
        return value

    return parse
