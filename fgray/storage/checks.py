"""Proving a location writable before any work starts (`check_writable`)."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from fgray.errors import UserError
from fgray.storage.location import _one_line, _split, display, resolve


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
