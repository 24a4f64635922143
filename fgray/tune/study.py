"""The study driver: Ray Tune trials, each training one configuration -- in the trial's own
process (`--workers 0`) or as a Ray Train run (`--workers N`).

A study lives in one folder, STUDY_DIR = STORAGE/NAME (a local path, or s3:// / gs://):

    study.json            the study's settings (what `--resume` continues)
    tune/<experiment>/    Ray Tune's experiment state (Tuner.restore reads it)
    train/<trial_id>/     each trial's run: checkpoints (epoch-XXXX/), ranks/, and for a Ray
                          Train run Ray's state
    optuna/journal.log    the Optuna studies (JournalStorage; optuna-dashboard opens it)
    tables/{trials,epochs,evals}/  Parquet results;  tensorboard/  scalars and HParams

Search (`mode="search"`): one Tune experiment (`tune/search/`) for the whole study, fed by
`StudySearcher`: one Optuna study per method (its own conditional knobs from
fgray.tune.spaces, its own seeded TPE model, the paper's recipe as its first trial) and one
set of ASHA rungs per method (`MethodScheduler`, on per-epoch val kNN top-1; TPE learns from
each trial's best val kNN top-1 so far), so methods whose losses and learning curves differ
never compete inside one model or bracket, and the leaderboard's "best config per method" is
the best of that method's search. Search trials are asked method by method; when a method's
search ends, its best configuration is retrained over the extra seeds while the next
methods' trials fill the other slots, and each final model (the best trial, each retrain, the
initial weights) is evaluated on test by a job of the same experiment (`evaluate_job`).
Work goes out longest first -- search trials, retrains, then the short evaluations, which
fill the slots the last retrains leave free. One experiment means one Tune start-up and one
import of torch per trial process (`reuse_actors`), and no slot idles between methods.

Compare (`mode="compare"`): every method x seed at a fixed budget with the recipe defaults,
one experiment, no search and no early stopping.

Two ways to run a trial, one loop (`fgray.train.trainer.worker_loop`) and one way of reporting
and checkpointing (a per-epoch report with its checkpoint, best k by val kNN plus the latest
kept, the epoch recorded before it is reported):

- `--workers 0` (the smoke and laptop presets): the trial runs the engine loop itself and
  reserves one worker's CPUs / GPU share; no worker group, no TorchTrainer, so a trial costs
  what its epochs cost plus about a second. Tune reuses trial actors (`reuse_actors`: a
  trial builds all its state -- seeded weights, optimiser, data stream -- from its spec, so
  nothing leaks from one trial to the next but the warm imports and the decoded caches).
  Tune's FailureConfig restarts a crashed trial, which resumes from its latest checkpoint.
- `--workers N` (the paper preset): the trial is only a driver for its Ray Train run (DDP over
  N workers): it asks for no CPU (a little memory so Ray can place it), and Ray Train's
  FailureConfig restarts a dead worker group from its latest checkpoint.

`max_concurrent_trials` is what the cluster's CPUs / GPUs fit of one trial's share (fractional
GPUs allowed, e.g. 0.5 for two small-backbone trials per GPU). A trial that fails -- a
non-finite loss or a user error (never retried: it would fail again), a crash past the
retries -- is recorded as failed with its error and the study goes on. The best trial of each
method (by val kNN top-1, as the leaderboard ranks it) and its retrains are evaluated once on
test with their best checkpoints, and the results are recorded in the tables (`evals`, and
`test_*` on the trial's row). The initial weights are evaluated once too, with the same
protocols on the same splits, as the `init` row (one per distinct backbone and init when
methods differ: `init:<backbone>`). A compare study evaluates its runs after its experiment,
as Ray tasks; so does a resumed study whatever its experiment left unevaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import ray.tune
from ray.tune import Callback, PlacementGroupFactory, Tuner
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from fgray.engine.selection import BEST_METRIC, SELECTION_METRIC, Best, best_of
from fgray.engine.spec import DataSpec, RunSpec, build_spec
from fgray.errors import UserError
from fgray.results.records import (
    EpochRecorder,
    latest_trial_row,
    record_init,
    record_test,
    trial_history,
    weights_name,
)
from fgray.storage import join, local_copy, read_text, resolve, write_text
from fgray.train.checkpoints import best_checkpoint_dir
from fgray.train.cluster import ClusterResources, ray_storage
from fgray.train.hooks import EpochHookSpec
from fgray.train.resources import WorkerResources, resolve_resources
from fgray.train.trainer import build_trainer, run_in_trial, run_trainer
from fgray.tune.actor_memory import release_memory
from fgray.tune.journal import Journal
from fgray.tune.spaces import Space, space_for

STUDY_FILE = "study.json"
TUNE_DIR, TRAIN_DIR = "tune", "train"
SEARCH_METRIC = BEST_METRIC  # what TPE learns from: a trial's best val kNN top-1 so far
PROTOCOLS = ("retrieval", "knn", "linear", "localisation")
INIT = "init"  # the method name (and trial id) of the initial weights' row
POINT = "point"  # the config key of a fixed-point experiment's grid
EVALUATE = "evaluate"  # the config key of an evaluation job: the trial (or init row) to test


@dataclass
class StudyConfig:
    """Everything a study needs; stored as STUDY_DIR/study.json so `--resume` continues
    exactly the study that was started."""

    name: str
    storage: str
    data: dict[str, Any]  # DataSpec fields
    methods: list[str]
    mode: Literal["search", "compare"] = "search"
    trials: int = 4  # per method (search)
    epochs: int = 4
    batch_size: int = 32
    image_size: int = 32
    backbones: dict[str, str | None] = field(default_factory=dict)  # per method; None: default
    init: str = "random"
    # Per-method settings: `section.name` keys (method., optim., train., aug.), typed values.
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=lambda: ["lr"])  # shared knobs searched
    grace_period: int = 1
    reduction_factor: int = 2
    workers: int = 1  # Ray Train workers per trial; 0: the loop in the trial's own process
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    concurrency: int | None = None  # None: what the cluster fits
    seed: int = 0
    seeds: int = 1  # compare: seeds per method; search: seeds of the final test evaluation
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    max_failures: int = 1  # Ray Train worker-group restarts per trial
    keep_best: int = 2  # checkpoints kept per trial besides the latest
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra first points

    def __post_init__(self) -> None:
        if not self.methods:
            raise UserError("no methods to study: expected --methods with at least one")
        if self.mode not in ("search", "compare"):
            raise UserError(f"study mode {self.mode!r}: expected search or compare")
        for name, value, low in (("--trials", self.trials, 1), ("--epochs", self.epochs, 1),
                                 ("--grace-period", self.grace_period, 1),
                                 ("--reduction-factor", self.reduction_factor, 2),
                                 ("--seeds", self.seeds, 1), ("--workers", self.workers, 0)):
            if value < low:
                raise UserError(f"{name} {value}: expected {low} or more")
        if self.grace_period > self.epochs:
            raise UserError(f"--grace-period {self.grace_period} exceeds --epochs "
                            f"{self.epochs}: expected at most the epoch budget")
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError(f"--concurrency {self.concurrency}: expected 1 or more")
        unknown = sorted(set(self.protocols) - set(PROTOCOLS) - {"linear-paper"})
        if unknown:
            raise UserError(f"protocol {unknown[0]!r}: expected some of "
                            f"{', '.join(PROTOCOLS)}, linear-paper")

    @property
    def study_dir(self) -> str:
        return join(self.storage, self.name)

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(**self.data)

    def space(self, method: str, *, validate: bool = False) -> Space:
        # The backbone fixes family-dependent recipe values (MoCo v3's T: 0.2 ViT, 1.0 CNN).
        backbone = self.backbones.get(method)
        if validate:
            return space_for(method, shared=self.shared, fixed=self.fixed.get(method, {}),
                             backbone=backbone)
        return Space(method, tuple(self.shared), tuple(sorted(self.fixed.get(method, {}).items())),
                     backbone)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudyConfig:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------- one trial


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one experiment shares; the trial's own config is its sampled
    parameters (plus `method` and `seed` in a compare / final-seed experiment)."""

    study: StudyConfig
    resources: WorkerResources
    method: str | None = None
    # Called by every rank after each epoch (`fgray.train.trainer`'s epoch hooks): given
    # per invocation of the study (`--epoch-hook`), not stored with it.
    epoch_hooks: tuple[EpochHookSpec, ...] = ()

    @staticmethod
    def point(config: dict[str, Any]) -> dict[str, Any]:
        """The trial's parameters: a fixed-point experiment grids over whole points."""
        return dict(config.get(POINT, config))

    @staticmethod
    def is_evaluation(config: dict[str, Any]) -> bool:
        """Whether a trial's config is a test evaluation job (`evaluate_job`), not a run."""
        return EVALUATE in TrialSetup.point(config)

    def method_of(self, config: dict[str, Any]) -> str:
        return self.point(config).get("method") or self.method

    def params_of(self, config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in self.point(config).items() if k != "method"}

    def spec_for(self, config: dict[str, Any]) -> RunSpec:
        method = self.method_of(config)
        config = self.point(config)
        knobs = {k: v for k, v in config.items() if k not in ("method", "seed")}
        sets = {**self.study.fixed.get(method, {}), **self.study.space(method).settings(knobs)}
        train = {"epochs": self.study.epochs, "batch_size": self.study.batch_size,
                 "image_size": self.study.image_size,
                 "seed": int(config.get("seed", self.study.seed)),
                 "eval_every": 1}  # ASHA and TPE read val kNN top-1 every epoch
        return build_spec(method, self.study.data_spec, backbone=self.study.backbones.get(method),
                          init=self.study.init, train=train, sets=sets)

    def recorder(self, trial_id: str, config: dict[str, Any], spec: RunSpec,
                 start_time: float | None = None) -> EpochRecorder:
        return EpochRecorder(self.study.study_dir, trial_id, spec, study=self.study.name,
                             params=self.params_of(config), cpus=self.resources.cpus,
                             gpus=self.resources.gpus, start_time=start_time)


