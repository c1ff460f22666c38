"""Progress as a person reads it, wherever the output goes. Every progress bar in vaelab
comes from `bar()` and every line said between bars goes through `say()`:

- on a terminal (or in a notebook), tqdm's bars, redrawn in place;
- where stderr is a file or a pipe (Slurm's log, `vaelab train ... 2> log`), or after
  `--no-progress` (`use_bars(False)`), no bar at all: one plain line when an item ends (an epoch,
  an evaluator, a decoding pass), and nothing per batch, so a log holds no `\\r` redraws; work of a
  known size that runs longer than `HEARTBEAT_S` (a whole-test-split IWAE estimate: most of an hour
  on a CPU) also says how far it is and how long is left, at most once per `HEARTBEAT_S`;
- `show=False`: nothing (a sweep's trials, checks run in code).

Imports no torch; tqdm only when a bar is drawn."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Protocol, TextIO, TypeVar

T = TypeVar("T")

_bars_off = False
# Seconds between two "still going" lines of one piece of work in a log: often enough that a Slurm
# log shows a long evaluator alive, rarely enough that epochs of a minute or two add no clutter.
HEARTBEAT_S = 120.0


def _now() -> float:
    return time.perf_counter()


def use_bars(allowed: bool) -> None:
    """`--no-progress` is `use_bars(False)`: no bars in this process, even on a terminal; the
    plain lines stay. Each command sets it afresh (one process may run several, as tests do)."""
    global _bars_off
    _bars_off = not allowed


def _in_notebook() -> bool:
    # tqdm.auto draws widgets in a Jupyter kernel, whose stderr is no terminal but redraws fine.
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None) if shell is not None else None
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"


def bars_shown() -> bool:
    """Whether progress is drawn as bars here (else as plain lines)."""
    if _bars_off:
        return False
    try:
        return sys.stderr.isatty() or _in_notebook()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def say(line: str, out: TextIO | None = None) -> None:
    """One line on stderr (or `out`), between bars: a bar under way is cleared and redrawn around it."""
    out = out or sys.stderr
    if bars_shown():
        from tqdm.auto import tqdm

        tqdm.write(line, file=out)
    else:
        print(line, file=out, flush=True)


def seconds(s: float) -> str:
    """A duration for a progress line: `0.42 s`, `12.3 s`, `4.1 min`."""
    if s < 1:
        return f"{s:.2f} s"
    return f"{s:.1f} s" if s < 100 else f"{s / 60:.1f} min"


class Bar(Protocol):
    """What callers do with a bar: tqdm's names, so a tqdm bar is one."""

    n: float
    total: float | None

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def set_description(self, desc: str | None = None, refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> Any: ...


class Lines:
    """A bar that draws nothing and says one line when it is closed after its work:
    `<desc>: <postfix> (<seconds>)`, or `<desc>: <n>/<total> done in <seconds>` (`count`), or
    `<desc>: done in <seconds>`. Work that took less than `delay` seconds, work cut short
    by an error, and a bar made with `line=False` say nothing."""

    def __init__(self, total: float | None, desc: str, unit: str, count: bool, delay: float, line: bool,
                 initial: float = 0):
        self.total, self.desc, self.unit, self.n, self._initial = total, desc, unit, initial, initial
        self._count, self._delay, self._line = count, delay, line
        self._postfix = ""
        self._started = self._said = _now()
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._line and self.total:
            now = _now()
            if now - self._said >= HEARTBEAT_S and self.n < self.total:
                self._said = now
                say(self.so_far(now - self._started))

    def so_far(self, took: float) -> str:
        """`<desc>: 41% after 15.2 min, about 21.9 min left`: how far a long piece of work is; the time left
        at the pace of this process (units done before it started, `initial`, took none of its time)."""
        total = self.total or 0.0
        part = min(max(self.n / total, 0.0), 1.0) if total else 0.0
        done_here = self.n - self._initial
        left = (f", about {seconds(took * max(total - self.n, 0.0) / done_here)} left" if done_here > 0 else "")
        return f"{self.desc}: {100 * part:.0f}% after {seconds(took)}{left}"

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass  # the line names the whole item by the description it started with

    def text(self) -> str:
        took = seconds(_now() - self._started)
        if self._postfix:
            return f"{self.desc}: {self._postfix} ({took})"
        if self._count:
            of = f"/{self.total:,.0f}" if self.total is not None else ""
            return f"{self.desc}: {self.n:,.0f}{of} done in {took}"
        return f"{self.desc}: done in {took}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._line and _now() - self._started >= self._delay:
            say(self.text())

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:  # cut short: no "done" line
            self._closed = True
        self.close()


class _Silent(Lines):
    def close(self) -> None:
        self._closed = True


def bar(total: float | None, desc: str, unit: str = "it", *, show: bool = True, unit_scale: bool = False,
        delay: float = 0.0, count: bool = False, line: bool = True, initial: float = 0) -> Bar:
    """A progress bar over `total` units of work, or its plain-line stand-in (see the module's
    docstring). `count`: the plain line gives how many units were done; `line=False`: the plain
    form says nothing (its caller says what finished itself)."""
    if not show:
        return _Silent(total, desc, unit, count, delay, False, initial)
    if not bars_shown():
        return Lines(total, desc, unit, count, delay, line, initial)
    from tqdm.auto import tqdm

    bar: Bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, delay=delay, initial=initial,
                    file=sys.stderr, dynamic_ncols=True, leave=True)
    return bar


def counted(items: Iterable[T], bar: Bar) -> Iterator[T]:
    """`items`, one step of `bar` each (tqdm's iterable form)."""
    for item in items:
        yield item
        bar.update(1)
