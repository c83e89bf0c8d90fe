"""Progress of long loops that are not training steps (validation, ``eval``, ``score``, the reference pass).

The same two faces as training's progress (``engine.metrics.MetricsLog``): a tqdm bar when standard error is a
terminal (``tqdm.auto``, so a notebook gets its widget), otherwise a plain line on standard error at most every
:data:`LINE_INTERVAL_S` seconds and one at the end, so a piped or logged run shows it is alive. Only the main
process reports (``RANK`` 0 or unset under torchrun). Reporting reads nothing from the device.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

LINE_INTERVAL_S = 5.0  # most frequent plain line when there is no terminal

T = TypeVar("T")


class Progress:
    """Counts work done out of ``total`` and shows it (see the module docstring).

    Args:
        desc: what is being done, the start of every line (``validation``, ``held-out loss``).
        total: units expected; None when unknown.
        unit: the unit counted, singular (``batch``).
        enabled: False shows nothing; None (default) means "in the main process".
        terminal: a tqdm bar instead of lines; None (default) means "when standard error is a terminal".
        stream: where lines go (default: standard error at the time of writing).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "batch", enabled: bool | None = None,
                 terminal: bool | None = None, stream=None, clock=time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = os.environ.get("RANK", "0") == "0" if enabled is None else enabled
        self.stream, self.clock = stream, clock
        self.done = 0
        self.bar = None
        self.start = self.last_line = clock()
        if self.enabled and (terminal if terminal is not None else sys.stderr.isatty()):
            from tqdm.auto import tqdm

            # leave=None: a bar of its own stays when finished; one nested under training's bar goes away.
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=None, dynamic_ncols=True)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.enabled and self.done != self.total and self.clock() - self.last_line >= LINE_INTERVAL_S:
            self._line(self._so_far())  # (when all is done, the closing line says so)

    def close(self) -> None:
        """Finish: close the bar, or write the closing line (count and time taken)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled:
            self._line(f"{self.desc}: {self._count(self.done)} in {self.clock() - self.start:.1f} s")
            self.enabled = False  # once

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _so_far(self) -> str:
        elapsed = self.clock() - self.start
        if not self.total:
            return f"{self.desc}: {self._count(self.done)}, {elapsed:.0f} s"
        left = elapsed / max(self.done, 1) * (self.total - self.done)
        return (f"{self.desc}: {self.done}/{self._count(self.total)} ({self.done / self.total:.0%}), "
                f"{elapsed:.0f} s, about {left:.0f} s left")

    def _count(self, count: int) -> str:
        plural = self.unit if count == 1 else self.unit + ("es" if self.unit.endswith(("ch", "s", "x")) else "s")
        return f"{count} {plural}"

    def _line(self, text: str) -> None:
        self.last_line = self.clock()
        print(text, file=self.stream or sys.stderr, flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch",
             enabled: bool | None = None) -> Iterator[T]:
    """Yield ``items`` while showing a :class:`Progress` of them (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    shown = Progress(desc, total, unit, enabled)
    try:
        for item in items:
            yield item
            shown.update()
    except GeneratorExit:  # the loop was left early (an error, a break): no closing line claims it finished
        shown.enabled = False
        raise
    finally:
        shown.close()