def train_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune trial. `--workers 0`: run the engine loop here, reporting to Tune. Otherwise
    launch the Train run of this configuration, named after the trial so a restored trial
    resumes its run; results reach Tune through TuneReportCallback.

    The actor runs trial after trial (`reuse_actors`): what each job freed goes back to the
    system when it ends (`fgray.tune.actor_memory`; without it an actor grew to 9.5 GB over
    the README's main job)."""
    try:
        _run_job(config, setup)
    finally:
        release_memory()


def _run_job(config: dict[str, Any], setup: TrialSetup) -> None:
    if setup.is_evaluation(config):
        evaluate_job(setup.point(config), setup)
        return
    trial_id = ray.tune.get_context().get_trial_id()
    known = latest_trial_row(setup.study.study_dir, setup.method_of(config), trial_id)
    if known is not None and known.get("status") in ("completed", "stopped"):
        # It ended just before its driver was killed, after the last snapshot of the
        # experiment: the restored experiment only closes it, nothing is trained again.
        return
    if known is not None and known.get("status") == "failed":
        raise RuntimeError(known.get("error") or "failed before the study was resumed")
    spec = setup.spec_for(config)
    recorder = setup.recorder(trial_id, config, spec)
    if setup.resources.in_trial:
        run_in_trial(spec, run_uri=join(setup.study.study_dir, TRAIN_DIR, trial_id),
                     resources=setup.resources, recorder=recorder,
                     keep_best=setup.study.keep_best, epoch_hooks=setup.epoch_hooks)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(spec, name=trial_id, storage=join(setup.study.study_dir, TRAIN_DIR),
                            resources=setup.resources, recorder=recorder,
                            callbacks=[TuneReportCallback()],
                            max_failures=setup.study.max_failures,
                            keep_best=setup.study.keep_best, epoch_hooks=setup.epoch_hooks)
    run_trainer(trainer)


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

    def _start_time(self, trial) -> float:
        if trial.trial_id not in self._start:
            setup = self.trial_setup
            row = latest_trial_row(setup.study.study_dir, setup.method_of(trial.config),
                                   trial.trial_id)
            self._start[trial.trial_id] = (row["start_time"].timestamp()
                                           if row and row.get("start_time") else time.time())
        return self._start[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if TrialSetup.is_evaluation(trial.config):
            return  # an evaluation job records its own rows
        method = self.trial_setup.method_of(trial.config)
        known = latest_trial_row(self.trial_setup.study.study_dir, method, trial.trial_id)
        start = self._start_time(trial)
        if known is None:
            setup = self.trial_setup
            spec = setup.spec_for(trial.config)
            setup.recorder(trial.trial_id, trial.config, spec, start).finish([], "running")

    def _finish(self, trial, status: str, error: str | None = None) -> None:
        if TrialSetup.is_evaluation(trial.config):
            return
        setup = self.trial_setup
        method = setup.method_of(trial.config)
        spec = setup.spec_for(trial.config)
        history = trial_history(setup.study.study_dir, method, trial.trial_id)
        if status == "completed" and (not history or history[-1]["epoch"] < spec.train.epochs):
            status = "stopped"  # ended by the scheduler before its epoch budget
        known = latest_trial_row(setup.study.study_dir, method, trial.trial_id)
        ran = history[-1]["epoch"] if history else 0
        if known and known.get("status") in ("completed", "stopped") and status == "failed":
            # A trial that finished before its driver was killed failed to be closed again
            # by the restored experiment (e.g. Tune could not restore it): it stays finished.
            return
        if known and known.get("status") == status and known.get("epochs_run") == ran:
            # A trial that finished just before its driver was killed is finished again by
            # the restored experiment (its Train run resumes at its end): nothing new.
            return
        recorder = setup.recorder(trial.trial_id, trial.config, spec, self._start_time(trial))
        recorder.finish(history, status, error=error)
        Journal(setup.study.study_dir).upload()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "completed")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        # The driver's copy of the error file; the one in storage is synced later.
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local and local.is_file() else trial.get_error()
        self._finish(trial, "failed", error=error_line(text))


# ---------------------------------------------------------------- experiments


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


def _trainable(setup: TrialSetup):
    resources = setup.resources

    def reserve(config: dict[str, Any]) -> PlacementGroupFactory:
        # An evaluation job runs in the trial's own process, with one worker's share (the
        # same as a `--workers 0` trial, so Tune reuses the actor for it).
        wants = ({"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
                 if TrialSetup.is_evaluation(config) else resources.trial_resources())
        return PlacementGroupFactory([{k.upper() if k in ("cpu", "gpu") else k: v
                                       for k, v in wants.items() if v or k == "cpu"}])

    return ray.tune.with_resources(ray.tune.with_parameters(train_trial, setup=setup), reserve)


def trial_dirname(trial) -> str:
    """A Tune trial's folder is named after its id (`tune/<experiment>/<trial_id>/`)."""
    return trial.trial_id


def _tune_config(study: StudyConfig, setup: TrialSetup, **kwargs) -> ray.tune.TuneConfig:
    # Reusing a trial's actor saves a process start and the imports (seconds per trial);
    # a trial that drives a Train run holds no state worth keeping.
    return ray.tune.TuneConfig(trial_dirname_creator=trial_dirname,
                               reuse_actors=setup.resources.in_trial, **kwargs)


class StudyProgress(Callback):
    """What the study prints for a person: one line per trial event, labelled with the
    trial's method, with that method's trials started / completed / stopped / failed, its best
    val kNN top-1 so far and the study's ETA -- a tqdm bar over all the study's trials where a
    terminal is attached, plain lines otherwise. Ray's own reporting goes to the study's log
    file instead (`--verbose` shows it live).

    The ETA spreads the work left over the concurrent slots: the mean duration of the trials
    finished so far for each trial not started, and what that mean leaves of each running
    trial. Without a terminal, an epoch's report also prints the line when none was printed
    for `heartbeat_s` seconds, so the ETA keeps moving between trial events.

    tqdm: the progress bar every Python user knows, with rate and ETA handling and a clean
    fallback when output is not a terminal -- not worth writing by hand."""

    def __init__(self, totals: dict[str, int], epochs: int, concurrency: int,
                 stream=None, heartbeat_s: float = 30.0) -> None:
        import sys

        self.heartbeat_s, self.printed = heartbeat_s, time.monotonic()
        self.totals, self.epochs = dict(totals), epochs
        self.concurrency = max(concurrency, 1)
        self.stream = stream or sys.stdout
        self.started: dict[str, tuple[str, float]] = {}  # trial id -> (method, start time)
        self.ended: set[str] = set()
        self.durations: list[float] = []
        # per method: trials completed / stopped / failed (a method not in `totals`, e.g. the
        # init row's evaluation job, gets its counters when first seen)
        self.counts: dict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(("completed", "stopped", "failed"), 0))
        self.best: dict[str, Best] = {}  # per method, of val kNN top-1
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(totals.values()), desc="study", unit="trial",
                            file=self.stream, dynamic_ncols=True, leave=True)

    @staticmethod
    def group(trial) -> str:
        return TrialSetup.point(trial.config).get("method", "?")

    def _eta(self, now: float) -> str:
        left = sum(self.totals.values()) - sum(sum(c.values()) for c in self.counts.values())
        if left <= 0 or not self.durations:
            return "-"
        mean = sum(self.durations) / len(self.durations)
        running = [now - t for tid, (_, t) in self.started.items() if tid not in self.ended]
        work = mean * max(left - len(running), 0) + sum(max(mean - e, 0.0) for e in running)
        return f"{work / self.concurrency:.0f} s"

    def _status(self, method: str) -> str:
        c = self.counts[method]
        best = self.best.get(method)
        shown = f"{best.value:.1f}" if best is not None and best.value is not None else "-"
        started = sum(m == method for m, _ in self.started.values())
        return (f"{started} of {self.totals.get(method, 0)} started, {c['completed']} "
                f"completed, {c['stopped']} stopped, {c['failed']} failed; best val kNN "
                f"{shown}; ETA {self._eta(time.time())}")

    def _show(self, method: str, event: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{method}: {self._status(method)}", refresh=True)
        else:
            print(f"[{method}] {event}: {self._status(method)}", file=self.stream, flush=True)
            self.printed = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if TrialSetup.is_evaluation(trial.config):
            return  # a test evaluation job: one line when it ends
        self.started.setdefault(trial.trial_id, (self.group(trial), time.time()))
        self._show(self.group(trial), f"trial {trial.trial_id} started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        method = self.group(trial)
        self.best.setdefault(method, Best(SELECTION_METRIC)).update(result)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{method}: {self._status(method)}", refresh=True)
        elif (time.monotonic() - self.printed >= self.heartbeat_s
              and not TrialSetup.is_evaluation(trial.config) and "epoch" in result):
            self._show(method, f"trial {trial.trial_id} epoch {int(result['epoch'])}")

    def _end(self, trial, status: str) -> None:
        method, job = self.group(trial), TrialSetup.point(trial.config)
        if EVALUATE in job:
            what = "initial weights" if job[EVALUATE] == INIT else f"trial {job[EVALUATE]}"
            took = (trial.last_result or {}).get("evaluation_s")
            line = (f"[{method}] test evaluation of the {what} "
                    f"{'failed' if status == 'failed' else 'done'}"
                    f"{f' in {took:.0f} s' if took is not None else ''}")
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, file=self.stream, flush=True)
            return
        if trial.trial_id in self.started and trial.trial_id not in self.ended:
            self.durations.append(time.time() - self.started[trial.trial_id][1])
        self.ended.add(trial.trial_id)
        self.counts[method][status] += 1
        if self.bar is not None:
            self.bar.update(1)
        self._show(method, f"trial {trial.trial_id} {status}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        ran = int((trial.last_result or {}).get("epoch", 0))
        self._end(trial, "completed" if ran >= self.epochs else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "failed")

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Console:
    """How a study talks: `verbose` shows Ray Tune's own tables and the workers' output;
    otherwise a `StudyProgress` and Ray's output in the log file."""

    verbose: bool = False
    concurrency: int = 1


EXPERIMENT_SYNC_S = 5


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
               if r.metrics and TrialSetup.is_evaluation(r.config or {}))


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose restore also mends what a killed driver left in the journal.

    The journal is written as trials are asked and told, Tune's snapshot of the searcher only
    every so often: an Optuna trial asked after the last snapshot belongs to no Tune trial
    after a restore and would stay RUNNING forever, and when it was an enqueued point (the
    recipe, a --points entry) that configuration would never run. Such orphans are marked
    failed and their enqueued points enqueued again. A trial told (finished) after the last
    snapshot counts as completed here too: Tune may still close it again, which Optuna
    would refuse.
    """

    def __init__(self, *args, study_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.study_dir = study_dir

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.resumed()

    def resumed(self) -> None:
        """After Tune restored this searcher's state: reopen the journal, then mend it."""
        import optuna

        # The snapshot pickles the Optuna study with its storage: the journal's local copy
        # *of the driver that took it*, under that machine's FGRAY_CACHE. A driver resuming
        # on another head (or with another cache) reopens the study in its own copy, which
        # `Journal` brought down from the study folder: it is the one uploaded from now on.
        self._storage = Journal(self.study_dir).storage()
        self._ot_study = optuna.load_study(study_name=self._ot_study.study_name,
                                           storage=self._storage,
                                           sampler=self._ot_study.sampler)
        # The snapshot's Optuna trials hold the old copy too: a resumed trial's reports (and
        # its tell) go to this driver's copy, whose state may be older than the old one's.
        for trial in self._ot_trials.values():
            trial.study, trial.storage = self._ot_study, self._storage
        self.mend()

    def mend(self) -> None:
        """Reconcile the restored state with the journal (see the class docstring)."""
        import optuna

        finished = {t.number for t in self._ot_study.get_trials(deepcopy=False)
                    if t.state.is_finished()}
        self._completed_trials.update(trial_id for trial_id, t in self._ot_trials.items()
                                      if t.number in finished)
        tracked = {t.number for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.RUNNING,))
        for orphan in (t for t in running if t.number not in tracked):
            fixed = orphan.system_attrs.get("fixed_params")
            self._ot_study.tell(orphan.number, state=optuna.trial.TrialState.FAIL)
            if fixed:
                self._ot_study.enqueue_trial(fixed)


