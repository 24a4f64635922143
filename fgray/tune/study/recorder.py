"""The Tune callback on the study driver that writes each training trial's row to the
trials table as it starts and ends (`StudyRecorder`), and `error_line`, the one line of a
failed trial's error it records."""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from fgray.results.records import trial_history
from fgray.tune.journal import Journal
from fgray.tune.study.jobs import Job, TrialSetup
from fgray.tune.study.ledger import FINISHED, trial_row


def error_line(text: str | None) -> str:
    """The exception line of a traceback (`FloatingPointError: non-finite loss ...`)."""
    if not text:
        return "unknown error"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.replace(".", "").isidentifier() and (head.endswith("Error")
                                                      or head.endswith("Exception")):
            return line
    return lines[-1]


class StudyRecorder(Callback):
    """Tune callback on the study driver: a `running` trials row when a trial starts, its
    final row when it completes (`completed`, or `stopped` by ASHA before its budget) or
    fails (`failed`, with the error). Epoch rows come from the trial (`--workers 0`) or its
    Train controller."""

    def __init__(self, setup: TrialSetup) -> None:
        self.trial_setup = setup
        self._start: dict[str, float] = {}

    def _start_time(self, trial, job: Job) -> float:
        if trial.trial_id not in self._start:
            row = trial_row(self.trial_setup.study.study_dir, job.method, trial.trial_id)
            self._start[trial.trial_id] = (row["start_time"].timestamp()
                                           if row and row.get("start_time") else time.time())
        return self._start[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        job = Job.of(trial.config)
        if not job.trains:
            return  # an evaluation job records its own rows
        setup = self.trial_setup
        known = trial_row(setup.study.study_dir, job.method, trial.trial_id)
        start = self._start_time(trial, job)
        if known is None:
            setup.recorder(trial.trial_id, job, setup.spec_for(job), start).finish([], "running")

    def _finish(self, trial, status: str, error: str | None = None) -> None:
        job = Job.of(trial.config)
        if not job.trains:
            return
        setup = self.trial_setup
        spec = setup.spec_for(job)
        history = trial_history(setup.study.study_dir, job.method, trial.trial_id)
        if status == "completed" and (not history or history[-1]["epoch"] < spec.train.epochs):
            status = "stopped"  # ended by the scheduler before its epoch budget
        known = trial_row(setup.study.study_dir, job.method, trial.trial_id)
        ran = history[-1]["epoch"] if history else 0
        if known and known.get("status") in FINISHED and status == "failed":
            # A trial that finished before its driver was killed failed to be closed again
            # by the restored experiment (e.g. Tune could not restore it): it stays finished.
            return
        if known and known.get("status") == status and known.get("epochs_run") == ran:
            # A trial that finished just before its driver was killed is finished again by
            # the restored experiment (its Train run resumes at its end): nothing new.
            return
        recorder = setup.recorder(trial.trial_id, job, spec, self._start_time(trial, job))
        recorder.finish(history, status, error=error)
        Journal(setup.study.study_dir).upload()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        # The driver's copy of the error file; the one in storage is synced later.
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local and local.is_file() else trial.get_error()
        self._finish(trial, "failed", error=error_line(text))

