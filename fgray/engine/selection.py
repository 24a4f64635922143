"""Model selection: the metric every run, trial and checkpoint is ranked by, and the one rule
for "the best so far" and "the best of a history".

`SELECTION_METRIC` is the validation kNN top-1 the loop evaluates (`Pretrainer.evaluate`);
`BEST_METRIC` is its best value so far, as the Ray workers report it every epoch and the
trials table stores it per trial. Higher is better; a row without a finite value does not
count; of equal values the first one wins (the earliest epoch, the first trial).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

SELECTION_METRIC = "val_knn_top1"
BEST_METRIC = f"best_{SELECTION_METRIC}"

T = TypeVar("T")


def _identity(item: Any) -> Any:
    return item


def score(row: Mapping[str, Any] | None, metric: str = SELECTION_METRIC) -> float | None:
    """`row[metric]` as a float when it is a finite number, else None."""
    value = None if row is None else row.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def ranked(items: Iterable[T], metric: str = SELECTION_METRIC,
           row: Callable[[T], Mapping[str, Any]] = _identity) -> list[T]:
    """`items` best first by `metric` of `row(item)`; equal values keep their order, items
    without a value come last."""
    def key(item: T) -> float:
        value = score(row(item), metric)
        return math.inf if value is None else -value

    return sorted(items, key=key)


def best_of(items: Iterable[T], metric: str = SELECTION_METRIC,
            row: Callable[[T], Mapping[str, Any]] = _identity) -> tuple[T | None, float | None]:
    """The item whose `row(item)` has the highest `metric` (the first of equal ones) and
    that value; (None, None) when no item has a value."""
    tracker = Best(metric)
    found = None
    for item in items:
        if tracker.update(row(item)):
            found = item
    return found, tracker.value


class Best:
    """The best value of `metric` seen so far in a stream of rows."""

    def __init__(self, metric: str = SELECTION_METRIC,
                 rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.metric = metric
        self.value: float | None = None
        for r in rows:
            self.update(r)

    def update(self, row: Mapping[str, Any] | None) -> bool:
        """Take `row` into account; True when its value beats every earlier one (a tie is
        not a new best)."""
        value = score(row, self.metric)
        if value is None or (self.value is not None and value <= self.value):
            return False
        self.value = value
        return True
