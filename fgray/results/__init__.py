"""Study results: Parquet tables, TensorBoard logs, leaderboard and plots, and the per-epoch
and per-trial records a run writes into them (`fgray.results.records`).

`load`, `append` and `write_trials` need only pyarrow; TensorBoard writers (torch) live in
`fgray.results.tensorboard`. The names below are imported on first use (PEP 562): a training
worker imports `fgray.results.records` and should not pay for the report's scipy and
matplotlib (about 2.5 s per Ray Train worker start).
"""

from importlib import import_module


def append(study_dir: str, table: str, rows: list[dict]) -> str:
    """Record `rows` in `table` of a study: for `trials`, each row as its trial's new state
    (`write_trials`), else as new append-only files (`fgray.results.tables.append`).
    Returns the written file, or the table's folder when several or none were written."""
    from fgray.results.tables import TRIALS, append_files, table_dir
    from fgray.results.trials import write_trials

    paths = write_trials(study_dir, rows) if table == TRIALS else append_files(
        study_dir, table, rows)
    return paths[0] if len(paths) == 1 else table_dir(study_dir, table)


_HOME = {"leaderboard": "report", "plots": "report", "render": "report",
         "results_command": "report", "load": "tables", "write_trials": "trials"}
__all__ = sorted([*_HOME, "append"])


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"fgray.results.{_HOME[name]}"), name)
