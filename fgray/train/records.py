"""Moved to `fgray.results.records` (it holds no Ray: the results layer). This re-export
only serves `fgray.tune.study` until it imports from there; then this file goes."""

from fgray.engine.selection import SELECTION_METRIC
from fgray.results.records import (
    EpochRecorder,
    latest_trial_row,
    record_init,
    record_test,
    trial_history,
    weights_name,
)

__all__ = ["SELECTION_METRIC", "EpochRecorder", "latest_trial_row", "record_init",
           "record_test", "trial_history", "weights_name"]
