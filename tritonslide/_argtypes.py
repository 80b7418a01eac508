"""argparse ``type=`` functions shared by the ``tritonslide`` subcommands (a bad value is a usage error, exit 2)."""

from __future__ import annotations

import argparse
from typing import Callable


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def csv_list(choices: tuple[str, ...] | None, what: str) -> Callable[[str], list[str]]:
    """A comma-separated list, each item one of ``choices`` (any when None)."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; expected {', '.join(choices)}")
        return items

    return parse
