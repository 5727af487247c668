"""Text form of convergence policies, for the CLI, config files and logs.

Grammar (whitespace between tokens is ignored; names are lower case)::

    spec  := list                        one term: that policy;
                                         several: any_of(terms...)
    list  := term ("," term)*
    term  := NAME "=" VALUE              a rule's main parameter: max-iter=8
           | NAME "(" [ARG ("," ARG)*] ")"   keyword parameters: incus(goal=80)
           | NAME                        a preset with its defaults: phaul
           | ("any" | "all") "(" list ")"    nested combinators
    ARG   := NAME "=" VALUE

Rules (main parameter first)::

    max-iter=N            MaxIterations(N)             N >= 1
    min-dirty=N           MinDirtyPages(N)             N >= 0
    max-growth=R          MaxDirtyGrowth(R)            R > 0, e.g. 1.1
    skip-goal=P           SkipGoal(P)                  0 <= P <= 100
    downtime=D            DowntimeBudget(D)            D: 300ms, 0.3s, 300 (= ms)
    downtime(budget=D,page-size=N)
    abort-diverging=K     AbortIfDiverging(K)          K >= 1; bare = 3
    abort-diverging(rounds=K,page-size=N)

Presets (bare name = published defaults; overrides in parentheses)::

    phaul   phaul(min-pages=64,max-grow-rate=10,max-iters=8)
    incus   incus(goal=70,iterations=10)
    qemu    qemu(downtime=300ms,page-size=4096)   (= downtime=300ms)

A top-level comma list is shorthand for ``any(...)``, so the common case
reads naturally: ``max-iter=8,min-dirty=64`` stops on whichever comes first.
Preset overrides use parentheses rather than ``incus:goal=80`` because the
parameters themselves contain ``=`` and ``,`` and must nest inside lists.

``describe()`` prints the canonical form (combinators always explicit as
``any(...)``/``all(...)``, durations in ms, only non-default parameters),
which ``parse_policy`` reads back to an equal policy.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .base import ConvergencePolicy
from .presets import INCUS_PARAMS, PHAUL_PARAMS, incus, phaul, qemu
from .rules import (
    AbortIfDiverging,
    AllOf,
    AnyOf,
    DowntimeBudget,
    MaxDirtyGrowth,
    MaxIterations,
    MinDirtyPages,
    SkipGoal,
)

__all__ = ["PolicySpecError", "parse_policy", "VALID_KEYS"]

MAX_DEPTH = 32
"""Nesting limit for any(...)/all(...): deeper specs are certainly mistakes,
and the limit keeps hostile input from exhausting the Python stack."""


class PolicySpecError(ValueError):
    """A policy spec that cannot be parsed.

    Carries the offending ``token`` so callers can point at it; the message
    names the token and lists the valid keys, because the person reading it
    is typing a command line, not reading this module.
    """

    def __init__(self, problem: str, *, token: str, spec: str) -> None:
        super().__init__(f"bad convergence policy {spec!r}: {problem} "
                         f"(at {token!r}); valid keys: {VALID_KEYS}")
        self.problem = problem
        self.token = token
        self.spec = spec


_INT = re.compile(r"[0-9]+")
_NUM = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DURATION = re.compile(rf"({_NUM.pattern})(ms|s)?")
_NAME = re.compile(r"[a-z][a-z0-9-]*")
_VALUE = re.compile(r"[^\s,()=]+")
_SPACE = " \t\r\n"


class _BadValue(Exception):
    """Internal: a converter rejected a value; becomes a PolicySpecError."""


def _to_int(text: str) -> int:
    if not _INT.fullmatch(text):
        raise _BadValue
    try:
        return int(text)
    except ValueError:  # beyond Python's int-from-str digit limit
        raise _BadValue from None


def _to_num(text: str) -> float:
    if not _NUM.fullmatch(text):
        raise _BadValue
    value = float(text)
    if not math.isfinite(value):
        raise _BadValue
    return value


def _to_ms(text: str) -> float:
    """Durations in ms; seconds are scaled in decimal so ``0.3s`` is exactly
    the same budget as ``300ms``."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise _BadValue
    number, unit = m.group(1), m.group(2)
    if unit == "s":
        try:
            value = float(decimal.Decimal(number).scaleb(3))
        except (ArithmeticError, ValueError):
            raise _BadValue from None
    else:
        value = float(number)
    if not math.isfinite(value):
        raise _BadValue
    return value