def make_searcher(study: StudyConfig, method: str):
    """OptunaSearch over the method's define-by-run space: a seeded TPE sampler, the paper's
    recipe as the first point, the study stored in the journal (named after the method)."""
    import optuna

    space = study.space(method)
    storage = Journal(study.study_dir).storage()
    record = optuna.create_study(study_name=method, storage=storage, direction="maximize",
                                 load_if_exists=True)
    record.set_user_attr("method", method)
    record.set_user_attr("metric", SEARCH_METRIC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=study.seed + zlib.crc32(method.encode()) % 10_000, multivariate=True,
            group=True)  # group: the conditional branches get their own models
    points = [space.defaults(), *study.points.get(method, [])]
    return ResumableOptunaSearch(space=space, metric=SEARCH_METRIC, mode="max",
                                 points_to_evaluate=points, sampler=sampler,
                                 study_name=method, storage=storage,
                                 study_dir=study.study_dir)


def make_scheduler(study: StudyConfig):
    """ASHA on per-epoch val kNN top-1 (one bracket), for one method's search trials."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=SELECTION_METRIC, mode="max",
                         max_t=study.epochs, grace_period=study.grace_period,
                         reduction_factor=study.reduction_factor,
                         stop_last_trials=False)  # a full run ends by itself


class StudySearcher(Searcher):
    """Every method's search and the retrains of each method's best configuration, as one
    stream of trials for one Tune experiment -- so the study pays Tune's start-up and its
    trial actors' imports once, and a method's last trials never leave the cluster idle: the
    next method's trials fill the slots they free.

    Each method keeps its own Optuna study and TPE model (`make_searcher`: its own
    define-by-run space, the paper's recipe first), so methods whose losses and learning
    curves differ never share a model; `MethodScheduler` gives each its own ASHA rungs.
    Search trials are asked method by method in the study's order (a method's TPE sees its
    earlier trials, as in a search of its own). Once every search trial of a method has ended,
    its best trial -- read from the trials table, as the leaderboard ranks it -- is retrained
    with seeds `seed + 1 ... seed + seeds - 1`. A suggested config is `{"method": m,
    **params}` (a retrain adds `"seed"`).

    The test evaluations are jobs of the same experiment (`{"method": m, "evaluate": id}`,
    see `evaluate_job`), queued as each model becomes final -- the initial weights at once,
    the best search trial when its method's search ends, a retrain when it completes -- and
    run in the trials' warm processes. Work is handed out longest first (search trials, then
    retrains, then evaluations), so the short evaluations fill the slots that the last
    retrains leave free. The test split is evaluated once per final model and never for a
    trial that is not one."""

    def __init__(self, study: StudyConfig) -> None:
        super().__init__(metric=SEARCH_METRIC, mode="max")
        self.study = study
        self.searches = {m: make_searcher(study, m) for m in study.methods}
        self.search_trials: dict[str, str] = {}  # trial id -> method, of the search trials
        self.ended = dict.fromkeys(study.methods, 0)  # search trials ended (any status)
        self.retrains: list[dict[str, Any]] = []  # asked for, not yet given to a trial
        self.retrained: set[str] = set()  # methods whose retrains were queued
        self.training: dict[str, dict[str, Any]] = {}  # retrains given a trial, not ended
        self.inits = list(init_targets(study))
        self.jobs: list[dict[str, Any]] = [{"method": name, EVALUATE: INIT}
                                           for name in self.inits]

    @property
    def total(self) -> int:
        """Trials and jobs this searcher asks for at most (fewer when a method has no best
        trial or a retrain fails)."""
        per_method = self.study.trials + 2 * self.study.seeds - 1
        return len(self.study.methods) * per_method + len(self.inits)

    def totals(self) -> dict[str, int]:
        return dict.fromkeys(self.study.methods, self.study.trials + self.study.seeds - 1)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the metric, mode and spaces are the study's, set at construction

    def _queue_retrains(self) -> None:
        for method in self.study.methods:
            if method in self.retrained or self.ended[method] < self.study.trials:
                continue
            self.retrained.add(method)
            best = best_trials(self.study.study_dir, [method])
            if not best:
                continue  # every trial of the method failed
            self.jobs.append({"method": method, EVALUATE: best[0]["trial_id"],
                              "seed": int(best[0].get("seed") or 0), "project": True})
            params = _searched(best[0])
            self.retrains += [{"method": method, "seed": self.study.seed + k, **params}
                              for k in range(1, self.study.seeds)]

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        # Longest work first: every search trial, then the retrains (which wait on their
        # method's whole search), then the short test evaluations -- which fill the slots
        # the last retrains leave free, so no slot idles and no warm trial process is
        # dropped for want of work while something else still trains.
        self._queue_retrains()
        asked = Counter(self.search_trials.values())
        for method in self.study.methods:
            if asked[method] < self.study.trials:
                params = self.searches[method].suggest(trial_id)
                if params is None:
                    break  # Optuna cannot suggest now: give other work instead
                self.search_trials[trial_id] = method
                return {"method": method, **params}
        if self.retrains:
            self.training[trial_id] = self.retrains.pop(0)
            return self.training[trial_id]
        if self.jobs:
            return self.jobs.pop(0)
        if len(self.retrained) == len(self.study.methods) and not self.training:
            return Searcher.FINISHED
        return None  # a search or a retrain still runs; what comes after it is not known yet

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.search_trials:
            self.searches[self.search_trials[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        retrain = self.training.pop(trial_id, None)
        if retrain is not None and not error:
            self.jobs.append({"method": retrain["method"], EVALUATE: trial_id,
                              "seed": retrain["seed"]})
        method = self.search_trials.get(trial_id)
        if method is None:
            return
        self.searches[method].on_trial_complete(trial_id, result, error)
        self.ended[method] += 1

    def save(self, checkpoint_path: str) -> None:
        import pickle

        state = {k: v for k, v in self.__dict__.items() if k != "searches"}
        state["searches"] = {m: s.__dict__.copy() for m, s in self.searches.items()}
        with open(checkpoint_path, "wb") as out:
            pickle.dump(state, out)
        # The journal's copy in the study folder is brought up to date with the snapshot:
        # a snapshot never names an Optuna trial the stored journal lacks (the journal is
        # otherwise uploaded only when a trial finishes, and Tune snapshots after asking).
        for search in self.searches.values():
            Journal(search.study_dir).upload()
            break

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as src:
            state = pickle.load(src)
        searches = state.pop("searches")
        self.__dict__.update(state)
        for method, saved in searches.items():
            self.searches[method].__dict__.update(saved)
            self.searches[method].resumed()


class MethodScheduler(FIFOScheduler):
    """ASHA per method: each method's search trials get their own rungs (its learning curves
    are compared with its own); the retrains of a best configuration run their full budget."""

    def __init__(self, study: StudyConfig) -> None:
        super().__init__()
        self.study = study
        self.asha: dict[str, TrialScheduler] = {}

    def _of(self, trial) -> TrialScheduler | None:
        config = TrialSetup.point(trial.config)
        if "seed" in config or EVALUATE in config:  # a retrain is never stopped early
            return None
        if config["method"] not in self.asha:
            self.asha[config["method"]] = make_scheduler(self.study)
        return self.asha[config["method"]]

    def on_trial_add(self, tune_controller, trial) -> None:
        if (asha := self._of(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if (asha := self._of(trial)) is not None:
            return asha.on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if (asha := self._of(trial)) is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if (asha := self._of(trial)) is not None:
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        if (asha := self._of(trial)) is not None:
            asha.on_trial_remove(tune_controller, trial)


SEARCH = "search"  # the search experiment's name (tune/search/)


def search(study: StudyConfig, resources: WorkerResources, concurrency: int,
           console: Console | None = None, epoch_hooks: tuple[EpochHookSpec, ...] = ()
           ) -> float:
    """The study's search: every method's TPE search over its define-by-run space with ASHA
    on val kNN top-1, then the retrains of each method's best, as one Tune experiment."""
    setup = TrialSetup(study, resources, epoch_hooks=epoch_hooks)

    def fresh() -> Tuner:
        searcher = StudySearcher(study)
        return Tuner(_trainable(setup),
                     tune_config=_tune_config(study, setup, search_alg=searcher,
                                              scheduler=MethodScheduler(study),
                                              num_samples=searcher.total,
                                              max_concurrent_trials=concurrency),
                     run_config=_run_config(study, SEARCH, setup, searcher.totals(),
                                            console or Console(concurrency=concurrency)))

    return _fit(study, SEARCH, setup, fresh)


