"""Copy a dataset folder from object storage (or any path) to node-local disk.

    python cluster/stage_data.py SOURCE DEST [--threads N]

SOURCE is an `s3://`, `gs://` or local folder; DEST a local folder. Runs on every cluster
node before Ray starts (the `setup_commands` of the `ray up` configs, the init container of
the KubeRay manifests), so training reads images from local disk instead of the network.

Like `aws s3 sync` / `gcloud storage rsync` without `--delete`: a file whose size and
modification time already match is skipped, so a restarted node copies nothing twice.
It goes through pyarrow's filesystems (already an fgray dependency), which pick up
credentials from the node's instance role / service account / workload identity, so no
cloud CLI has to be installed in the image. An empty SOURCE skips staging (for
`--synthetic` studies that need no dataset).
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from fgray.errors import UserError

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class StageReport:
    copied: int
    skipped: int
    bytes_copied: int


def resolve_source(source: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path of a URI or a local (possibly relative) path."""
    if "://" not in source:
        return pafs.LocalFileSystem(), str(Path(source).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(source)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError or ValueError by scheme
        raise UserError(f"dataset source {source}: cannot open ({e})") from e
    return fs, path.rstrip("/")


def _up_to_date(dest: Path, info: pafs.FileInfo) -> bool:
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    if st.st_size != info.size:
        return False
    # Object stores report whole seconds; sub-second local mtimes must not force a copy.
    return info.mtime is None or int(st.st_mtime) == int(info.mtime.timestamp())


def _copy_one(fs: pafs.FileSystem, info: pafs.FileInfo, dest: Path) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A partial file must never look finished to the next run or to a reader: write beside
    # the target and rename, which is atomic on one filesystem.
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    written = 0
    with fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            out.write(chunk)
            written += len(chunk)
    if info.mtime is not None:
        stamp = info.mtime.timestamp()
        os.utime(tmp, (stamp, stamp))
    os.replace(tmp, dest)
    return written


def stage(source: str, dest: str | Path, *, threads: int = 8) -> StageReport:
    """Copy every file under `source` to the same relative path under `dest`."""
    if threads < 1:
        raise UserError(f"--threads {threads}: expected a positive number")
    fs, base = resolve_source(source)
    try:
        top = fs.get_file_info(base)
        entries: list[pafs.FileInfo] = []
        if top.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as e:  # no credentials, access denied, no such bucket
        raise UserError(f"dataset source {source}: cannot list ({e})") from e
    if top.type == pafs.FileType.NotFound:
        raise UserError(f"dataset source {source} does not exist (upload the dataset first)")
    if top.type != pafs.FileType.Directory:
        raise UserError(f"dataset source {source} is a file: expected a folder")
    dest = Path(dest).expanduser()
    files = [e for e in entries if e.type == pafs.FileType.File]
    if not files:
        raise UserError(f"dataset source {source} holds no files")

    todo: list[tuple[pafs.FileInfo, Path]] = []
    for info in files:
        rel = posixpath.relpath(info.path, base)
        target = dest.joinpath(*rel.split("/"))
        if not _up_to_date(target, info):
            todo.append((info, target))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sizes = list(pool.map(lambda job: _copy_one(fs, *job), todo))
    return StageReport(copied=len(todo), skipped=len(files) - len(todo),
                       bytes_copied=sum(sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="s3://, gs:// or local folder; empty string skips")
    parser.add_argument("dest", help="local destination folder")
    parser.add_argument("--threads", type=int, default=8, help="parallel copies (default 8)")
    args = parser.parse_args(argv)
    if not args.source.strip():
        print("stage_data: no dataset source given; nothing staged")
        return 0
    try:
        report = stage(args.source, args.dest, threads=args.threads)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"stage_data: {report.copied} files ({report.bytes_copied / 2**20:.1f} MiB) copied "
          f"from {args.source} to {args.dest}; {report.skipped} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