@dataclass(frozen=True, slots=True)
class _Param:
    field: str
    convert: Callable[[str], Any]
    hint: str


@dataclass(frozen=True, slots=True)
class _Kind:
    build: Callable[..., ConvergencePolicy]
    params: Mapping[str, _Param]
    primary: str | None = None
    """Parameter set by ``name=value``; None: only the keyword form."""
    bare: bool = False
    """Whether ``name`` alone (all defaults) is allowed."""


_COUNT = "an integer"
_DURATION_HINT = "a duration like 300ms, 0.3s or 300 (ms)"
_PAGE_SIZE = _Param("page_size", _to_int, "a page size in bytes, >= 1")

_KINDS: Mapping[str, _Kind] = {
    "max-iter": _Kind(MaxIterations, {"n": _Param("n", _to_int, "an integer >= 1")},
                      primary="n"),
    "min-dirty": _Kind(MinDirtyPages, {"n": _Param("n", _to_int, "an integer >= 0")},
                       primary="n"),
    "max-growth": _Kind(MaxDirtyGrowth,
                        {"ratio": _Param("ratio", _to_num, "a ratio > 0 such as 1.1")},
                        primary="ratio"),
    "downtime": _Kind(DowntimeBudget,
                      {"budget": _Param("ms", _to_ms, _DURATION_HINT),
                       "page-size": _PAGE_SIZE},
                      primary="budget"),
    "skip-goal": _Kind(SkipGoal,
                       {"percent": _Param("percent", _to_num, "a percentage 0..100")},
                       primary="percent"),
    "abort-diverging": _Kind(AbortIfDiverging,
                             {"rounds": _Param("rounds", _to_int, "an integer >= 1"),
                              "page-size": _PAGE_SIZE},
                             primary="rounds", bare=True),
    "phaul": _Kind(phaul, {key: _Param(field, _to_int, _COUNT)
                           for key, field in PHAUL_PARAMS.items()}, bare=True),
    "incus": _Kind(incus, {key: _Param(field, _to_int, _COUNT)
                           for key, field in INCUS_PARAMS.items()}, bare=True),
    "qemu": _Kind(qemu, {"downtime": _Param("downtime_ms", _to_ms, _DURATION_HINT),
                         "page-size": _PAGE_SIZE}, bare=True),
}
_COMBINATORS: Mapping[str, Callable[[tuple[ConvergencePolicy, ...]], ConvergencePolicy]] = {
    "any": AnyOf,
    "all": AllOf,
}

VALID_KEYS = (
    "max-iter=N, min-dirty=N, max-growth=RATIO, downtime=300ms|0.3s|MS, "
    "skip-goal=PERCENT, abort-diverging=ROUNDS, presets phaul|incus|qemu "
    "(overrides as incus(goal=80)), any(...), all(...)"
)