def run_points(study: StudyConfig, name: str, points: list[dict[str, Any]],
               resources: WorkerResources, concurrency: int,
               console: Console | None = None,
               epoch_hooks: tuple[EpochHookSpec, ...] = ()) -> None:
    """Fixed configurations (each with its `method` and `seed`), no search, no stopping."""
    if not points:
        return
    setup = TrialSetup(study, resources, epoch_hooks=epoch_hooks)

    def fresh() -> Tuner:
        return Tuner(_trainable(setup), param_space={POINT: ray.tune.grid_search(points)},
                     tune_config=_tune_config(study, setup, max_concurrent_trials=concurrency),
                     run_config=_run_config(study, name, setup,
                                            dict(Counter(p["method"] for p in points)),
                                            console or Console(concurrency=concurrency)))

    _fit(study, name, setup, fresh)


# ---------------------------------------------------------------- final test evaluation


def _evaluate_checkpoint(checkpoint: str, data: dict[str, Any], protocols: list[str],
                         seed: int, embeddings: tuple[str, str] | None = None,
                         outcomes: dict[str, Any] | None = None) -> dict[str, float]:
    """Runs as a Ray task with a trial's resources, next to the data like the trials. With
    `embeddings` = (study_dir, TensorBoard run), the test features also go to that run's
    embedding projector, written here so they never travel back to the driver. `outcomes`
    gets the per-image test outcomes (`evaluate_method`)."""
    from fgray.engine.evaluate import evaluate_method, load_checkpoint
    from fgray.engine.run import resolve_device

    device = resolve_device(None)
    with local_copy(checkpoint) as folder:
        method, spec, _ = load_checkpoint(folder, device)
    if embeddings is None:
        return evaluate_method(method, spec, DataSpec(**data), protocols, split="test",
                               device=device, seed=seed, progress=False, outcomes=outcomes)
    from fgray.results.tensorboard import write_embeddings

    metrics, (features, labels, classes) = evaluate_method(
        method, spec, DataSpec(**data), protocols, split="test", device=device, seed=seed,
        progress=False, return_features=True, outcomes=outcomes)
    write_embeddings(embeddings[0], embeddings[1], features, labels, classes)
    return metrics


