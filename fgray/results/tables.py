"""Study tables under `STUDY_DIR/tables/`, safe with many concurrent writers.

Layout (hive partitioning, so `pd.read_parquet`, `pyarrow.dataset`, Spark and DuckDB's
`read_parquet('tables/<table>/**/*.parquet', hive_partitioning=true, union_by_name=true)` read
a folder as one table):

- `tables/trials/method=<m>/trial-<trial_id>.parquet`: ONE file per trial holding one row,
  the trial's current state. A new state replaces the file whole (`write_trials`).
- `tables/trial_events/`, `tables/epochs/`, `tables/evals/`:
  `method=<m>/part-<uuid>[-<trial_id>].parquet`, append-only. Every `append` writes new files
  with unique names and never touches existing ones, so trials on different nodes report at
  the same time without locks. A file of one trial's rows carries the trial's id in its
  name, so one trial's rows are read from its own files (`load_trial`), not from the whole
  table: a study's driver reads a trial's epochs at its end, and reading every file there
  cost it time in proportion to the trials already run. `trial_events` is the trials
  table's history: every state ever written (`running`, `stopped`, `completed`, the row
  again with its test metrics, ...).

Why a per-trial snapshot file for `trials` (and not an append-only log of states, or a table
format such as Delta Lake): the contract is "one row per trial, readable by pandas and DuckDB
as they are". An append-only log gives several rows per trial to every plain reader (a
trial's `running`, `stopped` and `completed` rows), so each reader would need our
deduplication rule. Delta Lake / Iceberg give atomic multi-file commits, but only to readers
that understand their transaction log: a plain `read_parquet('**/*.parquet')` or
`pd.read_parquet(folder)` also reads the files a later commit removed (until a vacuum), i.e.
the same duplicates, and it adds a dependency and a commit protocol on object stores. One
file per trial, replaced atomically, gives every plain reader exactly one row per trial; two
trials finishing at once write different files, so nothing is lost without coordination.

Atomicity: on a local filesystem a file is first written (and fsync'ed) as
`.<name>.<uuid>.tmp` and then renamed over its final name with `os.replace`, so a reader sees
the old file or the new one, never a partial one, and a writer killed mid-write leaves only
the temp file. Temp names start with '.' (pyarrow, pandas and Spark skip such files) AND end
in `.tmp`, not `.parquet`: DuckDB's `**/*.parquet` glob does match hidden files, so the suffix
is what keeps it away from them. Stale temp files of killed writers are removed by later
trials writes (after `STALE_TEMP_S`). On object stores (`s3://`, `gs://`) a file is written
straight to its final key: a single-object PUT becomes visible only once complete and
replaces the old object whole, which gives the same guarantee without a rename.

The trials table is written by `fgray.results.trials` (`write_trials`), which appends each
state to `trial_events` through this module; this module never writes a trials file.
Several states of one trial: `write_trials` keeps, of the stored state and the new one, the
one `latest_trials` ranks higher (a terminal state beats `running`, then the later
`end_time`, ...), so a late or replayed `running` never hides a trial's final state. The
read-modify-write of a trial's file runs under an advisory lock (`tables/trials/.lock`,
`flock`) on local and shared filesystems; on object stores there is no lock, and one writer
per trial is assumed (the study driver writes every trials row).

Studies written before this layout (trials as `part-<uuid>.parquet` state rows) still load:
`load(..., "trials")` keeps the latest state per trial, and the next trials write of a method
moves its old rows into `trial_events` and replaces them with per-trial files.

The `method` column is the partition key: it lives in the directory name, not in the files.
`load` unifies the schemas of all files with the declared one, so a column that first appears
in a later write is present after loading (null in earlier rows). Plain pandas reads take the
first file's schema and may miss such late columns; `load` is the faithful reader.
"""


from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from fgray.errors import UserError
from fgray.results.parquet import (
    LEGACY_PREFIX,
    PARTITIONING,
    as_expression,
    read_files,
    to_arrow,
    write_file,
)
from fgray.results.schema import PARTITION_COLUMN, TRIAL_STATUSES, schema_for
from fgray.storage import as_location, is_local, join, resolve

TRIALS = "trials"
TRIAL_EVENTS = "trial_events"
_UUID_HEX = 32


# ---------------------------------------------------------------- append


def table_dir(study_dir: str, table: str) -> str:
    """Where `table`'s dataset lives (a local path or a URI, like `study_dir`)."""
    schema_for(table)
    return join(study_dir, "tables", table)


