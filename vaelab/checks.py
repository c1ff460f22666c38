"""Typed value checks for spec fields.

Each check turns a raw YAML value into a typed one or raises SpecError with the
dotted path, the bad value and what is allowed, so a user sees one line such as
``model.z_dim: expected int > 0, got 'ten'``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vaelab.errors import SpecError

SHOWN_CHARS = 60  # how much of a bad value an error message echoes
_INT_SHOWN_BITS = 200  # a longer int is described by its size (str() of a huge int is refused, or slow)


def show(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A value as an error message echoes it: about `limit` characters, found by walking at most
    about that many nodes. A YAML alias bomb (nine levels of nine aliases: 387 million leaves
    sharing nine lists) then costs what its file costs; repr() would expand it all first."""
    text = _brief(value, limit)
    if len(text) > limit + 20:  # each nesting level may close past its budget: cap the sum
        text = text[:limit] + "..."
    if isinstance(value, (list, tuple, set, frozenset, Mapping)) and "..." in text:
        kind = "mapping" if isinstance(value, Mapping) else type(value).__name__
        text += f" (a {kind} of {len(value)}{' keys' if kind == 'mapping' else ''})"
    return text


def _brief(value: Any, budget: int) -> str:
    """Up to about `budget` characters of `value`; containers are walked item by item and stop when
    the budget is spent, so no call looks at more than about `budget` nodes."""
    if budget <= 0:
        return "..."
    if isinstance(value, Mapping):
        return "{" + _items((f"{_brief(k, budget // 2)}: " for k in value), value.values(), budget - 1) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        # budget - 1: the bracket counts, so even a list that holds itself (`&a [*a]`) ends
        left, right = ("[", "]") if isinstance(value, list) else ("(", ")") if isinstance(value, tuple) else "{}"
        return left + _items(None, value, budget - 1) + right
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _INT_SHOWN_BITS:
        return f"an int of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, (str, bytes)) and len(value) > budget:
        return repr(value[:budget])[:budget] + "..."
    text = repr(value)
    return text if len(text) <= budget else text[:budget] + "..."


def _items(keys: Iterator[str] | None, values: Iterable[Any], budget: int) -> str:
    parts: list[str] = []
    used = 0
    for value in values:
        if used >= budget:
            parts.append("...")
            break
        prefix = next(keys) if keys is not None else ""
        part = prefix + _brief(value, budget - used - len(prefix))
        parts.append(part)
        used += len(part) + 2
    return ", ".join(parts)


def show_key(key: Any) -> str:
    """A mapping key in a dotted path: text as it is (cut when long), anything else as `show` gives it."""
    if isinstance(key, str):
        return key if len(key) <= SHOWN_CHARS else key[:SHOWN_CHARS] + "..."
    return show(key)


def fail(path: str, allowed: str, value: Any) -> SpecError:
    return SpecError(f"{path}: expected {allowed}, got {show(value)}")