def best_per_method(trials: list[dict[str, Any]]) -> set[str]:
    """The trial ids with the highest best val kNN top-1 of each method (the first on ties,
    and the first trial of a method none of whose trials has a score)."""
    out = set()
    for method in dict.fromkeys(t["method"] for t in trials):
        own = [t for t in trials if t["method"] == method]
        best, _ = best_of(own, BEST_METRIC)
        out.add((best or own[0])["trial_id"])  # no score at all: the first trial
    return out


def _tested(study_dir: str, trial_ids: set[str]) -> set[str]:
    from fgray.results.tables import load

    table = load(study_dir, "evals").to_pylist()
    return {r["trial_id"] for r in table if r.get("split") == "test"} & trial_ids


def test_final_model(study: StudyConfig, method: str, trial_id: str, seed: int,
                     project: bool = False) -> None:
    """Evaluate one final model (a method's best trial or a retrain of it) on test with its
    best checkpoint and record it (`evals` rows, `test_*` on its trial row), in whichever
    process runs it: an evaluation job of the search experiment or a Ray task. `project`:
    its test features also go to its TensorBoard run's embedding projector. Does nothing for
    a trial already tested (a resumed study) or without a checkpoint."""
    from fgray.results.tensorboard import run_name

    if _tested(study.study_dir, {trial_id}):
        return
    checkpoint = best_checkpoint_dir(join(study.study_dir, TRAIN_DIR, trial_id))
    if checkpoint is None:
        return
    embeddings = (study.study_dir, run_name(method, trial_id)) if project else None
    outcomes: dict[str, Any] = {}
    metrics = _evaluate_checkpoint(checkpoint, study.data, study.protocols, seed, embeddings,
                                   outcomes)
    record_test(study.study_dir, method, trial_id, metrics, seed=seed, study=study.name,
                outcomes=outcomes)


