"""The study driver: load or prepare a study, check it against its data, run its
experiments (`run_study`) and sum up what it cost (`StudySummary`). See the package
docstring for what runs."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fgray.errors import UserError
from fgray.storage import join, read_text, write_text
from fgray.train.cluster import ClusterResources
from fgray.train.hooks import EpochHookSpec
from fgray.train.resources import WorkerResources, resolve_resources
from fgray.tune.journal import Journal
from fgray.tune.study.config import STUDY_FILE, StudyConfig
from fgray.tune.study.console import Console
from fgray.tune.study.evaluation import evaluation_jobs
from fgray.tune.study.experiment import evaluation_experiment, run_jobs, search
from fgray.tune.study.jobs import Job, JobKind, TrialSetup, recipe
from fgray.tune.study.ledger import (
    best_trials,
    close_lost_trials,
    latest_rows,
    more_seed_points,
    restore_history,
    same_config,
)

MORE_SEEDS = "more-seeds"  # the experiment that adds seeds to the finalists


def concurrency_for(resources: WorkerResources, cluster: ClusterResources,
                    override: int | None = None) -> int:
    """How many trials the cluster runs at once: its CPUs (and GPUs) over one trial's."""
    if override:
        return override
    fits = math.floor(cluster.cpus / resources.cpus + 1e-9)
    if resources.gpus > 0:
        fits = min(fits, math.floor(cluster.gpus / resources.gpus + 1e-9))
    if fits < 1:
        raise UserError(f"one trial needs {resources.cpus:g} CPUs and {resources.gpus:g} GPUs "
                        f"but the cluster has {cluster.cpus:g} CPUs and {cluster.gpus:g} GPUs: "
                        "expected fewer --workers or fewer CPUs/GPUs per worker (on an "
                        "autoscaling cluster, pass --concurrency N)")
    return fits


def load_study(study_dir: str) -> StudyConfig:
    """The study stored at `study_dir` (what `--resume` continues)."""
    stored = read_text(join(study_dir, STUDY_FILE))
    if stored is None:
        raise UserError(f"--resume: no study at {study_dir} (no {STUDY_FILE}); expected the "
                        "--storage and --name of an interrupted study")
    return StudyConfig.from_json(stored)


def prepare(study: StudyConfig) -> None:
    """Validate a new study before any trial runs and store it as STUDY_DIR/study.json."""
    if read_text(join(study.study_dir, STUDY_FILE)) is not None:
        raise UserError(f"a study already exists at {study.study_dir}: pass --resume to "
                        "continue it, or a new --name")
    for method in study.methods:
        space = study.space(method, validate=True)  # a typo fails before any trial
        TrialSetup(study, WorkerResources()).spec_for(recipe(method))
        knobs = space.knob_names()
        for point in study.points.get(method, []):
            unknown = sorted(set(point) - knobs)
            if unknown:
                raise UserError(f"point {point} for {method}: {unknown[0]!r} is not a knob of "
                                f"its search space: expected some of {', '.join(sorted(knobs))}")
    check_data(study)
    write_text(join(study.study_dir, STUDY_FILE), study.to_json())


def check_data(study: StudyConfig) -> None:
    """The study's settings against its data, before any trial starts (a batch larger than
    the train split would otherwise fail every trial). Skipped when the data is not on this
    machine: on a cluster it may be staged to the workers' disks only."""
    from fgray.data.formats import load_dataset

    data = study.data_spec
    if "://" in data.root or not Path(data.root).exists():
        return
    ds = load_dataset(data.format, data.root, val_fraction=data.val_fraction,
                      seed=data.split_seed, aircraft_level=data.aircraft_level)
    train = len(ds.split("train"))
    if study.batch_size > train:
        raise UserError(f"--batch-size {study.batch_size} exceeds the train split of "
                        f"{data.root} ({train} images after the validation split): expected "
                        f"at most {train}")
    if not ds.split("val"):
        raise UserError(f"{data.root}: the validation split is empty (val fraction "
                        f"{data.val_fraction:g}); trials select on val kNN: expected a larger "
                        "--val-fraction or more train images per class")


