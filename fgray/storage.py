"""Where fgray keeps files: a local path or a storage URI (`s3://`, `gs://`, anything
`pyarrow.fs` opens), and whole-file writes that a reader never sees half done.

A *location* is a string: a local path (made absolute with `absolute`) or a URI, pyarrow's
query options included (`s3://bucket/x?endpoint_override=host:9000&scheme=http`). `resolve`
gives the pyarrow filesystem (one per store and process, built from the standard places:
AWS_ENDPOINT_URL, AWS_*, profiles, instance roles, GOOGLE_*) and the path inside it; `join`
appends parts before a query; `as_location` turns a path inside a filesystem back into a
location like a given one; `display` drops the query for people; `check_writable` proves a
location writable (one probe, deleted) before any work starts.

Folders: `upload_tree`/`download_tree`/`local_copy` move a folder between local disk and a
location; `Mirror` keeps a location a copy of a local folder a run writes as it goes (a run in
object storage trains in local scratch, `scratch_folder`, and mirrors it after each epoch).

Writes are whole or not at all for a reader (`write_bytes`, `write_text`, `write_json`,
`put`): on a local filesystem the data goes to a temporary sibling that is fsync'ed and then
renamed over the target (`atomic_path`); on an object store one PUT is visible only once
complete and replaces the old object whole, which gives the same guarantee without a rename.
Reads return None for a file that does not exist.

No Ray, torch or pandas here: every layer (data, models, engine, results, train, tune) uses
it. pyarrow is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgray.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    """Whether `location` is a URI (`scheme://...`) rather than a local path."""
    return "://" in str(location)


def _split(location: str | os.PathLike) -> tuple[str, str, str]:
    """(scheme, the rest without its query, query) of a URI; ("", path, "") of a path.

    pyarrow's URIs carry their filesystem's options as a query
    (`s3://bucket/x?endpoint_override=host:port&scheme=http`): a path is joined before it."""
    text = str(location)
    if not is_uri(text):
        return "", text, ""
    parts = urllib.parse.urlsplit(text)
    rest = text.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    return parts.scheme, rest, parts.query


def _unsplit(scheme: str, rest: str, query: str) -> str:
    if not scheme:
        return rest
    return f"{scheme}://{rest}" + (f"?{query}" if query else "")


def absolute(location: str | os.PathLike) -> str:
    """A local path made absolute (`~` expanded; Ray needs absolute paths); a URI without
    its trailing `/` (its query kept)."""
    scheme, rest, query = _split(location)
    if not scheme:
        return os.path.abspath(os.path.expanduser(rest))
    return _unsplit(scheme, rest.rstrip("/"), query)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URI alike (a URI's query stays at its end)."""
    scheme, rest, query = _split(base)
    return _unsplit(scheme, "/".join([rest.rstrip("/"), *parts]), query)


def display(location: str | os.PathLike) -> str:
    """A location as a person reads it: a URI without its query (which may hold options a
    user passed, never needed to recognise the place)."""
    scheme, rest, _ = _split(location)
    return _unsplit(scheme, rest, "")


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, authority: str, query: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of one store (scheme, bucket or host, options), built once per process,
    and the path of the store's root inside it. Endpoint and credentials come from where
    pyarrow's clients look (`AWS_ENDPOINT_URL`, `AWS_*`, `~/.aws`, instance profiles and
    workload identity; `GOOGLE_APPLICATION_CREDENTIALS` ...) or from the query."""
    import pyarrow.fs as pafs

    uri = _unsplit(scheme, authority, query)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it of a local path or a storage URI; a URI
    pyarrow cannot open is a UserError naming it. One filesystem per store and process."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    scheme, rest, query = _split(location)
    if not scheme:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(rest))
    if scheme == "file":
        return pafs.LocalFileSystem(), rest.rstrip("/") or "/"
    authority, _, inside = rest.partition("/")
    try:
        fs, root = _filesystem(scheme, authority, query)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise UserError(
            f"{display(location)}: cannot open this storage location ({_one_line(exc)}); "
            "expected a local path or an s3:// or gs:// URI") from None
    inside = inside.strip("/")
    return fs, (f"{root}/{inside}" if inside else root) if root else f"/{inside}"


def is_local(fs: pafs.FileSystem) -> bool:
    """Whether `fs` (from `resolve`) is the local filesystem."""
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def as_location(like: str | os.PathLike, path: str) -> str:
    """`path`, a path inside the filesystem of location `like` (`resolve`), as a location:
    with `like`'s scheme (and query) when `like` is a URI, as it is when `like` is local."""
    scheme, _, query = _split(like)
    return _unsplit(scheme, path.lstrip("/") if scheme else path, query) if scheme else path


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def check_writable(location: str | os.PathLike, what: str = "storage") -> None:
    """Raise a UserError unless files can be written at `location`, before anything else is
    done there. A local folder (created or not): the folder itself or, when it does not exist
    yet, its nearest existing ancestor is tried with a temporary file. A URI: one small object
    is written under it and deleted again, which finds a missing bucket, missing or rejected
    credentials and a read-only policy alike. Leaves nothing behind."""
    scheme, _, _ = _split(location)
    if scheme and scheme != "file":
        _check_remote_writable(location, what)
        return
    text = str(location)
    target = Path(resolve(location)[1])
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {text}: {probe} is not a folder; expected a writable folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".fgray-write-test-", dir=probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = "" if probe == target else f" (nearest existing folder {probe})"
        raise UserError(f"{what} {text}: not writable{where}: {reason}; expected a "
                        "writable folder") from None
    os.close(fd)
    os.unlink(name)