def test_init_weights(study: StudyConfig, name: str, resources: WorkerResources) -> None:
    """Evaluate the initial weights of init row `name` (`init_targets`) with the study's
    protocols on the same splits and record them as a completed trials row (val kNN top-1 as
    its best, so it ranks like a trial) with its evals rows; wherever it runs, like
    `test_final_model`. Does nothing when the row is already there."""
    from fgray.engine.evaluate import evaluate_init
    from fgray.engine.run import resolve_device

    if _init_recorded(study, name):
        return
    began, spec = time.time(), init_targets(study)[name]
    outcomes: dict[str, Any] = {}
    metrics = evaluate_init(spec, spec.data, study.protocols, device=resolve_device(None),
                            seed=study.seed, progress=False, outcomes=outcomes)
    record_init(study.study_dir, name, spec, metrics, study=study.name, start_time=began,
                cpus=resources.cpus, gpus=resources.gpus, outcomes=outcomes)


def _init_recorded(study: StudyConfig, name: str) -> bool:
    known = latest_trial_row(study.study_dir, name, name)
    return known is not None and known.get("status") == "completed"


def evaluate_job(job: dict[str, Any], setup: TrialSetup) -> None:
    """An evaluation job of the search experiment, in a trial's process (warm imports, its
    worker share): `test_final_model` of a method's best search trial (projected) or of a
    retrain, or `test_init_weights` (`job[EVALUATE] == INIT`). Reports the time it took
    (`evaluation_s`), which the study counts as work, not overhead."""
    began = time.time()
    if job[EVALUATE] == INIT:
        test_init_weights(setup.study, job["method"], setup.resources)
    else:
        test_final_model(setup.study, job["method"], job[EVALUATE], int(job.get("seed") or 0),
                         project=bool(job.get("project")))
    ray.tune.report({"evaluation_s": time.time() - began})


