"""Study tables under `STUDY_DIR/tables/`, safe with many concurrent writers.

Layout (hive partitioning, so `pd.read_parquet`, `pyarrow.dataset`, Spark and DuckDB's
`read_parquet('tables/<table>/**/*.parquet', hive_partitioning=true, union_by_name=true)` read
a folder as one table):

- `tables/trials/method=<m>/trial-<trial_id>.parquet`: ONE file per trial holding one row,
  the trial's current state. A new state replaces the file whole (`write_trials`).
- `tables/trial_events/`, `tables/epochs/`, `tables/evals/`:
  `method=<m>/part-<uuid>.parquet`, append-only. Every `append` writes new files with unique
  names and never touches existing ones, so trials on different nodes report at the same time
  without locks. `trial_events` is the trials table's history: every state ever written
  (`running`, `stopped`, `completed`, the row again with its test metrics, ...).

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

import contextlib
import datetime as dt
import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fgray.errors import UserError
from fgray.results.schema import (
    ALLOWED_VALUES,
    PARTITION_COLUMN,
    TRIAL_STATUSES,
    dynamic_type,
    schema_for,
)
from fgray.storage import as_location, atomic_path, is_local, join, resolve

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per study is then assumed
    fcntl = None

_PARTITIONING = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")

TRIALS = "trials"
TRIAL_EVENTS = "trial_events"
SNAPSHOT_PREFIX = "trial-"  # tables/trials/method=<m>/trial-<trial_id>.parquet
LEGACY_PREFIX = "part-"  # the append-only files of every other table
LOCK_NAME = ".lock"
STALE_TEMP_S = 600.0  # a trials temp file this old belongs to a writer that died


# ---------------------------------------------------------------- coercion on write


def _to_timestamp(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        # A naive time is taken as UTC: fgray writes times with time.time() or UTC datetimes.
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value
    if isinstance(value, numbers.Real):
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    if isinstance(value, str):
        return _to_timestamp(dt.datetime.fromisoformat(value))
    raise TypeError


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _coerce(value: Any, typ: pa.DataType) -> Any:
    """One Python value converted to what pyarrow needs to build an array of `typ`."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalars and 0-d tensors
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return _to_str(value)
    if pa.types.is_integer(typ):
        if isinstance(value, numbers.Integral):
            return int(value)
        number = float(value)
        if math.isnan(number):
            return None
        if not number.is_integer():
            raise TypeError
        return int(number)
    if pa.types.is_floating(typ):
        return float(value)
    if pa.types.is_boolean(typ):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if pa.types.is_timestamp(typ):
        return _to_timestamp(value)
    return value


def _column(table: str, name: str, values: list[Any], typ: pa.DataType) -> pa.Array:
    out = []
    for value in values:
        try:
            out.append(_coerce(value, typ))
        except (TypeError, ValueError):
            raise ValueError(f"{table}.{name}: cannot store {value!r} as {typ}") from None
    return pa.array(out, type=typ)


