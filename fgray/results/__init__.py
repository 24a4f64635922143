"""Study results: Parquet tables, TensorBoard logs, leaderboard and plots, and the per-epoch
and per-trial records a run writes into them (`fgray.results.records`).

`load`, `append` and `write_trials` need only pyarrow; TensorBoard writers (torch) live in
`fgray.results.tensorboard` and are imported on use.
"""

from fgray.results.report import leaderboard, plots, render, results_command
from fgray.results.tables import TRIALS, append_files, load, table_dir
from fgray.results.trials import write_trials


def append(study_dir: str, table: str, rows: list[dict]) -> str:
    """Record `rows` in `table` of a study: for `trials`, each row as its trial's new state
    (`write_trials`), else as new append-only files (`fgray.results.tables.append`).
    Returns the written file, or the table's folder when several or none were written."""
    paths = write_trials(study_dir, rows) if table == TRIALS else append_files(
        study_dir, table, rows)
    return paths[0] if len(paths) == 1 else table_dir(study_dir, table)

__all__ = ["append", "leaderboard", "load", "plots", "render", "results_command",
           "write_trials"]