def _task(resources: WorkerResources, fn):
    return ray.remote(num_cpus=resources.cpus_per_worker,
                      num_gpus=resources.gpus_per_worker)(fn)


def evaluate_trials(study: StudyConfig, trials: list[dict[str, Any]],
                    resources: WorkerResources) -> None:
    """`test_final_model` of each of `trials` (rows), as Ray tasks with a worker's share; the
    best trial of each method is projected. What a compare study, or a resumed one whose
    experiment left something untested, runs after its experiment."""
    projected = best_per_method(trials)
    # Checked here too, not only in the task: a task costs a fresh worker's imports (~10 s
    # on a laptop), and after a search experiment nothing is normally left to test.
    tested = _tested(study.study_dir, {t["trial_id"] for t in trials})
    task = _task(resources, test_final_model)
    ray.get([task.remote(study, t["method"], t["trial_id"], int(t.get("seed") or 0),
                         t["trial_id"] in projected)
             for t in trials if t["trial_id"] not in tested])


def evaluate_init_rows(study: StudyConfig, resources: WorkerResources) -> None:
    """`test_init_weights` of each init row not yet recorded, as Ray tasks (see
    `evaluate_trials`)."""
    task = _task(resources, test_init_weights)
    ray.get([task.remote(study, name, resources) for name in init_targets(study)
             if not _init_recorded(study, name)])


