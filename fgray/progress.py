"""A minimal progress line on stderr (no dependency, quiet when not a terminal or disabled)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label = max(total, 1), label
        self.enabled = enabled and sys.stderr.isatty()
        self.done, self.start, self._last = 0, time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            pct = 100.0 * self.done / self.total
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} ({pct:5.1f}%)"
                             f" {now - self.start:6.1f}s")
            sys.stderr.flush()

    def close(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            sys.stderr.write("\n")
        return elapsed
