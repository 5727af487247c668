"""Formatting half of the policy spec language, plus parameter checks.

It lives apart from ``parse.py`` so that policies can write their own
``describe()`` without importing the parser, while both sides agree on one
number syntax: whatever is printed here must be accepted by ``parse.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["check_int", "check_num", "fmt_call", "fmt_int", "fmt_ms", "fmt_num"]


def fmt_int(value: int) -> str:
    return str(int(value))


def fmt_num(value: float) -> str:
    """Shortest text that reads back as the same float.

    Integral values print without ``.0`` so that common specs stay tidy
    (``max-growth=2``); everything else uses ``repr``, the shortest decimal
    that round-trips, possibly with an exponent (``1e-05``).
    """
    if not math.isfinite(value):
        raise ValueError(f"cannot describe a non-finite number {value!r}")
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def fmt_ms(value: float) -> str:
    """Durations are always printed in milliseconds so they read back
    bit-exactly; seconds would need a lossy division."""
    return f"{fmt_num(value)}ms"


def fmt_call(name: str, args: Iterable[tuple[str, str]]) -> str:
    """``name`` alone when every argument is at its default, else
    ``name(k=v,...)`` listing only the non-defaults, in a fixed order, so the
    output is canonical."""
    body = ",".join(f"{k}={v}" for k, v in args)
    return f"{name}({body})" if body else name


def check_int(owner: str, name: str, value: int, minimum: int) -> None:
    """Rejects bad parameters at construction, so a policy that exists is
    always one ``describe()`` can print and ``parse_policy`` can read back."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def check_num(owner: str, name: str, value: float, *, minimum: float,
              strict: bool = False, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{owner}.{name} must be {op} {fmt_num(minimum)}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}.{name} must be <= {fmt_num(maximum)}, got {value!r}")
