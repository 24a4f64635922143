"""The trial function: one Tune trial runs one `Job` -- trains its run (in the trial's own
process with `--workers 0`, otherwise as a Ray Train run) or runs its test evaluation."""

from __future__ import annotations

from typing import Any

import ray.tune

from fgray.storage import join
from fgray.train.run_stop import TrainRunStopper
from fgray.train.trainer import build_trainer, run_in_trial, run_trainer
from fgray.tune.actor_memory import release_memory
from fgray.tune.study.config import TRAIN_DIR
from fgray.tune.study.evaluation import evaluate_job
from fgray.tune.study.jobs import Job, TrialSetup
from fgray.tune.study.ledger import FINISHED, trial_row


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune trial. `--workers 0`: run the engine loop here, reporting to Tune. Otherwise
    launch the Train run of this configuration, named after the trial so a restored trial
    resumes its run; results reach Tune through TuneReportCallback, and a run Tune stops ends
    with its trial (`fgray.train.run_stop`).

    The actor runs trial after trial (`reuse_actors`): what each job freed goes back to the
    system when it ends (`fgray.tune.actor_memory`; without it an actor grew to 9.5 GB over
    the README's main job)."""
    try:
        _run_job(Job.of(config), setup)
    finally:
        release_memory()


def _run_job(job: Job, setup: TrialSetup) -> None:
    if not job.trains:
        evaluate_job(job, setup)
        return
    trial_id = ray.tune.get_context().get_trial_id()
    known = trial_row(setup.study.study_dir, job.method, trial_id)
    if known is not None and known.get("status") in FINISHED:
        # It ended just before its driver was killed, after the last snapshot of the
        # experiment: the restored experiment only closes it, nothing is trained again.
        return
    if known is not None and known.get("status") == "failed":
        raise RuntimeError(known.get("error") or "failed before the study was resumed")
    spec = setup.spec_for(job)
    recorder = setup.recorder(trial_id, job, spec)
    if setup.resources.in_trial:
        run_in_trial(spec, run_uri=join(setup.study.study_dir, TRAIN_DIR, trial_id),
                     resources=setup.resources, recorder=recorder,
                     keep_best=setup.study.keep_best, epoch_hooks=setup.epoch_hooks)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    with TrainRunStopper() as stopper:  # a stopped trial's run ends: Tune reuses the process
        trainer = build_trainer(spec, name=trial_id,
                                storage=join(setup.study.study_dir, TRAIN_DIR),
                                resources=setup.resources, recorder=recorder,
                                callbacks=[TuneReportCallback(), stopper.callback],
                                max_failures=setup.study.max_failures,
                                keep_best=setup.study.keep_best, epoch_hooks=setup.epoch_hooks)
        try:
            run_trainer(trainer)
        except Exception as exc:
            if not stopper.ends_quietly(exc):
                raise
