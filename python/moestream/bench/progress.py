"""A plain-text progress bar on stderr (a line per finished item when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: float, enabled: bool = True, stream: TextIO | None = None, width: int = 28):
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_len = 0

    def _bar(self) -> str:
        frac = min(1.0, self.done / self.total)
        filled = round(frac * self.width)
        elapsed = time.perf_counter() - self.t0
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:3.0f}% {elapsed:5.0f}s"

    def show(self, label: str) -> None:
        """Show what is running now (terminal only)."""
        if not (self.enabled and self.tty):
            return
        line = f"{self._bar()}  {label}"
        pad = max(0, self._last_len - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._last_len = len(line)

    def advance(self, amount: float, label: str, result: str | None = None) -> None:
        self.done += amount
        if not self.enabled:
            return
        if self.tty:
            self.show(label if result is None else f"{label}: {result}")
        elif result is not None:
            self.stream.write(f"{self._bar()}  {label}: {result}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
