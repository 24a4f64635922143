"""The study driver's own cost as a study grows: the time the driver spends per trial --
asking the searcher, the scheduler's rungs, the recorder callback's trials rows, the table
writes, the console -- at several study sizes (20, 200 and 2,000 trials on the cpu preset).
It must stay flat: a cost that grows with the trials already run (re-reading the whole study
at every trial's end) makes a large study's driver the bottleneck.

The machinery is the study's own (`StudySearcher` with its per-method Optuna TPE searches
and journal, `MethodScheduler`'s ASHA rungs, `StudyRecorder`, `StudyProgress`, the trials
and epochs tables) on a search study of two methods; only the trainable is trivial: each
trial reports a few epochs of made-up metrics at once, written by the trial's own
`EpochRecorder` as a real trial writes them. The benchmark plays Tune's controller: the same
callbacks in the same order (a trial's start, each epoch's result, its end), with a fixed
number of trials at a time, no Ray and no processes -- so the figure is the driver's code,
not Tune's start-up or the machine's process spawning, and a 2,000-trial study takes a
minute, not an hour.

Two figures per size: `driver_ms_per_trial` (everything but the trial's own epoch writes)
and, inside it, `searcher_ms_per_trial` (Optuna's TPE, which fits its model on the trials
its method has run: a cost Optuna owns, shown apart so the rest can be read flat).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SIZES = (20, 200, 2000)
METHODS = ("moco", "lcr")
EPOCHS = 3
CONCURRENCY = 4
SMALL = {"queue_size": 64, "mlp_hidden": 32}  # the tests' tiny settings: specs build fast


class Clock:
    """Seconds spent inside `timed` blocks, by name."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start


def study_of(trials: int, storage: Path):
    from fgray.tune.study import StudyConfig

    per_method = max(trials // len(METHODS), 1)
    return StudyConfig(
        name=f"driver-{trials}", storage=str(storage),
        data={"format": "cub", "root": str(storage / "no-data")}, methods=list(METHODS),
        trials=per_method, epochs=EPOCHS, seeds=1, image_size=32, batch_size=16,
        backbones=dict.fromkeys(METHODS, "test_resnet"), fixed=dict.fromkeys(METHODS, SMALL),
        grace_period=1, reduction_factor=2, workers=0, concurrency=CONCURRENCY)


def metrics_of(trial: int, epoch: int) -> dict[str, Any]:
    """Made-up but plausible per-epoch metrics: a learning curve whose level varies by
    trial, so ASHA stops some trials and TPE has something to model."""
    from fgray.engine.selection import BEST_METRIC, SELECTION_METRIC

    value = (20.0 + (trial * 37 % 50)) * epoch / EPOCHS  # rising: the best is the latest
    # training_iteration: what Tune adds to every report (Optuna reads it as the step)
    return {"epoch": epoch, "training_iteration": epoch, "loss": 5.0 / epoch,
            SELECTION_METRIC: value, BEST_METRIC: value, "epoch_wall_s": 0.01}


def run_study(trials: int, workdir: Path) -> dict[str, Any]:
    """One study of `trials` search trials (plus its evaluation jobs), driven to its end."""
    import optuna
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from fgray.results.records import EpochRecorder
    from fgray.train.trainer import WorkerResources
    from fgray.tune.study import (
        Job,
        MethodScheduler,
        StudyProgress,
        StudyRecorder,
        StudySearcher,
        TrialSetup,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = study_of(trials, workdir / f"size-{trials}")
    setup = TrialSetup(study, WorkerResources())
    clock = Clock()
    searcher = clock.timed("searcher", StudySearcher, study)
    scheduler, recorder = MethodScheduler(study), StudyRecorder(setup)
    console = StudyProgress(searcher.totals(), study.epochs, CONCURRENCY, stream=io.StringIO())
    running: dict[str, SimpleNamespace] = {}
    started = 0
    searched = 0
    begin = time.perf_counter()

    def end(trial, stopped: bool) -> None:
        result = trial.last_result
        clock.timed("searcher", searcher.on_trial_complete, trial.trial_id, result)
        clock.timed("scheduler", scheduler.on_trial_complete, None, trial, result)
        clock.timed("recorder", recorder.on_trial_complete, 0, [], trial)
        clock.timed("console", console.on_trial_complete, 0, [], trial)
        del running[trial.trial_id]

    while True:
        finished = False
        while len(running) < CONCURRENCY:
            trial_id = f"t{started:05d}"
            config = clock.timed("searcher", searcher.suggest, trial_id)
            if config == Searcher.FINISHED:
                finished = True
                break
            if config is None:
                break  # a search still runs: what comes next is not known yet
            started += 1
            trial = SimpleNamespace(trial_id=trial_id, config=config, last_result={},
                                    error_file=None, epoch=0, job=Job.of(config))
            running[trial_id] = trial
            clock.timed("scheduler", scheduler.on_trial_add, None, trial)
            clock.timed("recorder", recorder.on_trial_start, 0, [], trial)
            clock.timed("console", console.on_trial_start, 0, [], trial)
        if finished and not running:
            break
        if not running:
            raise RuntimeError("the searcher gives no work and nothing runs")
        for trial in list(running.values()):
            if not trial.job.trains:  # an evaluation job: done at once
                trial.last_result = {"evaluation_s": 0.0}
                end(trial, stopped=False)
                continue
            trial.epoch += 1
            result = metrics_of(started, trial.epoch)
            # The trial's side: its epoch row, written where a real trial writes it.
            spec = setup.spec_for(trial.job)
            clock.timed("trial", EpochRecorder(study.study_dir, trial.trial_id, spec,
                                               study=study.name).__call__, result)
            trial.last_result = result
            clock.timed("searcher", searcher.on_trial_result, trial.trial_id, result)
            decision = clock.timed("scheduler", scheduler.on_trial_result, None, trial, result)
            clock.timed("console", console.on_trial_result, 0, [], trial, result)
            if decision == TrialScheduler.STOP or trial.epoch >= EPOCHS:
                searched += 1
                end(trial, stopped=decision == TrialScheduler.STOP)
    wall = time.perf_counter() - begin
    driver_s = sum(v for k, v in clock.spent.items() if k != "trial")
    return {"trials": searched, "jobs": started, "wall_s": wall,
            "seconds": dict(clock.spent), "driver_s": driver_s,
            "driver_ms_per_trial": 1000 * driver_s / max(searched, 1),
            "searcher_ms_per_trial": 1000 * clock.spent.get("searcher", 0.0) / max(searched, 1),
            "trial_ms_per_trial": 1000 * clock.spent.get("trial", 0.0) / max(searched, 1)}


def run(sizes: tuple[int, ...], workdir: Path) -> dict[str, Any]:
    """The driver's cost per trial at each of `sizes` (search trials of one study)."""
    out = []
    for n in sizes:
        print(f"[driver] a study of {n} trials ...", flush=True)
        figures = run_study(n, workdir)
        print(f"[driver] {figures['trials']} trials: driver {figures['driver_ms_per_trial']:.1f}"
              f" ms/trial (of which the searcher {figures['searcher_ms_per_trial']:.1f});"
              f" trial side {figures['trial_ms_per_trial']:.1f} ms", flush=True)
        out.append({"size": n, **figures})
    first, last = out[0]["driver_ms_per_trial"], out[-1]["driver_ms_per_trial"]
    return {"sizes": out, "methods": list(METHODS), "epochs": EPOCHS,
            "concurrency": CONCURRENCY, "growth": last / first if first else None}
