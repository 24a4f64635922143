"""The trials table (`tables/trials/method=<m>/trial-<trial_id>.parquet`): one file per
trial holding its current state, replaced whole (see `fgray.results.tables` for the layout
and why). Every state written is also appended to `trial_events` through
`fgray.results.tables` -- this module imports the append path, never the reverse."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fgray.errors import UserError
from fgray.results.parquet import LEGACY_PREFIX, to_arrow, write_file
from fgray.results.schema import PARTITION_COLUMN
from fgray.results.tables import (
    TRIAL_EVENTS,
    TRIALS,
    _by_method,
    _partition,
    _uris,
    append_files,
    file_names,
    latest_trials,
    load,
)
from fgray.storage import is_local, resolve

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per study is then assumed
    fcntl = None

SNAPSHOT_PREFIX = "trial-"  # tables/trials/method=<m>/trial-<trial_id>.parquet
LOCK_NAME = ".lock"
STALE_TEMP_S = 600.0  # a trials temp file this old belongs to a writer that died


def snapshot_name(trial_id: str) -> str:
    """The file of a trial in its method's partition of `tables/trials/`."""
    if not isinstance(trial_id, str) or not trial_id:
        raise UserError(f"trials row has no trial_id ({trial_id!r}): every trials row needs "
                        "the trial it describes")
    return f"{SNAPSHOT_PREFIX}{quote(trial_id, safe='')}.parquet"


