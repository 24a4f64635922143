"""Whole-file writes a reader never sees half done (`atomic_path` on a local disk, `put` on
any filesystem, and the `write_*` helpers), and whole-file reads that return None for a
missing file. Every writer of fgray goes through `put` or `atomic_path`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgray.storage.location import is_local, resolve

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def temp_sibling(final: str | os.PathLike) -> Path:
    """A fresh temporary name next to `final`: hidden (a leading '.': pyarrow, pandas and
    Spark skip it) and ending in `.tmp` (not `*.parquet`, which DuckDB's glob matches even
    for hidden files; not an `epoch-*` checkpoint folder)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (where the filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Write a local file or folder under a temporary name, then move it into place.

    Yields a path next to `final` (`temp_sibling`) that does not exist yet: the body creates
    it, as a file or as a folder. When the body returns, everything written is fsync'ed
    and the temporary is renamed to `final` with `os.replace`, so a reader sees the old
    `final` or the complete new one, never a partial one; a file replaces the old one in one
    step, a folder replaces an existing folder by removing it first. When the body raises
    (or writes nothing), the temporary is removed and `final` is untouched.

    `keep_existing`: a `final` that exists once the temporary is complete (another process
    finished the same work first) is kept and the new one discarded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if tmp.is_dir():
            for directory, _, files in os.walk(tmp):
                for name in files:
                    _fsync_file(Path(directory, name))
        elif tmp.exists():
            _fsync_file(tmp)
        else:
            raise FileNotFoundError(f"{tmp}: nothing was written for {final}")
        if keep_existing and final.exists():
            _remove(tmp)
            return
        # Never remove a `final` that is to be kept: another process may have put it in place
        # since the check above (two Ray ranks building the same cache: one removed the
        # other's finished folder while it read it). The rename then fails and theirs stays.
        if not keep_existing and tmp.is_dir() and final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (keep_existing and final.exists()):  # lost a race: keep theirs
                raise
            _remove(tmp)
            return
        _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


# ---------------------------------------------------------------- whole files


# Object stores need no folder before a file: creating one writes an empty marker object.
_FLAT_STORES = ("s3", "gcs")


def put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` as the file `path` of `fs` whole (module docstring), creating its folder."""
    if is_local(fs):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return
    if fs.type_name not in _FLAT_STORES:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write the file at `location` whole (module docstring)."""
    fs, path = resolve(location)
    put(fs, path, data)


# What one read of an object asks for. pyarrow's S3 and GCS streams send one ranged GET per
# read call, and shutil's default 64 KiB reads made a 48 MB checkpoint 768 requests (32 s
# against a local S3 server, 0.25 s in 16 MiB reads; on a real bucket each costs a round trip).
READ_CHUNK = 16 * 2**20


def copy_stream(src, out) -> None:
    """Copy an open pyarrow input stream (or any file object) into `out` in READ_CHUNK reads."""
    shutil.copyfileobj(src, out, READ_CHUNK)


def read_bytes(location: str | os.PathLike) -> bytes | None:
    """The contents of the file at `location`, or None when there is no such file."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return src.read()


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def read_text(location: str | os.PathLike) -> str | None:
    data = read_bytes(location)
    return None if data is None else data.decode("utf-8")


def write_json(location: str | os.PathLike, payload: Any) -> None:
    """`payload` as JSON (anything else JSON cannot hold written with `str`)."""
    write_text(location, json.dumps(payload, default=str))


def read_json(location: str | os.PathLike) -> Any | None:
    text = read_text(location)
    return None if text is None else json.loads(text)


def delete_file(location: str | os.PathLike) -> None:
    """Remove the file at `location` if there is one."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
