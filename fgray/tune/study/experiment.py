"""The Tune experiments of a study: the trainable (`train_trial` with each job's resources),
the Tuner's TuneConfig and RunConfig, restoring an experiment a previous run left behind
(`_fit`), and the two kinds of experiment -- the search (`search`) and a list of fixed
jobs (`run_jobs`: compare runs, --more-seeds retrains, evaluations left over)."""

from __future__ import annotations

import os
import zlib
from collections import Counter
from typing import Any

import ray
import ray.tune
from ray.tune import PlacementGroupFactory, Tuner

from fgray.storage import join, resolve
from fgray.train.cluster import ray_storage
from fgray.train.hooks import EpochHookSpec
from fgray.train.resources import WorkerResources
from fgray.tune.study.config import TUNE_DIR, StudyConfig
from fgray.tune.study.console import Console, StudyProgress
from fgray.tune.study.jobs import JOB, Job, TrialSetup
from fgray.tune.study.recorder import StudyRecorder
from fgray.tune.study.scheduler import MethodScheduler
from fgray.tune.study.searcher import StudySearcher
from fgray.tune.study.trial import train_trial

SEARCH = "search"  # the search experiment's name (tune/search/)
EXPERIMENT_SYNC_S = 5


def _trainable(setup: TrialSetup):
    resources = setup.resources

    def reserve(config: dict[str, Any]) -> PlacementGroupFactory:
        # An evaluation job runs in the trial's own process, with one worker's share (the
        # same as a `--workers 0` trial, so Tune reuses the actor for it).
        wants = ({"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
                 if not Job.of(config).trains else resources.trial_resources())
        return PlacementGroupFactory([{k.upper() if k in ("cpu", "gpu") else k: v
                                       for k, v in wants.items() if v or k == "cpu"}])

    return ray.tune.with_resources(ray.tune.with_parameters(train_trial, setup=setup), reserve)


def trial_dirname(trial) -> str:
    """A Tune trial's folder is named after its id (`tune/<experiment>/<trial_id>/`)."""
    return trial.trial_id


def _tune_config(**kwargs) -> ray.tune.TuneConfig:
    # Reusing a trial's actor saves a process start and the imports (4.3 s per trial on 2
    # cores); a trial holds no state worth keeping, and a Train trial's run ends when Tune
    # stops it (`fgray.train.run_stop`), so the process is free for the next.
    return ray.tune.TuneConfig(trial_dirname_creator=trial_dirname, reuse_actors=True,
                               **kwargs)



def _run_config(study: StudyConfig, name: str, setup: TrialSetup, totals: dict[str, int],
                console: Console) -> ray.tune.RunConfig:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # --workers 0: Tune restarts a crashed trial (what Ray Train does for a Train run, whose
    # trial must then never be retried by Tune itself).
    retries = study.max_failures if setup.resources.in_trial else 0
    return ray.tune.RunConfig(
        name=name, **ray_storage(join(study.study_dir, TUNE_DIR)),
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), StudyRecorder(setup)] + (
            [] if console.verbose else
            [StudyProgress(totals, study.epochs, console.concurrency)]),
        failure_config=ray.tune.FailureConfig(max_failures=retries),
        # Tune uploads its experiment state (what `--resume` restores: which trials finished)
        # at most every `sync_period`, 300 s by default: a replacement head resuming from the
        # bucket would rerun the trials of the last five minutes. The state is a few kB.
        sync_config=ray.tune.SyncConfig(sync_period=EXPERIMENT_SYNC_S),
        verbose=1 if console.verbose else 0)


def _fit(study: StudyConfig, name: str, setup: TrialSetup, fresh) -> float:
    """Run experiment `name`, restoring it when a previous run of the study left it behind
    (finished trials are not repeated; unfinished ones resume from their checkpoints).
    Returns the seconds its evaluation jobs took (each by its own clock)."""
    # Tune's own TensorBoard logger would put a second set of event files in the study;
    # fgray writes TensorBoard itself (STUDY_DIR/tensorboard).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # An evaluation job reports its time, not the searched metric, which Tune would refuse.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    fs, path = resolve(join(study.study_dir, TUNE_DIR, name))
    if Tuner.can_restore(path, storage_filesystem=fs):
        tuner = Tuner.restore(path, trainable=_trainable(setup), resume_unfinished=True,
                              resume_errored=False, restart_errored=False,
                              storage_filesystem=fs)
    else:
        tuner = fresh()
    grid = tuner.fit()
    return sum(float(r.metrics.get("evaluation_s") or 0.0) for r in grid
               if r.metrics and r.config and not Job.of(r.config).trains)




def search(study: StudyConfig, resources: WorkerResources, concurrency: int,
           console: Console | None = None, epoch_hooks: tuple[EpochHookSpec, ...] = ()
           ) -> float:
    """The study's search: every method's TPE search over its define-by-run space with ASHA
    on val kNN top-1, then the retrains of each method's best, as one Tune experiment."""
    setup = TrialSetup(study, resources, epoch_hooks=epoch_hooks)

    def fresh() -> Tuner:
        searcher = StudySearcher(study)
        return Tuner(_trainable(setup),
                     tune_config=_tune_config(search_alg=searcher,
                                              scheduler=MethodScheduler(study),
                                              num_samples=searcher.total,
                                              max_concurrent_trials=concurrency),
                     run_config=_run_config(study, SEARCH, setup, searcher.totals(),
                                            console or Console(concurrency=concurrency)))

    return _fit(study, SEARCH, setup, fresh)


def run_jobs(study: StudyConfig, name: str, jobs: list[Job], resources: WorkerResources,
             concurrency: int, console: Console | None = None,
             epoch_hooks: tuple[EpochHookSpec, ...] = ()) -> float:
    """Fixed jobs (runs with their `method` and `seed`, or evaluations), no search, no
    stopping, as experiment `name`. Returns the seconds its evaluation jobs took."""
    if not jobs:
        return 0.0
    setup = TrialSetup(study, resources, epoch_hooks=epoch_hooks)

    def fresh() -> Tuner:
        totals = dict(Counter(j.method for j in jobs if j.trains))
        return Tuner(_trainable(setup),
                     param_space={JOB: ray.tune.grid_search([j.config()[JOB] for j in jobs])},
                     tune_config=_tune_config(max_concurrent_trials=concurrency),
                     run_config=_run_config(study, name, setup, totals,
                                            console or Console(concurrency=concurrency)))

    return _fit(study, name, setup, fresh)


def evaluation_experiment(jobs: list[Job]) -> str:
    """The name of the experiment that runs evaluation `jobs` after the others: named after
    what it tests, so a resume that owes the same jobs restores it (nothing is tested
    twice) and one that owes others starts its own."""
    targets = ",".join(sorted(f"{j.method}/{j.target}" for j in jobs))
    return f"evaluate-{zlib.crc32(targets.encode()):08x}"
