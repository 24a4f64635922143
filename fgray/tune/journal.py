"""The Optuna study storage of a study: a JournalStorage file at STUDY_DIR/optuna/journal.log,
which `optuna-dashboard STUDY_DIR/optuna/journal.log` opens.

Optuna's journal file needs a local file system (it appends and locks). For an `s3://` or
`gs://` study the journal lives in a local mirror (under FGRAY_CACHE, keyed by the study URI)
and is copied to STUDY_DIR/optuna/journal.log after every finished trial and at the end; a
resumed study on another machine first downloads the stored copy. Only one driver may run a
study at a time (as with Tune's own experiment state).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs

from fgray.data.cache import default_cache_dir
from fgray.results.layout import OPTUNA_JOURNAL
from fgray.storage import is_local, put, resolve


class Journal:
    """Where a study's Optuna journal is written, and its copy in remote storage."""

    def __init__(self, study_dir: str) -> None:
        self.study_dir = study_dir
        self.fs, root = resolve(study_dir)
        self.remote = f"{root}/{OPTUNA_JOURNAL}"
        if is_local(self.fs):
            self.local = Path(self.remote)
            self.mirrored = False
        else:
            key = hashlib.sha256(study_dir.encode()).hexdigest()[:16]
            self.local = default_cache_dir() / "journals" / key / "journal.log"
            self.mirrored = True
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def download(self) -> None:
        """Bring the stored journal down when it is ahead of the local copy (a resume on a
        new head, or on a machine whose copy an earlier driver left behind). The journal only
        grows, so the longer copy is the newer one."""
        if not self.mirrored:
            return
        info = self.fs.get_file_info(self.remote)
        have = self.local.stat().st_size if self.local.exists() else -1
        if info.type == pafs.FileType.File and info.size > have:
            with self.fs.open_input_stream(self.remote) as src, open(self.local, "wb") as out:
                out.write(src.read())

    def upload(self) -> None:
        if not self.mirrored or not self.local.exists():
            return
        put(self.fs, self.remote, self.local.read_bytes())

    def storage(self):
        import optuna
        from optuna.storages.journal import JournalFileBackend

        self.download()
        return optuna.storages.JournalStorage(JournalFileBackend(str(self.local)))
