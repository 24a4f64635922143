"""Locations: a local path or a storage URI (`s3://`, `gs://`, anything `pyarrow.fs`
opens), joined, shown and resolved to a pyarrow filesystem; `Location`, one resolved once."""

from __future__ import annotations

import functools
import os
import urllib.parse
from typing import TYPE_CHECKING

from fgray.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


class Location(str):
    """A location made absolute once (`absolute`), then passed as it is: a `str`, so every
    function that takes a location takes it, and joining it (`child`) gives another."""

    def __new__(cls, location: str | os.PathLike) -> Location:
        if isinstance(location, Location):
            return location
        return super().__new__(cls, absolute(location))

    def child(self, *parts: str) -> Location:
        """`self/part/...` (a URI's query stays at its end)."""
        return Location(join(self, *parts))

    @property
    def shown(self) -> str:
        """The location as a person reads it (`display`)."""
        return display(self)


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
