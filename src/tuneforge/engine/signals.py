"""Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step, save a checkpoint and exit cleanly.

A second signal while stopping falls back to the default behaviour (immediate interrupt).
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager; ``requested`` names the signal received, or is None. ``signals``: those it catches
    (default Ctrl-C and SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = signals
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, number, frame):
        if self.requested is not None:
            signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