def did_you_mean(word: Any, known: Iterable[str]) -> str:
    """`; did you mean train.epochs?` when one of `known` is a likely typo's target, else ''."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def as_list(value: Any) -> str:
    """A value meant as a list, written as one (`512,256` -> `[512,256]`, `512` -> `[512]`), for hints."""
    items = re.split(r"[,\s]+", value.strip().strip("()")) if isinstance(value, str) else [value]
    if items and all((isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isdigit())
                     for v in items):
        return "[" + ",".join(str(v) for v in items) + "]"
    return "[64,128]"


class Check:
    """Base class: `parse(value, path)` returns the typed value or raises SpecError."""

    def parse(self, value: Any, path: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def hint(self, value: Any) -> str:
        """What to add to the error for `value`, when its form (not its size) is what is wrong."""
        return ""


# No int a spec sets (a size, a count, a seed) is wider than 64 bits; a bigger one (YAML reads
# `0xfff...` of any length) could not be printed, hashed as JSON or handed to numpy.
INT_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class Int(Check):
    min: int | None = None
    max: int | None = None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"int in [{self.min}, {self.max}]"
        if self.min is not None:
            return "int > 0" if self.min == 1 else f"int >= {self.min}"
        return "int"

    def parse(self, value: Any, path: str) -> int:
        # bool is an int subclass in Python; `true` is never a size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(path, self.describe(), value)
        if self.max is None and abs(value) > INT_LIMIT:
            raise fail(path, f"{self.describe()} below 2**63", value)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise fail(path, self.describe(), value)
        return value


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # fullmatch: `$` lets "1\n" through


@dataclass(frozen=True)
class Float(Check):
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: value must be strictly greater than min
    max_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {self.max:g}")
        return "float" + (" " + " and ".join(parts) if parts else "")

    def parse(self, value: Any, path: str) -> float:
        # PyYAML reads `1e-3` (no dot) as a string; accept plain numeric text.
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(path, self.describe(), value)
        try:
            number = float(value)
        except OverflowError:  # an int too big for a float (YAML reads `0xfff...` of any length)
            raise fail(path, self.describe(), value) from None
        if not math.isfinite(number):
            raise fail(path, self.describe(), value)
        if self.min is not None and (number < self.min or (self.min_open and number == self.min)):
            raise fail(path, self.describe(), value)
        if self.max is not None and (number > self.max or (self.max_open and number == self.max)):
            raise fail(path, self.describe(), value)
        return number


@dataclass(frozen=True)
class Bool(Check):
    def describe(self) -> str:
        return "true or false"

    def parse(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise fail(path, self.describe(), value)
        return value


class AutoBool(Check):
    """true, false, or auto (decided by what the run has, e.g. whether its data has factors)."""

    def describe(self) -> str:
        return "true, false or auto"

    def parse(self, value: Any, path: str) -> bool | str:
        if not isinstance(value, bool) and value != "auto":
            raise fail(path, self.describe(), value)
        return value


@dataclass(frozen=True)
class Choice(Check):
    names: Sequence[str]

    def describe(self) -> str:
        return "one of " + ", ".join(self.names)

    def parse(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in self.names:
            raise fail(path, self.describe(), value)
        return value


@dataclass(frozen=True)
class IntChoice(Check):
    values: tuple[int, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))

    def parse(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or value not in self.values:
            raise fail(path, self.describe(), value)
        return value


@dataclass(frozen=True)
class Text(Check):
    max_len: int = 10_000
    numbers: bool = False  # a name that YAML may read as a number (a folder "2019", a commit "1234567")

    def describe(self) -> str:
        return "a string"

    def parse(self, value: Any, path: str) -> str:
        if self.numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > INT_LIMIT:  # str() refuses ints over 4300 digits
                raise fail(path, self.describe() + f" of at most {self.max_len} characters", value)
            value = str(value)
        if not isinstance(value, str) or len(value) > self.max_len:
            raise fail(path, self.describe() + f" of at most {self.max_len} characters", value)
        return value


# Names become directory names and MLflow experiment names, so they must not
# contain separators or start with a dot (no `..`, no hidden files).
# Matched whole (fullmatch): `$` would also match before a trailing newline, "abc\n".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Name(Check):
    def describe(self) -> str:
        return "a name of letters, digits, '_', '-', '.' (max 64, not starting with '.' or '-')"

    def parse(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
            raise fail(path, self.describe(), value)
        return value


@dataclass(frozen=True)
class Optional(Check):
    inner: Check

    def describe(self) -> str:
        return f"{self.inner.describe()} or null"

    def parse(self, value: Any, path: str) -> Any:
        if value is None:
            return None
        try:
            return self.inner.parse(value, path)
        except SpecError:
            raise SpecError(f"{fail(path, self.describe(), value)}{self.hint(value)}") from None

    def hint(self, value: Any) -> str:
        return "" if value is None else self.inner.hint(value)


@dataclass(frozen=True)
class OrAuto(Check):
    """`auto` (kept as the string 'auto', resolved when the run has what decides it) or what `inner` takes."""

    inner: Check

    def describe(self) -> str:
        return f"auto or {self.inner.describe()}"

    def parse(self, value: Any, path: str) -> Any:
        if isinstance(value, str) and value == "auto":
            return "auto"
        try:
            return self.inner.parse(value, path)
        except SpecError:
            raise SpecError(f"{fail(path, self.describe(), value)}{self.hint(value)}") from None

    def hint(self, value: Any) -> str:
        return "" if value == "auto" else self.inner.hint(value)


@dataclass(frozen=True)
class IntList(Check):
    item: Int
    min_len: int = 1
    max_len: int = 16

    def describe(self) -> str:
        return f"a list of {self.min_len}-{self.max_len} values, each {self.item.describe()}"

    def parse(self, value: Any, path: str) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not self.min_len <= len(value) <= self.max_len:
            raise SpecError(f"{fail(path, self.describe(), value)}{self.hint(value)}")
        return tuple(self.item.parse(v, f"{path}[{i}]") for i, v in enumerate(value))

    def hint(self, value: Any) -> str:
        return "" if isinstance(value, (list, tuple)) else f"; a list is written in brackets: {as_list(value)}"


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30,
          "tb": 10**12, "tib": 2**40}


@dataclass(frozen=True)
class ByteSize(Check):
    """A size in bytes: an integer, or text such as '512MB' / '2.5GiB'; `auto` when allowed
    (kept as the string 'auto' and resolved when the run starts)."""

    allow_auto: bool = True

    def describe(self) -> str:
        return ("'auto' or " if self.allow_auto else "") + "a size such as 512MB, 2GiB or a number of bytes"

    def parse(self, value: Any, path: str) -> int | str:
        if self.allow_auto and value == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= INT_LIMIT:
            return value
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise fail(path, self.describe(), value)
        size = float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()]  # inf for 400 nines
        if not 1 <= size <= INT_LIMIT:  # under one byte was refused as int(size) == 0
            raise fail(path, self.describe(), value)
        return int(size)
