"""A minimal progress line on stderr (only when stderr is a terminal, or when forced)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool | None = None, unit: str = "bytes") -> None:
        self.total = max(total, 1)
        self.label, self.unit = label, unit
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.25 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            amount = (f"{self.done / 1e9:6.2f}/{self.total / 1e9:.2f} GB {rate / 1e6:7.1f} MB/s" if self.unit == "bytes"
                      else f"{self.done}/{self.total} {self.unit} {rate:6.2f} {self.unit}/s")
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {amount} {elapsed:6.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
