"""A minimal progress line on stderr (no dependency, quiet when disabled).

On a terminal the line is rewritten in place. Elsewhere it is quiet, unless the caller asks for
`log_tenths`: then one plain line is written every 10 %, so a log file (a Ray job's, a CI
run's) shows a long step moving without a carriage-return line per item.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, *, unit: str = "",
                 log_tenths: bool = False) -> None:
        self.total, self.label = max(total, 1), label
        self.unit = f" {unit}" if unit else ""
        self.enabled = enabled and sys.stderr.isatty()
        self.log_tenths = enabled and log_tenths and not self.enabled
        self.done, self.start, self._last = 0, time.perf_counter(), 0.0
        self._next_tenth = 1

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            sys.stderr.write(f"\r{self._line(now)}")
            sys.stderr.flush()
        elif self.log_tenths and self.done * 10 >= self._next_tenth * self.total:
            self._next_tenth = self.done * 10 // self.total + 1
            sys.stderr.write(self._line(now) + "\n")
            sys.stderr.flush()

    def close(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            sys.stderr.write("\n")
        return elapsed

    def _line(self, now: float) -> str:
        pct = 100.0 * self.done / self.total
        return (f"{self.label}: {self.done}/{self.total}{self.unit} ({pct:5.1f}%)"
                f" {now - self.start:6.1f}s")
