"""Argument checks shared by the library: counts and ids must be integers — never truncated
(`eos_id=128.5`, `max_new_tokens=2.9`, `"3"` are errors, not 128, 2 and 3) — inside their
range. The CLIs (experiments/_cli.py) check their own arguments with the same rules."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["as_int"]


def as_int(value: Any, what: str, *, minimum: int | None = None, maximum: int | None = None,
           exc: type[Exception] = ValueError, allow_str: bool = False) -> int:
    """`value` as a Python int when it is an integer (a Python or numpy integer, a 0-d
    integer array; with `allow_str` also a string of decimal digits, as text
    configurations pass them) inside [minimum, maximum]; else `exc` naming `what`.
    Floats — even 3.0 — bools and other strings are refused."""
    if allow_str and isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            value = int(text)
    if isinstance(value, bool):
        raise exc(f"{what} must be an integer, got the boolean {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise exc(f"{what} must be an integer, got {value!r} ({type(value).__name__})"
                  ) from None
    if minimum is not None and n < minimum:
        raise exc(f"{what} must be >= {minimum}, got {n}")
    if maximum is not None and n > maximum:
        raise exc(f"{what} must be <= {maximum}, got {n}")
    return n
