"""Study results: Parquet tables, TensorBoard logs, leaderboard and plots, and the per-epoch
and per-trial records a run writes into them (`fgray.results.records`).

`load`, `append` and `write_trials` need only pyarrow; TensorBoard writers (torch) live in
`fgray.results.tensorboard` and are imported on use.
"""

from fgray.results.report import leaderboard, plots, render, results_command
from fgray.results.tables import append, load, write_trials

__all__ = ["append", "leaderboard", "load", "plots", "render", "results_command",
           "write_trials"]