def _check_remote_writable(location: str | os.PathLike, what: str) -> None:
    import pyarrow as pa

    fs, path = resolve(location)
    probe = f"{path}/.fgray-write-test-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"fgray")
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{what} {display(location)}: cannot write there ({_one_line(exc)}); expected an "
            "existing bucket and credentials allowed to write to it (AWS_* or GOOGLE_* "
            "variables, a profile, an instance role; AWS_ENDPOINT_URL for an S3-compatible "
            "store)") from None
    try:
        fs.delete_file(probe)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{what} {display(location)}: can write but not delete there ({_one_line(exc)}); "
            "expected credentials allowed to delete too (checkpoints are replaced and pruned)"
            ) from None


# ---------------------------------------------------------------- atomic local writes


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
        if tmp.is_dir() and final.is_dir() and not final.is_symlink():
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


# ---------------------------------------------------------------- folders


def upload_tree(local: str | os.PathLike, location: str | os.PathLike, *,
                last: str | None = None) -> None:
    """Copy the local folder `local` to `location`, file by file (each whole, `put`), the file
    named `last` (a marker that the folder is complete) after all the others."""
    fs, root = resolve(location)
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file()),
                   key=lambda p: (p.name == last, str(p)))
    for file in files:
        put(fs, f"{root}/{file.relative_to(local).as_posix()}", file.read_bytes())


def download_tree(location: str | os.PathLike, local: str | os.PathLike) -> int:
    """Copy every file under `location` into the local folder `local`; returns how many."""
    import pyarrow.fs as pafs

    fs, root = resolve(location)
    local = Path(local)
    count = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                   allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        target = local / info.path[len(root):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as out:
            copy_stream(src, out)
        count += 1
    return count


@contextlib.contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """A local path holding the file or folder at `location`: the path itself when local,
    else a temporary copy, removed on exit."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    if is_local(fs):
        yield Path(path)
        return
    scratch = scratch_folder("copy")
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            target = scratch / path.rsplit("/", 1)[-1]
            with fs.open_input_stream(path) as src, open(target, "wb") as out:
                copy_stream(src, out)
            yield target
        else:
            download_tree(location, scratch)
            yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Mirror:
    """Keeps a location a copy of a local folder that a process writes as it goes (a run's
    scratch folder): `sync()` uploads the files that are new or changed since the last sync
    (`last`, when given, after the others) and deletes from the location the files the
    folder no longer has (pruned checkpoints). Only what this process wrote is tracked: a
    location it resumes from is downloaded first (`pull`)."""

    def __init__(self, local: str | os.PathLike, location: str | os.PathLike) -> None:
        self.local = Path(local)
        self.location = str(location)
        self.fs, self.root = resolve(location)
        self._sent: dict[str, tuple[int, int]] = {}

    def pull(self) -> int:
        """Download what the location already holds into the local folder (a resume)."""
        count = download_tree(self.location, self.local)
        self._sent = self._state()
        return count

    def _state(self) -> dict[str, tuple[int, int]]:
        return {p.relative_to(self.local).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in self.local.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}

    def sync(self, last: str | None = None) -> None:
        state = self._state()
        changed = sorted((k for k, v in state.items() if self._sent.get(k) != v),
                         key=lambda k: (k == last, k))
        for rel in changed:
            put(self.fs, f"{self.root}/{rel}", (self.local / rel).read_bytes())
        gone: set[str] = set()
        for rel in sorted(set(self._sent) - set(state)):
            # The highest folder the local side lost goes whole: deleting an object store's
            # last file in a folder would leave an empty marker for the folder behind.
            parts = rel.split("/")
            lost = next((i for i in range(1, len(parts))
                         if not (self.local / "/".join(parts[:i])).exists()), len(parts))
            gone.add("/".join(parts[:lost]))
        for rel in sorted(gone):
            if rel in self._sent:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(f"{self.root}/{rel}")
            else:
                self.fs.delete_dir(f"{self.root}/{rel}")
        self._sent = state


# ---------------------------------------------------------------- scratch

SCRATCH_PREFIX = "fgray-"


def scratch_folder(kind: str, root: str | None = None) -> Path:
    """A new local scratch folder for this process, `fgray-<kind>-<pid>-<random>` in the
    temp folder (or `root`), for files a run writes before they go to their location. The
    scratch of a process that no longer runs is removed first: a run killed by SIGKILL (a
    lost node, the OOM killer, a test's crash) never reaches the `finally` that removes its
    own."""
    base = Path(root or tempfile.gettempdir())
    for old in base.glob(f"{SCRATCH_PREFIX}*-*-*"):
        pid = old.name[len(SCRATCH_PREFIX):].split("-")[1:2]
        if pid and pid[0].isdigit() and not _process_exists(int(pid[0])):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-", dir=base))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