@contextlib.contextmanager
def _trials_lock(fs: pafs.FileSystem, root: str) -> Iterator[None]:
    """Serialise read-modify-writes of trial files (local and shared filesystems).

    Not re-entrant: code under the lock never takes it again."""
    if fcntl is None or not is_local(fs):
        yield
        return
    directory = f"{root}/tables/{TRIALS}"
    os.makedirs(directory, exist_ok=True)
    with open(f"{directory}/{LOCK_NAME}", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _normalised(row: dict[str, Any]) -> dict[str, Any]:
    """A trials row as it reads back: declared columns coerced (times as UTC datetimes),
    missing ones None, extras without a value left out."""
    return to_arrow(TRIALS, [row]).to_pylist()[0]


def _read_snapshot(fs: pafs.FileSystem, path: str, method: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        rows = pq.read_table(path, filesystem=fs).to_pylist()
    except FileNotFoundError:
        return None
    if not rows:
        return None
    return {**rows[0], PARTITION_COLUMN: method}


def _write_snapshot(fs: pafs.FileSystem, root: str, row: dict[str, Any]) -> str:
    method = row[PARTITION_COLUMN]
    data = to_arrow(TRIALS, [row]).drop_columns([PARTITION_COLUMN])
    return write_file(fs, _partition(root, TRIALS, method), data,
                       snapshot_name(row["trial_id"]))


def _remove_stale_temps(fs: pafs.FileSystem, directory: str) -> None:
    """Temp files that killed writers left behind (readers skip them; this keeps the folder
    tidy). Only old ones: a live writer's temp file lasts seconds."""
    if not is_local(fs):
        return  # object stores: no temp files
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime > STALE_TEMP_S:
                        os.remove(entry.path)


def _legacy_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The old layout's trials files (append-only state rows) in a method's partition."""
    return [f"{directory}/{name}" for name in file_names(fs, directory)
            if name.startswith(LEGACY_PREFIX) and name.endswith(".parquet")]


def _migrate_partition(fs: pafs.FileSystem, root: str, study_dir: str, method: str) -> None:
    """Move a method's old-layout trials rows (append-only `part-*.parquet` state rows) into
    `trial_events` and replace them with one file per trial. Runs under the trials lock."""
    legacy = _legacy_files(fs, _partition(root, TRIALS, method))
    if not legacy:
        return
    rows = [{**r, PARTITION_COLUMN: method}
            for path in legacy for r in pq.read_table(path, filesystem=fs).to_pylist()]
    append_files(study_dir, TRIAL_EVENTS, rows)
    for row in latest_trials(rows):
        _upsert(fs, root, row)
    for path in legacy:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)


def _upsert(fs: pafs.FileSystem, root: str, row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Make `row` its trial's state unless the stored state ranks higher (`latest_trials`:
    terminal beats running, then the later end_time; a tie goes to `row`). Returns the state
    kept and its file. Runs under the trials lock."""
    new = _normalised(row)
    method = new[PARTITION_COLUMN]
    path = f"{_partition(root, TRIALS, method)}/{snapshot_name(new['trial_id'])}"
    current = _read_snapshot(fs, path, method)
    if current is not None and latest_trials([current, new])[0] is current:
        return current, path
    return new, _write_snapshot(fs, root, new)


def write_trials(study_dir: str, rows: list[dict[str, Any]]) -> list[str]:
    """Record trial states: each row becomes its trial's row in `tables/trials/` (one file per
    trial, replaced atomically) unless the stored state ranks higher (a terminal state is
    never replaced by `running`; see `latest_trials`), and every row is appended to
    `tables/trial_events/` (the history). Returns the trials' files (one per distinct trial).
    """
    if not rows:
        return []
    by_method = _by_method(TRIALS, rows)
    for row in rows:
        snapshot_name(row.get("trial_id"))
    to_arrow(TRIALS, rows)  # a bad value fails before anything is written
    fs, root = resolve(study_dir)
    paths: dict[tuple[str, str], str] = {}
    with _trials_lock(fs, root):
        for method, group in by_method.items():
            _migrate_partition(fs, root, study_dir, method)
            _remove_stale_temps(fs, _partition(root, TRIALS, method))
            for row in group:
                _, paths[(method, row["trial_id"])] = _upsert(fs, root, row)
    # The history after the state: a writer killed in between loses an event, never the
    # trial's current state.
    append_files(study_dir, TRIAL_EVENTS, rows)
    return _uris(study_dir, list(paths.values()))


def _event_key(row: dict[str, Any]) -> tuple:
    """A state as a comparable value (NaN equal to NaN, the partition column included)."""
    return tuple(sorted((k, "nan" if isinstance(v, float) and v != v else repr(v))
                        for k, v in row.items()))


def restore_events(study_dir: str) -> list[dict[str, Any]]:
    """Append to `trial_events` every trial's current state it lacks: a writer killed between
    a trial's new state and its event (`write_trials`) leaves the history one event short,
    and a resumed study restores it. Returns the states appended."""
    fs, root = resolve(study_dir)
    if fs.get_file_info(f"{root}/tables").type != pafs.FileType.Directory:
        return []
    known = {_event_key(r) for r in load(study_dir, TRIAL_EVENTS).to_pylist()}
    missing = [r for r in load(study_dir, TRIALS).to_pylist() if _event_key(r) not in known]
    append_files(study_dir, TRIAL_EVENTS, missing)
    return missing


def read_trial(study_dir: str, method: str, trial_id: str) -> dict[str, Any] | None:
    """A trial's current row (its `method` included), or None when it has none."""
    fs, root = resolve(study_dir)
    if fs.get_file_info(f"{root}/tables").type != pafs.FileType.Directory:
        return None
    path = f"{_partition(root, TRIALS, method)}/{snapshot_name(trial_id)}"
    found = _read_snapshot(fs, path, method)
    if found is not None or not _legacy_files(fs, _partition(root, TRIALS, method)):
        return found
    # Not (yet) migrated to per-trial files: the old layout's latest state, if any.
    rows = load(study_dir, TRIALS,
                filter={PARTITION_COLUMN: method, "trial_id": trial_id}).to_pylist()
    return rows[0] if rows else None


def update_trial(study_dir: str, method: str, trial_id: str,
                 change: Callable[[dict[str, Any]], dict[str, Any] | None]
                 ) -> dict[str, Any] | None:
    """Replace a trial's row with `change(current row)` in one locked read-modify-write (the
    new state wins whatever its rank), and append it to `trial_events`. Returns the new row,
    or None when the trial has no row or `change` returns None (nothing written)."""
    fs, root = resolve(study_dir)
    if fs.get_file_info(f"{root}/tables").type != pafs.FileType.Directory:
        return None
    with _trials_lock(fs, root):
        _migrate_partition(fs, root, study_dir, method)
        path = f"{_partition(root, TRIALS, method)}/{snapshot_name(trial_id)}"
        current = _read_snapshot(fs, path, method)
        if current is None:
            return None
        row = change(dict(current))
        if row is None:
            return None
        row = _normalised({**row, PARTITION_COLUMN: method, "trial_id": trial_id})
        _write_snapshot(fs, root, row)
    append_files(study_dir, TRIAL_EVENTS, [row])
    return row
