"""Validating ``argparse`` ``type=`` helpers shared by every command line (``orthoopt CMD`` and
``orthoopt.distributed_rotate``): a number outside its range is refused while the arguments are
parsed, so the command exits 2 with ``orthoopt CMD: error: argument --FLAG: ...`` before any work.

* :func:`integer` -- an integer in ``[low, high]`` (``high`` defaults to the int64 maximum, since
  every count ends up in a torch or numpy integer), or one of ``also`` (``16`` = "off" for bits);
* :func:`real` -- a finite float (never NaN or inf) in a range whose ends may be open.

``tests/test_faults.py::test_every_numeric_flag_refuses_bad_values_naming_the_flag`` feeds every
numeric flag of every parser 0, -1, NaN, inf and a huge value.
"""

from __future__ import annotations

import argparse
import math

INT64_MAX = 2**63 - 1


def integer(low: int | None = None, high: int | None = INT64_MAX, also: tuple[int, ...] = ()):
    """A ``type=`` for an integer in ``[low, high]`` (None: unbounded on that side) or in ``also``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value in also:
            return value
        if (low is not None and value < low) or (high is not None and value > high):
            shown = high if high != INT64_MAX or (high is not None and value > high) else None  # int64: if passed
            span = (f"in [{low}, {shown}]" if low is not None and shown is not None
                    else f">= {low}" if low is not None else f"<= {shown}")
            extra = "".join(f" or {a}" for a in also)
            raise argparse.ArgumentTypeError(f"must be an integer {span}{extra}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def real(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A ``type=`` for a finite float in the range from ``low`` to ``high`` (None: unbounded), each
    end closed unless ``*_open``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            left = "unbounded" if low is None else f"{'(' if low_open else '['}{low:g}"
            right = "unbounded" if high is None else f"{high:g}{')' if high_open else ']'}"
            span = (f"in {left}, {right}" if low is not None and high is not None
                    else f"{'>' if low_open else '>='} {low:g}" if low is not None
                    else f"{'<' if high_open else '<='} {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {span}".rstrip() + f", got {text}")
        return value

    parse.__name__ = "real"
    return parse


__all__ = ["INT64_MAX", "integer", "real"]