def _infer_type(values: list[Any]) -> pa.DataType | None:
    """The type of a dynamic column: bool, int64, float64, else string (JSON for containers)."""
    present = [v.item() if hasattr(v, "item") and not isinstance(v, str) else v
               for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def to_arrow(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table: declared columns cast to their declared types (missing ones
    null), extra columns kept with an inferred type; extra columns with no value are left out.
    """
    declared = schema_for(table)
    names = list(declared.names)
    extras: list[str] = []
    for row in rows:
        extras.extend(k for k in row if k not in declared.names and k not in extras)
    arrays, fields = [], []
    for name in names:
        typ = declared.field(name).type
        values = [r.get(name) for r in rows]
        allowed = ALLOWED_VALUES.get((table, name))
        bad = sorted({str(v) for v in values if v is not None} - set(allowed)) if allowed else []
        if bad:
            raise ValueError(f"{table}.{name}: {', '.join(map(repr, bad))} is not one of "
                             f"{', '.join(allowed)}")
        arrays.append(_column(table, name, values, typ))
        fields.append(declared.field(name))
    for name in extras:
        values = [r.get(name) for r in rows]
        typ = dynamic_type(table, name) or _infer_type(values)
        if typ is None:
            continue
        arrays.append(_column(table, name, values, typ))
        fields.append(pa.field(name, typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# ---------------------------------------------------------------- append


def _write_file(fs: pafs.FileSystem, directory: str, data: pa.Table,
                name: str | None = None) -> str:
    """Write `data` as `directory/name` (default a new unique `part-<uuid>.parquet`) so that
    readers see the old file or the whole new one (module docstring)."""
    name = name or f"{LEGACY_PREFIX}{uuid.uuid4().hex}.parquet"
    final = f"{directory}/{name}"
    if not is_local(fs):
        fs.create_dir(directory, recursive=True)
        pq.write_table(data, final, filesystem=fs)
        return final
    with atomic_path(final) as tmp:  # fsync'ed, then renamed over `final`
        pq.write_table(data, str(tmp))
    return final


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


def append_files(study_dir: str, table: str, rows: list[dict[str, Any]]) -> list[str]:
    """Write `rows` as new Parquet files, one per method; returns the files' paths.

    The `trials` table holds one file per trial: its rows go through `write_trials`, and the
    paths returned are the trials' files."""
    schema_for(table)
    if table == TRIALS:
        return write_trials(study_dir, rows)
    by_method = _by_method(table, rows)
    fs, root = resolve(study_dir)
    paths = []
    for method, group in by_method.items():
        data = to_arrow(table, group).drop_columns([PARTITION_COLUMN])
        directory = f"{root}/tables/{table}/{PARTITION_COLUMN}={quote(method, safe='')}"
        paths.append(_write_file(fs, directory, data))
    return _uris(study_dir, paths)


def append(study_dir: str, table: str, rows: list[dict[str, Any]]) -> str:
    """Append `rows` to `table` of the study as one new Parquet file per method (for
    `trials`: record each row as its trial's new state, see `write_trials`).

    Returns the written file's path, or the table's directory when the rows span several
    files or there are no rows (nothing is written).
    """
    paths = append_files(study_dir, table, rows)
    return paths[0] if len(paths) == 1 else table_dir(study_dir, table)


# ---------------------------------------------------------------- load


def _unify_by_field(schemas: list[pa.Schema]) -> pa.Schema:
    """Fallback when Arrow cannot promote: numbers become float64, anything else string."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            types.setdefault(field.name, []).append(field.type)
    fields = []
    for name, seen in types.items():
        kinds = {t for t in seen if not pa.types.is_null(t)}
        if len(kinds) <= 1:
            fields.append(pa.field(name, kinds.pop() if kinds else pa.null()))
        elif all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
            fields.append(pa.field(name, pa.float64()))
        else:
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


def unify(declared: pa.Schema, file_schemas: Iterable[pa.Schema]) -> pa.Schema:
    """Declared columns first with their declared types, then every other column (sorted)."""
    schemas = [declared, *(s.remove_metadata() for s in file_schemas)]
    try:
        merged = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        merged = _unify_by_field(schemas)
    extras = sorted((f for f in merged if f.name not in declared.names), key=lambda f: f.name)
    return pa.schema(list(declared) + extras)


def _as_expression(filter: Any) -> ds.Expression | None:
    if filter is None or isinstance(filter, ds.Expression):
        return filter
    if isinstance(filter, dict):
        expr = None
        for key, value in filter.items():
            term = ds.field(key) == value
            expr = term if expr is None else expr & term
        return expr
    raise TypeError(f"filter must be a pyarrow.dataset expression or a dict, got {filter!r}")


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
    expr = _as_expression(filter)
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
    files = ds.dataset(directory, filesystem=fs, format="parquet",
                       partitioning=_PARTITIONING).files
    if not files:
        return declared.empty_table()
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        file_schemas = list(pool.map(lambda f: pq.read_schema(f, filesystem=fs), files))
    schema = unify(declared, file_schemas)
    # The listed files, not a second listing: a file written meanwhile has a schema we
    # have not read, and the next load will pick it up whole.
    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=schema,
                         partitioning=_PARTITIONING, partition_base_dir=directory)
    legacy = table == TRIALS and any(
        f.rsplit("/", 1)[-1].startswith(LEGACY_PREFIX) for f in files)
    if not legacy:
        return dataset.to_table(filter=expr)
    latest = _latest_per_trial(dataset.to_table())
    return latest if expr is None else latest.filter(expr)


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


# ---------------------------------------------------------------- the trials table


def snapshot_name(trial_id: str) -> str:
    """The file of a trial in its method's partition of `tables/trials/`."""
    if not isinstance(trial_id, str) or not trial_id:
        raise UserError(f"trials row has no trial_id ({trial_id!r}): every trials row needs "
                        "the trial it describes")
    return f"{SNAPSHOT_PREFIX}{quote(trial_id, safe='')}.parquet"


def _partition(root: str, table: str, method: str) -> str:
    return f"{root}/tables/{table}/{PARTITION_COLUMN}={quote(method, safe='')}"


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
    return _write_file(fs, _partition(root, TRIALS, method), data,
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
    selector = pafs.FileSelector(directory, allow_not_found=True)
    return [info.path for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.startswith(LEGACY_PREFIX)
            and info.base_name.endswith(".parquet")]


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
