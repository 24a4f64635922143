"""The checkpoints a run folder keeps, for a Ray Train run and a `--workers 0` trial alike:
`epoch-XXXX/` sub-folders holding `checkpoint.pt` and the epoch's `metrics.json` (written
last: a folder without it is not a kept checkpoint), and which of them is the best."""

from __future__ import annotations

from typing import Any

import ray.train

from fgray.engine.loop import CHECKPOINT_FILE
from fgray.engine.selection import best_of
from fgray.storage import join, read_json, resolve

METRICS_FILE = "metrics.json"  # the epoch's report, next to its checkpoint


def by_epoch(kept: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(kept, key=lambda k: int(k[1].get("epoch", 0)))


def kept_checkpoints(run_uri: str) -> list[tuple[str, dict[str, Any]]]:
    """The complete checkpoints of a run folder: (folder name, the epoch's metrics) of each
    sub-folder holding `checkpoint.pt` and `metrics.json`."""
    import pyarrow.fs as pafs

    fs, root = resolve(run_uri)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or info.base_name.endswith(".tmp"):
            continue
        metrics = read_json(join(run_uri, info.base_name, METRICS_FILE))
        if metrics is not None and fs.get_file_info(
                f"{info.path}/{CHECKPOINT_FILE}").type == pafs.FileType.File:
            out.append((info.base_name, metrics))
    return out


def best_checkpoint_dir(run_uri: str) -> str | None:
    """The kept checkpoint with the highest val kNN top-1 (the earliest on ties) of a
    finished (or interrupted) run, as a path or URI; None when it kept no checkpoint.

    The kept checkpoints are the run folder's sub-folders holding `checkpoint.pt` and the
    epoch's `metrics.json` (`kept_checkpoints`), for a Train run and a `--workers 0` trial
    alike. A Train run written before checkpoints carried their metrics is read through
    Ray's own record of it."""
    kept = by_epoch(kept_checkpoints(run_uri))
    if kept:
        best, _ = best_of(kept, row=lambda k: k[1])
        return join(run_uri, (best or kept[0])[0])
    try:
        fs, path = resolve(run_uri)
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:
        return None
    best, _ = best_of(result.best_checkpoints or [], row=lambda cm: cm[1])
    if best is not None:
        return _checkpoint_uri(run_uri, best[0])
    return _checkpoint_uri(run_uri, result.checkpoint) if result.checkpoint else None


def _checkpoint_uri(run_uri: str, checkpoint) -> str:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return join(run_uri, name)