@dataclass
class StudySummary:
    study_dir: str
    wall_time_s: float
    trial_time_s: float  # Σ the trials' wall times (each from its start to its end)
    evaluation_time_s: float  # Σ the test evaluation jobs' wall times
    trials: int
    concurrency: int
    stopped: int
    failed: int

    @property
    def ideal_s(self) -> float:
        """The study's work -- its trials and its test evaluations -- spread over the
        concurrent slots: its wall time with no start-up, no gaps and no idle slot."""
        return (self.trial_time_s + self.evaluation_time_s) / max(self.concurrency, 1)

    @property
    def overhead_ratio(self) -> float:
        """Study wall time over the ideal (`ideal_s`)."""
        return self.wall_time_s / self.ideal_s if self.ideal_s > 0 else float("nan")


def run_study(study: StudyConfig, *, resume: bool = False, verbose: bool = True,
              epoch_hooks: tuple[EpochHookSpec, ...] = (), more_seeds: int = 0
              ) -> StudySummary:
    """Run a new study, or continue `study` (from `load_study`) with `resume=True`, on the
    connected Ray cluster; see the module docstring. `epoch_hooks` are called by every
    trial's ranks after each epoch (`fgray.train.trainer`). `more_seeds` (a search study):
    once the search is done, retrain each method's best configuration with that many more
    seeds (`more_seed_points`) and test them, so a comparison the first seeds could not
    resolve gets more evidence without searching again."""
    import optuna

    from fgray.results.tensorboard import write_hparams

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    if resume:
        restore_history(study)
    else:
        prepare(study)
    cluster = ClusterResources.current()
    resources = resolve_resources(study.workers, cpus_per_worker=study.cpus_per_worker,
                                  gpus_per_worker=study.gpus_per_worker,
                                  cluster_gpus=cluster.gpus)
    concurrency = concurrency_for(resources, cluster, study.concurrency)
    share = (f"{resources.cpus_per_worker:g} CPU"
             f"{f' + {resources.gpus_per_worker:g} GPU' if resources.use_gpu else ''}")
    how = (f"each in its own process with {share}" if resources.in_trial
           else f"each a Ray Train run of {resources.workers} worker(s) x {share}")
    print(f"study {study.name}: {study.study_dir}  ({concurrency} trials at a time, {how})",
          flush=True)
    console = Console(verbose=verbose, concurrency=concurrency)
    if not verbose:
        # Tune's newer console output prints each experiment's configuration box whatever its
        # verbosity; the classic reporter honours verbose=0 (StudyProgress speaks instead).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if study.mode == "search":
        evaluation_s = search(study, resources, concurrency, console, epoch_hooks)
        best = best_trials(study.study_dir, study.methods)
        if more_seeds > 0:
            points = more_seed_points(study, best, latest_rows(study.study_dir), more_seeds)
            evaluation_s += run_jobs(study, MORE_SEEDS, points, resources, concurrency,
                                     console, epoch_hooks)
        chosen = best + same_config(study.study_dir, best)
    else:
        points = [Job(JobKind.POINT, m, seed=study.seed + k)
                  for m in study.methods for k in range(study.seeds)]
        evaluation_s = run_jobs(study, "compare", points, resources, concurrency, console,
                                epoch_hooks)
        chosen = [r for r in latest_rows(study.study_dir) if r.get("status") == "completed"
                  and r["method"] in study.methods]
    # What no experiment tested yet (a compare study's runs, a --more-seeds retrain, what a
    # resumed study's search left), by the same jobs as the search's own evaluations.
    owed = evaluation_jobs(study, chosen)
    evaluation_s += run_jobs(study, evaluation_experiment(owed), owed, resources,
                             concurrency, console)
    close_lost_trials(study)
    rows = latest_rows(study.study_dir)
    write_hparams(study.study_dir, rows)
    Journal(study.study_dir).upload()
    ran = [r for r in rows if r.get("status") != "running" and r["method"] in study.methods]
    return StudySummary(
        study_dir=study.study_dir, wall_time_s=time.time() - start,
        trial_time_s=sum(float(r.get("wall_time_s") or 0.0) for r in ran
                         if r.get("start_time") and r["start_time"].timestamp() >= start),
        evaluation_time_s=evaluation_s, trials=len(ran), concurrency=concurrency,
        stopped=sum(r.get("status") == "stopped" for r in ran),
        failed=sum(r.get("status") == "failed" for r in ran))

