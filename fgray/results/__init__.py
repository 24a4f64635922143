"""Study results: Parquet tables, TensorBoard logs, leaderboard and plots, and the per-epoch
and per-trial records a run writes into them (`fgray.results.records`).

`load`, `append` and `write_trials` need only pyarrow; TensorBoard writers (torch) live in
`fgray.results.tensorboard`. The names below are imported on first use (PEP 562): a training
worker imports `fgray.results.records` and should not pay for the report's scipy and
matplotlib (about 2.5 s per Ray Train worker start).
"""

from importlib import import_module

_HOME = {"leaderboard": "report", "plots": "report", "render": "report",
         "results_command": "report", "append": "tables", "load": "tables",
         "write_trials": "tables"}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"fgray.results.{_HOME[name]}"), name)