def init_targets(study: StudyConfig) -> dict[str, RunSpec]:
    """The init rows a study has, by name: one per distinct initial weights (backbone and
    init; the study's init is shared, so per backbone) of its methods: `init` when all
    methods share them, else `init:<backbone with its weights tag>`. Each is evaluated with
    the spec of the first method that uses it (image size, the backbone's normalisation, the
    study's splits and eval settings)."""

    setup = TrialSetup(study, WorkerResources())
    specs: dict[str, RunSpec] = {}
    for method in study.methods:
        spec = setup.spec_for({"method": method})
        specs.setdefault(weights_name(spec.backbone_name, spec.init), spec)
    if len(specs) == 1:
        return {INIT: next(iter(specs.values()))}
    return {f"{INIT}:{weights}": spec for weights, spec in specs.items()}


# ---------------------------------------------------------------- the study


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
        TrialSetup(study, WorkerResources()).spec_for({"method": method})
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


def best_trials(study_dir: str, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """Per method (of `methods`, default all but the init rows), the leaderboard's best
    trial (by val kNN top-1) as its latest row."""
    from fgray.results.report import leaderboard

    out = []
    for row in leaderboard(study_dir):
        if methods is None and row.get("is_init"):
            continue
        if row.get("best_trial") and (methods is None or row["method"] in methods):
            trial = latest_trial_row(study_dir, row["method"], row["best_trial"])
            if trial is not None:
                out.append(trial)
    return out


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


def more_seed_points(study: StudyConfig, best: list[dict[str, Any]],
                     rows: list[dict[str, Any]], more: int) -> list[dict[str, Any]]:
    """The retrains that give each method's best configuration (`best`, trials rows) `more`
    seeds beyond the study's `seeds`: seeds `seed + seeds ... seed + seeds + more - 1`,
    each `{"method", "seed", **its searched parameters}` as the searcher's own retrains are,
    leaving out a seed that already completed with that configuration (`rows`, so asking
    again after an interruption does not repeat one)."""
    done = {(r["method"], r.get("config_hash"), r.get("seed")) for r in rows
            if r.get("status") == "completed"}
    points = []
    for b in best:
        for k in range(study.seeds, study.seeds + more):
            seed = study.seed + k
            if (b["method"], b.get("config_hash"), seed) not in done:
                points.append({"method": b["method"], "seed": seed, **_searched(b)})
    return points


MORE_SEEDS = "more-seeds"  # the experiment that adds seeds to the finalists


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

    from fgray.results.tables import latest_trials, load
    from fgray.results.tensorboard import write_hparams

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    if not resume:
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
            points = more_seed_points(study, best, latest_trials(
                load(study.study_dir, "trials").to_pylist()), more_seeds)
            run_points(study, MORE_SEEDS, points, resources, concurrency, console,
                       epoch_hooks)
        chosen = best + _same_config(study.study_dir, best)
    else:
        evaluation_s = 0.0  # evaluated below, as Ray tasks: counted as overhead
        points = [{"method": m, "seed": study.seed + k}
                  for m in study.methods for k in range(study.seeds)]
        run_points(study, "compare", points, resources, concurrency, console, epoch_hooks)
        rows = latest_trials(load(study.study_dir, "trials").to_pylist())
        chosen = [r for r in rows if r.get("status") == "completed"
                  and r["method"] in study.methods]
    evaluate_trials(study, chosen, resources)
    evaluate_init_rows(study, resources)
    close_lost_trials(study)
    rows = latest_trials(load(study.study_dir, "trials").to_pylist())
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


LOST = ("interrupted: the study's driver stopped after this trial started and before Tune "
        "saved the experiment; Tune does not know it, and its configuration ran again")


def close_lost_trials(study: StudyConfig) -> list[dict[str, Any]]:
    """Close the trials still `running` once every experiment has finished: trials started
    after the last snapshot Tune took before its driver was killed. The restored experiment
    does not know them (the searcher asks for their configuration again), so nothing will
    ever finish them; they are recorded as failed with `LOST` as their error."""
    from fgray.results.tables import append, latest_trials, load

    rows = latest_trials(load(study.study_dir, "trials").to_pylist())
    lost = [dict(r, status="failed", error=LOST, end_time=time.time()) for r in rows
            if r.get("status") == "running" and r["method"] in study.methods]
    if lost:
        append(study.study_dir, "trials", lost)
    return lost


def _searched(trial: dict[str, Any]) -> dict[str, Any]:
    """The searched parameters of a trial row (its `param.<name>` columns), seed excluded."""
    from fgray.results.schema import PARAM_PREFIX

    return {k[len(PARAM_PREFIX):]: v for k, v in trial.items()
            if k.startswith(PARAM_PREFIX) and v is not None and k != f"{PARAM_PREFIX}seed"}


def _same_config(study_dir: str, best: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials that re-ran a best trial's configuration with another seed."""
    from fgray.results.tables import latest_trials, load

    hashes = {(t["method"], t["config_hash"]) for t in best}
    ids = {t["trial_id"] for t in best}
    rows = latest_trials(load(study_dir, "trials").to_pylist())
    return [r for r in rows if (r["method"], r.get("config_hash")) in hashes
            and r["trial_id"] not in ids and r.get("status") == "completed"]
