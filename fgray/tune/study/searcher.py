"""What a search study asks for: one Optuna TPE search per method (`make_searcher`,
`ResumableOptunaSearch`, which mends the journal a killed driver left) and `StudySearcher`,
which streams every method's search trials, the retrains of each best configuration and
the test evaluations of the final models to one Tune experiment, as `Job`s."""

from __future__ import annotations

import warnings
import zlib
from collections import Counter
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from fgray.results.schema import PARAM_PREFIX
from fgray.tune.journal import Journal
from fgray.tune.study.config import SEARCH_METRIC, StudyConfig
from fgray.tune.study.evaluation import final_model_job, init_jobs
from fgray.tune.study.jobs import Job, JobKind
from fgray.tune.study.ledger import best_trials, ended_unknown, searched


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
    with seeds `seed + 1 ... seed + seeds - 1`. A suggested config is a `Job`'s
    (`Job.config()`): a SEARCH job with the searched parameters, a RETRAIN with its seed.

    The test evaluations are jobs of the same experiment (`JobKind.EVALUATE`, see
    `fgray.tune.study.evaluation`), queued as each model becomes final -- the initial
    weights at once, the best search trial when its method's search ends, a retrain when it
    completes -- and run in the trials' warm processes. Work is handed out longest first
    (search trials, then retrains, then evaluations), so the short evaluations fill the
    slots that the last retrains leave free. The test split is evaluated once per final
    model and never for a trial that is not one."""

    def __init__(self, study: StudyConfig) -> None:
        super().__init__(metric=SEARCH_METRIC, mode="max")
        self.study = study
        self.searches = {m: make_searcher(study, m) for m in study.methods}
        self.search_trials: dict[str, str] = {}  # trial id -> method, of the search trials
        self.ended = dict.fromkeys(study.methods, 0)  # search trials ended (any status)
        self.retrains: list[Job] = []  # asked for, not yet given to a trial
        self.retrained: set[str] = set()  # methods whose retrains were queued
        self.training: dict[str, Job] = {}  # retrains given a trial, not ended
        self.jobs: list[Job] = init_jobs(study)  # evaluations, in the order they are given
        self.inits = len(self.jobs)

    @property
    def total(self) -> int:
        """Trials and jobs this searcher asks for at most (fewer when a method has no best
        trial or a retrain fails)."""
        per_method = self.study.trials + 2 * self.study.seeds - 1
        return len(self.study.methods) * per_method + self.inits

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
            self.jobs.append(final_model_job(best[0], project=True))
            params = searched(best[0])
            self.retrains += [Job(JobKind.RETRAIN, method, params, seed=self.study.seed + k)
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
                return Job(JobKind.SEARCH, method, params).config()
        if self.retrains:
            self.training[trial_id] = self.retrains.pop(0)
            return self.training[trial_id].config()
        if self.jobs:
            return self.jobs.pop(0).config()
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
            self.jobs.append(Job(JobKind.EVALUATE, retrain.method, seed=retrain.seed,
                                 target=trial_id))
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
        self._adopt(ended_unknown(self.study, set(self.search_trials) | set(self.training)))

    def _adopt(self, rows: list[dict[str, Any]]) -> None:
        """Trials that ended after the snapshot this searcher was restored from (`rows`, see
        `ledger.ended_unknown`) count as asked and ended, so their work is not asked for
        again: a search trial takes its method's slot (Optuna has its result: the journal
        is uploaded as a trial is told), a retrain its seed (its test evaluation queued).
        Without this a study resumed after a trial completed unsnapshotted ran one search
        trial more than asked."""
        for row in rows:
            method, seed = row["method"], row.get(f"{PARAM_PREFIX}seed")
            if seed is None:  # a search trial: retrains record their own seed
                self.search_trials[row["trial_id"]] = method
                self.ended[method] += 1
                continue
            owed = next((j for j in self.retrains if j.method == method and j.seed == seed),
                        None)
            if owed is None:
                continue  # handed out before the snapshot: Tune restores and closes it
            self.retrains.remove(owed)
            if row.get("status") == "completed":
                self.jobs.append(Job(JobKind.EVALUATE, method, seed=int(seed),
                                     target=row["trial_id"]))