class _Parser:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.pos = 0

    # -- errors ---------------------------------------------------------
    def _fail(self, problem: str, token: str | None = None) -> PolicySpecError:
        return PolicySpecError(problem, token=self._fragment() if token is None else token,
                               spec=self.spec)

    def _fragment(self) -> str:
        """The text at the cursor up to the next delimiter, for messages."""
        rest = self.spec[self.pos:]
        if not rest:
            return "<end of spec>"
        m = re.match(r"[^,()]+", rest)
        return (m.group() if m else rest[0]).strip() or rest[0]

    # -- lexing ---------------------------------------------------------
    def _skip_space(self) -> None:
        while self.pos < len(self.spec) and self.spec[self.pos] in _SPACE:
            self.pos += 1

    def _peek(self) -> str:
        self._skip_space()
        return self.spec[self.pos] if self.pos < len(self.spec) else ""

    def _expect(self, char: str, what: str) -> None:
        if self._peek() != char:
            raise self._fail(f"expected {char!r} {what}")
        self.pos += 1

    def _match(self, pattern: re.Pattern[str], what: str) -> str:
        self._skip_space()
        m = pattern.match(self.spec, self.pos)
        if not m:
            raise self._fail(f"expected {what}")
        self.pos = m.end()
        return m.group()

    # -- grammar --------------------------------------------------------
    def parse(self) -> ConvergencePolicy:
        if not self.spec.strip(_SPACE):
            raise self._fail("empty spec", token="")
        items = self._list(0)
        if self._peek():
            raise self._fail("unexpected text")
        return items[0] if len(items) == 1 else AnyOf(tuple(items))

    def _list(self, depth: int) -> list[ConvergencePolicy]:
        items = [self._term(depth)]
        while self._peek() == ",":
            self.pos += 1
            items.append(self._term(depth))
        return items

    def _term(self, depth: int) -> ConvergencePolicy:
        self._skip_space()
        start = self.pos
        name = self._match(_NAME, "a policy name")
        nxt = self._peek()
        if name in _COMBINATORS:
            if nxt != "(":
                raise self._fail(f"{name!r} takes a list: {name}(policy,...)",
                                 token=self.spec[start:self.pos].strip())
            if depth >= MAX_DEPTH:
                raise self._fail(f"nested deeper than {MAX_DEPTH} levels")
            self.pos += 1
            members = self._list(depth + 1)
            self._expect(")", f"to close {name}(")
            return _COMBINATORS[name](tuple(members))
        kind = _KINDS.get(name)
        if kind is None:
            raise self._fail(f"unknown policy {name!r}", token=self._token_from(start))
        if nxt == "=":
            self.pos += 1
            value = self._match(_VALUE, f"a value after '{name}='")
            token = self.spec[start:self.pos].strip()
            if kind.primary is None:
                raise self._fail(f"{name!r} has no main value; use {name}(key=value,...) "
                                 f"with keys {', '.join(kind.params)}", token=token)
            return self._build(name, kind, {kind.primary: value}, token)
        if nxt == "(":
            self.pos += 1
            args = self._args(name, kind)
            self._expect(")", f"to close {name}(")
            return self._build(name, kind, args, self.spec[start:self.pos].strip())
        if not kind.bare:
            hint = kind.params[kind.primary].hint if kind.primary else "parameters"
            raise self._fail(f"{name!r} needs a value, e.g. {name}=... ({hint})", token=name)
        return self._build(name, kind, {}, name)

    def _token_from(self, start: int) -> str:
        m = re.compile(r"[^,()]*").match(self.spec, start)
        return (m.group() if m else "").strip() or self.spec[start:self.pos]

    def _args(self, name: str, kind: _Kind) -> dict[str, str]:
        args: dict[str, str] = {}
        if self._peek() == ")":
            return args
        while True:
            self._skip_space()
            start = self.pos
            key = self._match(_NAME, f"a parameter name inside {name}(...)")
            if key not in kind.params:
                raise self._fail(f"unknown parameter {key!r} for {name!r}; "
                                 f"valid: {', '.join(kind.params)}",
                                 token=self._token_from(start))
            if key in args:
                raise self._fail(f"parameter {key!r} given twice", token=key)
            self._expect("=", f"after {key!r}")
            args[key] = self._match(_VALUE, f"a value for {key!r}")
            if self._peek() != ",":
                return args
            self.pos += 1

    def _build(self, name: str, kind: _Kind, args: Mapping[str, str],
               token: str) -> ConvergencePolicy:
        kwargs: dict[str, Any] = {}
        for key, text in args.items():
            param = kind.params[key]
            try:
                kwargs[param.field] = param.convert(text)
            except _BadValue:
                raise self._fail(f"bad value {text!r} for {name} {key}: expected "
                                 f"{param.hint}", token=token) from None
        try:
            return kind.build(**kwargs)
        except (ValueError, TypeError) as exc:
            raise self._fail(f"invalid {name}: {exc}", token=token) from None


def parse_policy(spec: str) -> ConvergencePolicy:
    """Turn a spec string (see the module docstring) into a policy.

    Raises ``PolicySpecError`` (a ``ValueError``) for any text that is not a
    valid spec, and nothing else.
    """
    if not isinstance(spec, str):
        raise PolicySpecError("spec must be a string", token=repr(spec), spec=repr(spec))
    return _Parser(spec).parse()
