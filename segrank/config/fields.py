"""What each configuration field means and which values it accepts, declared once next to the field.

``setting(default, doc, bound)`` builds a dataclass field whose metadata carries a one-line meaning and, for numbers,
a ``Bound``. The config classes check every value against its bound when they are built, and docs/config.md is
rendered from the same metadata, so the documented range is the enforced one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from segrank.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """Allowed numbers: every element of a tuple or list and every value of a mapping must satisfy it; numbers must
    be finite. ``ordered`` asks a pair to be (low, high); ``nonempty`` asks a list for at least one value."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    ordered: bool = False
    nonempty: bool = False

    def range_text(self) -> str:
        """The range in words, e.g. ``>= 1``, ``> 0``, ``in [0, 1)``."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return "finite"

    def text(self) -> str:
        """The range and the other conditions, as docs/config.md lists them."""
        parts = [self.range_text()]
        if self.ordered:
            parts.append("first <= second")
        if self.nonempty:
            parts.append("at least one value")
        return ", ".join(parts)

    def admits(self, number: float) -> bool:
        if not math.isfinite(number):
            return False
        if self.lo is not None and (number <= self.lo if self.lo_open else number < self.lo):
            return False
        return self.hi is None or (number < self.hi if self.hi_open else number <= self.hi)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (a number, a sequence or a mapping of numbers, or None) is refused; None when it is fine."""
        if value is None:
            return None
        if isinstance(value, dict):
            numbers, shown = list(value.values()), dict(value)
        elif isinstance(value, (list, tuple)):
            numbers, shown = list(value), list(value)
        else:
            numbers, shown = [value], value
        if self.nonempty and not numbers:
            return "must have at least one value"
        if not all(self.admits(n) for n in numbers):
            every = "" if shown is value else "every value "
            if not all(math.isfinite(n) for n in numbers):
                return f"{every}must be a finite number, got {shown}"
            return f"{every}must be {self.range_text()}, got {shown}"
        if self.ordered and numbers != sorted(numbers):
            return f"must be (low, high) with low <= high, got {shown}"
        return None


def at_least(lo: float, **flags: bool) -> Bound:
    return Bound(lo=lo, **flags)


def above(lo: float, **flags: bool) -> Bound:
    return Bound(lo=lo, lo_open=True, **flags)


def within(lo: float, hi: float, hi_open: bool = False, **flags: bool) -> Bound:
    return Bound(lo=lo, hi=hi, hi_open=hi_open, **flags)


# The bounds most fields share.
COUNT = at_least(1)  # sizes, numbers of things, intervals
NON_NEGATIVE = at_least(0)
POSITIVE = above(0)
PROBABILITY = within(0, 1)
RATE = within(0, 1, hi_open=True)  # dropout and drop-path rates: 1 would drop everything


def setting(default: Any = dataclasses.MISSING, doc: str = "", bound: Bound | None = None, *,
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its meaning (``doc``) and, for numeric fields, the values it accepts (``bound``)."""
    metadata = {"doc": doc, "bound": bound}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def doc_of(f: dataclasses.Field) -> str:
    return f.metadata.get("doc", "")


def bound_of(f: dataclasses.Field) -> Bound | None:
    return f.metadata.get("bound")


def field_problems(obj: Any) -> list[tuple[str, str]]:
    """(field name, problem) for each field of dataclass ``obj`` whose value its declared bound refuses."""
    out = []
    for f in dataclasses.fields(obj):
        bound = bound_of(f)
        problem = bound.problem(getattr(obj, f.name)) if bound is not None else None
        if problem is not None:
            out.append((f.name, problem))
    return out


class Section:
    """Base of the config sections: when one is built, every field is checked against its declared bound, then the
    section's rules between fields run; the first problem raises ConfigError naming the full key.

    ``key`` is where the section sits in a config file (``model.backbone``); each of ``rules`` returns the problem
    of a relation between fields (a one-line message naming the key) or None, and its docstring states the relation
    in docs/config.md."""

    key: ClassVar[str] = ""
    rules: ClassVar[tuple[Callable[[Any], str | None], ...]] = ()

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            name, problem = problems[0]
            raise ConfigError(f"{self.key}.{name}: {problem}")
        for rule in self.rules:
            problem = rule(self)
            if problem is not None:
                raise ConfigError(problem)
