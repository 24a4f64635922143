"""Append-only Parquet tables under `STUDY_DIR/tables/`, safe with many concurrent writers.

Layout: `STUDY_DIR/tables/<table>/method=<m>/part-<uuid>.parquet` (hive partitioning, so
`pd.read_parquet`, `pyarrow.dataset` and DuckDB read the folder as one table). Every `append`
writes new files with unique names and never touches existing ones, so trials on different
nodes can report at the same time without locks.

Atomicity: on a local filesystem a file is first written as `.part-<uuid>.parquet.tmp` (a
leading dot, which pyarrow, pandas and DuckDB's hive readers skip) and then renamed with
`os.replace`, so a reader sees either no file or a complete one. On object stores (`s3://`,
`gs://`) a file is written straight to its final key: an object PUT becomes visible only
once complete, which gives the same guarantee without a rename (object stores have none).

The `method` column is the partition key: it lives in the directory name, not in the files.
`load` unifies the schemas of all files with the declared one, so a column that first appears
in a later write is present after loading (null in earlier rows). Plain pandas reads take the
first file's schema and may miss such late columns; `load` is the faithful reader.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import os
import uuid
from collections.abc import Iterable
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

_PARTITIONING = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")


def resolve(study_dir: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path or a storage URI."""
    if "://" in study_dir:
        try:
            fs, path = pafs.FileSystem.from_uri(study_dir)
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise UserError(
                f"{study_dir}: cannot open this storage location ({exc}); expected a local "
                "path or an s3:// or gs:// URI") from None
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(study_dir))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


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


def _write_file(fs: pafs.FileSystem, directory: str, data: pa.Table) -> str:
    fs.create_dir(directory, recursive=True)
    name = f"part-{uuid.uuid4().hex}.parquet"
    final = f"{directory}/{name}"
    if not is_local(fs):
        pq.write_table(data, final, filesystem=fs)
        return final
    tmp = f"{directory}/.{name}.tmp"
    try:
        pq.write_table(data, tmp, filesystem=fs)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final


def table_dir(study_dir: str, table: str) -> str:
    """Where `table`'s dataset lives (a local path or a URI, like `study_dir`)."""
    schema_for(table)
    return f"{study_dir.rstrip('/')}/tables/{table}"


def append_files(study_dir: str, table: str, rows: list[dict[str, Any]]) -> list[str]:
    """Write `rows` as new Parquet files, one per method; returns the files' paths."""
    schema_for(table)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        method = row.get(PARTITION_COLUMN)
        if not isinstance(method, str) or not method:
            raise UserError(
                f"{table} row {i} has no {PARTITION_COLUMN!r}: every row needs the method it "
                "belongs to (the partition key)")
        by_method.setdefault(method, []).append(row)
    fs, root = resolve(study_dir)
    paths = []
    for method, group in by_method.items():
        data = to_arrow(table, group).drop_columns([PARTITION_COLUMN])
        directory = f"{root}/tables/{table}/{PARTITION_COLUMN}={quote(method, safe='')}"
        paths.append(_write_file(fs, directory, data))
    if "://" in study_dir:
        scheme = study_dir.split("://", 1)[0]
        paths = [f"{scheme}://{p}" for p in paths]
    return paths


def append(study_dir: str, table: str, rows: list[dict[str, Any]]) -> str:
    """Append `rows` to `table` of the study as one new Parquet file per method.

    Returns the written file's path, or the table's directory when the rows span several
    methods (one file each) or there are no rows (nothing is written).
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
    schema.
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
    return dataset.to_table(filter=expr)


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
