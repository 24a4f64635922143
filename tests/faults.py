"""Faults the tests inject into real runs, as per-epoch hooks of the worker loop
(`fgray.train.trainer`, "Per-epoch hooks"): the production code knows nothing of them.

The tests name a hook by its dotted path (`"tests.faults:exit_once"`, see the `exit_once`
fixture in conftest.py), so every Ray worker imports this module itself: a Ray driver puts
its working directory -- the repository root, where the tests run -- on its workers'
`sys.path`, and `tests` is a namespace package there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXIT_ONCE = "tests.faults:exit_once"


def exit_once(epoch: int, rank: int, run_uri: str, metrics: Mapping[str, Any], *,
              at_epoch: int, on_rank: int, marker: str) -> None:
    """Rank `on_rank` exits hard (no cleanup, as a killed process would) after training
    epoch `at_epoch`, before reporting it -- once: the `marker` file it writes first keeps
    every later call alive (the restarted worker group, a restarted trial, the next trial)."""
    if epoch != at_epoch or rank != on_rank:
        return
    path = Path(marker)
    if path.exists():
        return
    path.write_text(f"rank {rank} exited after epoch {epoch} of {run_uri}\n")
    os._exit(1)
