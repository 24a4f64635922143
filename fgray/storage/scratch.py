"""Local scratch folders for the files a run writes before they go to their location
(`scratch_folder`), with the scratch of dead processes cleaned up."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
