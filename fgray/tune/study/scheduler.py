"""Early stopping of a search study: ASHA on per-epoch val kNN top-1 (`make_scheduler`),
one set of rungs per method (`MethodScheduler`), for search jobs only."""

from __future__ import annotations

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from fgray.engine.selection import SELECTION_METRIC
from fgray.tune.study.config import StudyConfig
from fgray.tune.study.jobs import Job


def make_scheduler(study: StudyConfig):
    """ASHA on per-epoch val kNN top-1 (one bracket), for one method's search trials."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=SELECTION_METRIC, mode="max",
                         max_t=study.epochs, grace_period=study.grace_period,
                         reduction_factor=study.reduction_factor,
                         stop_last_trials=False)  # a full run ends by itself



class MethodScheduler(FIFOScheduler):
    """ASHA per method: each method's search trials get their own rungs (its learning curves
    are compared with its own); the retrains of a best configuration run their full budget."""

    def __init__(self, study: StudyConfig) -> None:
        super().__init__()
        self.study = study
        self.asha: dict[str, TrialScheduler] = {}

    def _of(self, trial) -> TrialScheduler | None:
        job = Job.of(trial.config)
        if not job.stoppable:  # a retrain, a fixed point or an evaluation: never stopped
            return None
        if job.method not in self.asha:
            self.asha[job.method] = make_scheduler(self.study)
        return self.asha[job.method]

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

