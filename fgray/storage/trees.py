"""Folders between local disk and a location: `upload_tree`, `download_tree`, `local_copy`,
`move_tree` (a folder written locally, moved into place whole), and `Mirror`, which keeps a
location a copy of a local folder a run writes as it goes."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fgray.storage.files import atomic_path, copy_stream, put
from fgray.storage.location import is_local, resolve
from fgray.storage.scratch import scratch_folder


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


def move_tree(local: str | os.PathLike, location: str | os.PathLike, *,
              last: str | None = None) -> None:
    """Move the local folder `local` to `location`, whole or not at all for a reader: on a
    local filesystem it is renamed into place (`atomic_path`); on an object store its files
    are uploaded with the file named `last` (the marker that the folder is complete) after
    the others, then the local folder is removed."""
    fs, target = resolve(location)
    if is_local(fs):
        with atomic_path(target) as staging:
            shutil.move(str(local), staging)
        return
    upload_tree(local, location, last=last)
    shutil.rmtree(local, ignore_errors=True)


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
