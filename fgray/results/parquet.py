"""The Parquet primitives of the study tables (`fgray.results.tables`): rows to Arrow with
the declared schema (`to_arrow`), writing one file whole (`write_file`, through
`fgray.storage.put`'s rule: a temp file renamed on a local disk, one PUT on an object
store), and reading a set of files as one table with a schema unified across them
(`read_files`)."""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fgray.results.schema import ALLOWED_VALUES, PARTITION_COLUMN, dynamic_type, schema_for
from fgray.storage import put

PARTITIONING = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")
LEGACY_PREFIX = "part-"  # the append-only files of every table but trials


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


# ---------------------------------------------------------------- write and read


def write_file(fs: pafs.FileSystem, directory: str, data: pa.Table,
               name: str | None = None) -> str:
    """Write `data` as `directory/name` (default a new unique `part-<uuid>.parquet`) whole,
    with `fgray.storage.put` (readers see the old file or the whole new one)."""
    name = name or f"{LEGACY_PREFIX}{uuid.uuid4().hex}.parquet"
    final = f"{directory}/{name}"
    buffer = pa.BufferOutputStream()
    pq.write_table(data, buffer)
    put(fs, final, buffer.getvalue().to_pybytes())
    return final


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


def as_expression(filter: Any) -> ds.Expression | None:
    if filter is None or isinstance(filter, ds.Expression):
        return filter
    if isinstance(filter, dict):
        expr = None
        for key, value in filter.items():
            term = ds.field(key) == value
            expr = term if expr is None else expr & term
        return expr
    raise TypeError(f"filter must be a pyarrow.dataset expression or a dict, got {filter!r}")


def read_files(fs: pafs.FileSystem, directory: str, files: list[str], declared: pa.Schema,
               expr: ds.Expression | None = None) -> pa.Table:
    """`files` (under `directory`, hive-partitioned by method) as one table: the declared
    schema unified with every file's, filtered by `expr`."""
    if not files:
        return declared.empty_table()
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        file_schemas = list(pool.map(lambda f: pq.read_schema(f, filesystem=fs), files))
    schema = unify(declared, file_schemas)
    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=schema,
                         partitioning=PARTITIONING, partition_base_dir=directory)
    return dataset.to_table(filter=expr)