def _by_method(table: str, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        method = row.get(PARTITION_COLUMN)
        if not isinstance(method, str) or not method:
            raise UserError(
                f"{table} row {i} has no {PARTITION_COLUMN!r}: every row needs the method it "
                "belongs to (the partition key)")
        by_method.setdefault(method, []).append(row)
    return by_method


def _uris(study_dir: str, paths: list[str]) -> list[str]:
    return [as_location(study_dir, p) for p in paths]


def file_name(rows: list[dict[str, Any]]) -> str:
    """A new append-only file's name: `part-<uuid>.parquet`, with `-<trial_id>` before the
    suffix when every row is one trial's (`load_trial` reads only that trial's files)."""
    ids = {r.get("trial_id") for r in rows}
    one = next(iter(ids)) if len(ids) == 1 else None
    tag = f"-{quote(one, safe='')}" if isinstance(one, str) and one else ""
    return f"{LEGACY_PREFIX}{uuid.uuid4().hex}{tag}.parquet"


def _trial_tag(name: str) -> str | None:
    """The quoted trial id in an append-only file's name (`file_name`), or None for a file
    of several trials or one written before the tag."""
    stem = name[len(LEGACY_PREFIX):-len(".parquet")]
    return stem[_UUID_HEX + 1:] if len(stem) > _UUID_HEX and stem[_UUID_HEX] == "-" else None


def _partition(root: str, table: str, method: str) -> str:
    return f"{root}/tables/{table}/{PARTITION_COLUMN}={quote(method, safe='')}"


def append_files(study_dir: str, table: str, rows: list[dict[str, Any]]) -> list[str]:
    """Write `rows` as new Parquet files, one per method; returns the files' paths. Not for
    `trials`, whose rows are states (`fgray.results.trials.write_trials`)."""
    schema_for(table)
    if table == TRIALS:
        raise UserError("trials rows are a trial's states, not appended: expected "
                        "fgray.results.trials.write_trials (or fgray.results.append)")
    by_method = _by_method(table, rows)
    fs, root = resolve(study_dir)
    paths = []
    for method, group in by_method.items():
        data = to_arrow(table, group).drop_columns([PARTITION_COLUMN])
        paths.append(write_file(fs, _partition(root, table, method), data, file_name(group)))
    return _uris(study_dir, paths)


def append(study_dir: str, table: str, rows: list[dict[str, Any]]) -> str:
    """Append `rows` to append-only `table` of the study as one new Parquet file per method.

    Returns the written file's path, or the table's directory when the rows span several
    files or there are no rows (nothing is written).
    """
    paths = append_files(study_dir, table, rows)
    return paths[0] if len(paths) == 1 else table_dir(study_dir, table)


# ---------------------------------------------------------------- load


def load(study_dir: str, table: str, *, filter: Any = None) -> pa.Table:
    """Read `table` of a study with hive partitioning and a schema unified across files.

    `filter` is a `pyarrow.dataset` expression (e.g. `ds.field("status") == "completed"`) or
    a dict of column equalities. A table nobody has written yet is empty with the declared
    schema. `trials` has one row per trial, its current state (also for a study written
    before the per-trial files: its latest state per trial, then `filter`).
    """
    declared = schema_for(table)
    fs, root = resolve(study_dir)
    tables_root = f"{root}/tables"
    if fs.get_file_info(tables_root).type != pafs.FileType.Directory:
        raise UserError(f"{study_dir}: not an fgray study (no tables/ found)")
    directory = f"{tables_root}/{table}"
    expr = as_expression(filter)
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return declared.empty_table()
    for attempt in range(3):
        try:
            return _load_files(fs, directory, table, declared, expr)
        except FileNotFoundError:
            # A listed file was removed meanwhile (an old-layout trials file moved into
            # trial_events by a writer): list again.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _load_files(fs: pafs.FileSystem, directory: str, table: str, declared: pa.Schema,
                expr: ds.Expression | None) -> pa.Table:
    # The listed files, not a second listing: a file written meanwhile has a schema we
    # have not read, and the next load will pick it up whole.
    files = ds.dataset(directory, filesystem=fs, format="parquet",
                       partitioning=PARTITIONING).files
    legacy = table == TRIALS and any(
        f.rsplit("/", 1)[-1].startswith(LEGACY_PREFIX) for f in files)
    if not legacy:
        return read_files(fs, directory, files, declared, expr)
    latest = _latest_per_trial(read_files(fs, directory, files, declared))
    return latest if expr is None else latest.filter(expr)


def file_names(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The names in `directory` (none when it does not exist). On a local disk names only,
    no stat per entry: a driver lists a partition at every trial's end, and a partition of a
    large study holds thousands of files."""
    if is_local(fs):
        try:
            return os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
    selector = pafs.FileSelector(directory, allow_not_found=True)
    return [info.base_name for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File]


def load_trial(study_dir: str, table: str, method: str, trial_id: str) -> pa.Table:
    """One trial's rows of append-only `table`, read from its own files (`file_name`) and
    any file not tagged with one trial -- not from every file of the table."""
    declared = schema_for(table)
    fs, root = resolve(study_dir)
    directory = f"{root}/tables/{table}"
    own, partition = quote(trial_id, safe=""), _partition(root, table, method)
    files = [f"{partition}/{name}" for name in file_names(fs, partition)
             if name.startswith(LEGACY_PREFIX) and name.endswith(".parquet")
             and _trial_tag(name) in (own, None)]
    return read_files(fs, directory, files, declared,
                      (ds.field(PARTITION_COLUMN) == method) & (ds.field("trial_id") == trial_id))


def _latest_per_trial(table: pa.Table) -> pa.Table:
    """`table`'s rows reduced to one per trial with `latest_trials`' rule, in table order."""
    keys = table.select([PARTITION_COLUMN, "trial_id", "status", "end_time",
                         "epochs_run"]).to_pylist()
    for i, row in enumerate(keys):
        row["_row"] = i
    return table.take(sorted(r["_row"] for r in latest_trials(keys)))


# ---------------------------------------------------------------- trial states


def latest_trials(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, trial_id): a trial may report several states over time (e.g.
    `running`, then `completed`); a terminal state beats `running`, then the later end_time,
    then more epochs run, then the later row.
    """
    utc_min = dt.datetime.min.replace(tzinfo=dt.timezone.utc)

    def rank(row: dict[str, Any]) -> tuple:
        terminal = row.get("status") in TRIAL_STATUSES and row.get("status") != "running"
        end = row.get("end_time") or utc_min
        return (terminal, end, row.get("epochs_run") or -1)

    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row.get(PARTITION_COLUMN), row.get("trial_id"))
        if key not in best or rank(row) >= rank(best[key]):
            best[key] = row
    return list(best.values())
