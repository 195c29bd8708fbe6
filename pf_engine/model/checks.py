"""Type and range checks for values read from files (config.json, bank metadata, GGUF headers).

Each ``need_*`` returns the value when it is what was expected, else raises ``err`` (a PFError
class) with one line: ``{what} is {value}; expected {expected}``.  ``one_line`` makes any
third-party exception message fit an error line.
"""
from __future__ import annotations

import math

from pf_engine.errors import PFError


def short(value, n: int = 60) -> str:
    """repr(value) cut to n characters."""
    s = repr(value)
    return s if len(s) <= n else s[:n - 3] + "..."


def one_line(message, n: int = 300) -> str:
    """A message (or exception) on one line: whitespace runs collapsed, cut to n characters."""
    s = " ".join(str(message).split()) or type(message).__name__
    return s if len(s) <= n else s[:n - 3] + "..."


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def fail(err, what: str, value, expected: str):
    raise err(f"{what} is {short(value)}; expected {expected}")


def need_int(v, what: str, lo: int | None = None, hi: int | None = None, err=PFError) -> int:
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = (f" >= {lo}" if hi is None else f" in [{lo}, {hi}]") if lo is not None else ""
        fail(err, what, v, f"an integer{rng}")
    return v


def need_number(v, what: str, lo: float | None = None, positive: bool = False,
                err=PFError) -> float:
    if not is_number(v) or (lo is not None and v < lo) or (positive and v <= 0):
        fail(err, what, v,
             "a finite number" + (" > 0" if positive else f" >= {lo}" if lo is not None else ""))
    return float(v)


def need_bool(v, what: str, err=PFError) -> bool:
    if not isinstance(v, bool):
        fail(err, what, v, "true or false")
    return v


def need_str(v, what: str, err=PFError) -> str:
    if not isinstance(v, str) or not v:
        fail(err, what, v, "a non-empty string")
    return v


def need_list(v, what: str, item, expected: str, length: int | None = None, err=PFError) -> list:
    """A list whose every element passes ``item(x) -> bool`` (and of ``length`` when given)."""
    if (not isinstance(v, list) or not all(item(x) for x in v)
            or (length is not None and len(v) != length)):
        fail(err, what, v,
             f"a list of {length if length is not None else ''} {expected}".replace("  ", " "))
    return v


def need_dict(v, what: str, err=PFError) -> dict:
    if not isinstance(v, dict):
        fail(err, what, v, "a JSON object")
    return v
