"""The study's one search experiment without a cluster: what `StudySearcher` asks for and in
which order (search trials method by method, then the retrains of each method whose search
ended, then the test evaluations; nothing after the last), its snapshot and restore, and
the per-method ASHA rungs of `MethodScheduler` -- all through the Searcher / TrialScheduler
calls Tune makes."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from fgray.engine.selection import SELECTION_METRIC
from fgray.tune.study import (
    INIT,
    SEARCH_METRIC,
    Job,
    JobKind,
    MethodScheduler,
    StudyConfig,
    StudySearcher,
    more_seed_points,
)

SEARCH, RETRAIN, EVALUATE = JobKind.SEARCH, JobKind.RETRAIN, JobKind.EVALUATE

optuna.logging.set_verbosity(optuna.logging.WARNING)
SMALL = {"queue_size": 64, "mlp_hidden": 32}


def _study(tmp_path, **kw) -> StudyConfig:
    base = dict(name="s", storage=str(tmp_path), data={"format": "cub", "root": "/data/cub"},
                methods=["moco", "lcr"], trials=2, seeds=3, epochs=4, image_size=32,
                batch_size=16, backbones={"moco": "test_resnet", "lcr": "test_resnet"},
                fixed={"moco": SMALL, "lcr": SMALL}, grace_period=1, reduction_factor=2)
    base.update(kw)
    return StudyConfig(**base)


@pytest.fixture
def best_rows(monkeypatch):
    """The trials table's best trial per method, as the leaderboard would rank it: the
    searcher reads it once a method's search has ended."""
    rows: dict[str, dict] = {}

    def best_trials(study_dir, methods=None):
        return [rows[m] for m in (methods or rows) if m in rows]

    monkeypatch.setattr("fgray.tune.study.searcher.best_trials", best_trials)
    return rows


def _job(config) -> Job:
    return Job.of(config)


def test_search_trials_then_retrains_then_evaluations_then_finished(tmp_path, best_rows):
    searcher = StudySearcher(_study(tmp_path))
    assert searcher.totals() == {"moco": 4, "lcr": 4}  # 2 searched + 2 retrains each
    assert searcher.total == 2 * (2 + 3 + 2) + 1  # + a test evaluation per final model, init

    asked = {tid: _job(searcher.suggest(tid)) for tid in ("a", "b", "c", "d", "i")}
    assert [asked[t].method for t in "abcd"] == ["moco", "moco", "lcr", "lcr"]
    assert asked["a"].kind is SEARCH and asked["a"].seed is None and "lr" in asked["a"].params
    assert asked["i"] == Job(EVALUATE, INIT, target=INIT)  # short work after the searches
    assert searcher.suggest("e") is None  # searches still running: nothing to give yet

    searcher.on_trial_complete("i", {"evaluation_s": 1.0})
    searcher.on_trial_complete("a", {SEARCH_METRIC: 30.0, "epoch": 4})
    searcher.on_trial_complete("b", {SEARCH_METRIC: 40.0, "epoch": 4})
    best_rows["moco"] = {"trial_id": "b", "method": "moco", "seed": 0,
                         "param.lr": asked["b"].params["lr"], "param.seed": None}
    # moco's search has ended: its best is retrained with seeds 1, 2, then tested.
    lr = {"lr": asked["b"].params["lr"]}
    assert _job(searcher.suggest("e")) == Job(RETRAIN, "moco", lr, seed=1)
    assert _job(searcher.suggest("f")) == Job(RETRAIN, "moco", lr, seed=2)
    assert _job(searcher.suggest("g")) == Job(EVALUATE, "moco", seed=0, target="b",
                                              project=True)
    assert searcher.suggest("h") is None
    searcher.on_trial_complete("e", {SEARCH_METRIC: 41.0})
    searcher.on_trial_complete("f", error=True)  # a failed retrain is not evaluated
    assert _job(searcher.suggest("h")) == Job(EVALUATE, "moco", seed=1, target="e")

    searcher.on_trial_complete("c", {SEARCH_METRIC: 10.0})
    searcher.on_trial_complete("d", error=True)
    best_rows["lcr"] = {"trial_id": "c", "method": "lcr", "seed": 0, "param.nu": 0.02,
                        "param.capacity": 8}
    rest = [_job(searcher.suggest(t)) for t in ("j", "k", "l")]
    assert [r.seed for r in rest[:2]] == [1, 2] and rest[0].kind is RETRAIN
    assert rest[0].params == {"nu": 0.02, "capacity": 8}
    assert rest[2] == Job(EVALUATE, "lcr", seed=0, target="c", project=True)
    assert searcher.suggest("m") is None  # two retrains still train
    searcher.on_trial_complete("j", {SEARCH_METRIC: 9.0})
    searcher.on_trial_complete("k", {SEARCH_METRIC: 8.0})
    assert [_job(searcher.suggest(t)).target for t in ("m", "n")] == ["j", "k"]
    assert searcher.suggest("o") == Searcher.FINISHED


def test_a_method_without_a_best_trial_gets_no_retrains(tmp_path, best_rows):
    searcher = StudySearcher(_study(tmp_path, methods=["moco"], seeds=2))
    searcher.suggest("a"), searcher.suggest("b")
    assert _job(searcher.suggest("i")).tests_init
    searcher.on_trial_complete("a", error=True)
    searcher.on_trial_complete("b", error=True)
    assert searcher.suggest("c") == Searcher.FINISHED


def test_a_restored_searcher_goes_on_from_its_snapshot(tmp_path, best_rows):
    study = _study(tmp_path, methods=["moco"], trials=3, seeds=2)
    searcher = StudySearcher(study)
    as_pickled = pickle.dumps(searcher)  # what tuner.pkl holds
    first = [_job(searcher.suggest(t)) for t in ("a", "b")]
    searcher.on_trial_complete("a", {SEARCH_METRIC: 20.0})
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))
    later = _job(searcher.suggest("c"))  # asked after the snapshot, then the driver dies
    restored = pickle.loads(as_pickled)
    restored.restore(str(snapshot))
    assert first[0].params["lr"] == pytest.approx(0.03)  # the recipe came first
    again = _job(restored.suggest("c2"))
    assert set(again.params) == set(later.params) and again.method == "moco"
    # The journal holds the lost trial as failed: Optuna never waits for it.
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "s" / "optuna" / "journal.log")))
    states = [t.state.name for t in optuna.load_study(study_name="moco",
                                                      storage=journal).trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 1
    restored.on_trial_complete("b", {SEARCH_METRIC: 25.0})
    restored.on_trial_complete("c2", {SEARCH_METRIC: 5.0})
    best_rows["moco"] = {"trial_id": "b", "method": "moco", "seed": 0, "param.lr": 0.1}
    assert _job(restored.suggest("d")) == Job(RETRAIN, "moco", {"lr": 0.1}, seed=1)
    assert [_job(restored.suggest(t)).target for t in ("e", "f")] == [INIT, "b"]


def test_a_restored_searcher_adopts_trials_that_ended_after_its_snapshot(tmp_path, best_rows):
    """A trial that completed after Tune's last snapshot (the driver killed before the next)
    is in the trials table but not in the restored searcher: its work is adopted, not asked
    for again -- a search trial's slot, a retrain's seed (whose test evaluation is queued)."""
    from fgray.results.trials import write_trials

    study = _study(tmp_path, methods=["moco"], trials=3, seeds=3)
    searcher = StudySearcher(study)
    as_pickled = pickle.dumps(searcher)
    [_job(searcher.suggest(t)) for t in ("a", "b")]
    searcher.on_trial_complete("a", {SEARCH_METRIC: 20.0})
    search_snapshot = tmp_path / "search.pkl"
    searcher.save(str(search_snapshot))
    late = _job(searcher.suggest("c"))  # asked after the snapshot; it completes, then the kill
    row = {"study": "s", "method": "moco", "status": "completed"}
    write_trials(study.study_dir, [{**row, "trial_id": "c",
                                    **{f"param.{k}": v for k, v in late.params.items()}}])
    restored = pickle.loads(as_pickled)
    restored.restore(str(search_snapshot))
    assert _job(restored.suggest("x")).tests_init  # no fourth search trial: c took the third
    assert restored.suggest("y") is None  # b (restored by Tune) still runs
    restored.on_trial_complete("b", {SEARCH_METRIC: 25.0})
    best_rows["moco"] = {"trial_id": "b", "method": "moco", "seed": 0, "param.lr": 0.1}
    assert _job(restored.suggest("r1")) == Job(RETRAIN, "moco", {"lr": 0.1}, seed=1)
    retrain_snapshot = tmp_path / "retrain.pkl"
    restored.save(str(retrain_snapshot))  # seed 2 still owed here; then it runs and completes
    assert _job(restored.suggest("r2")) == Job(RETRAIN, "moco", {"lr": 0.1}, seed=2)
    write_trials(study.study_dir, [{**row, "trial_id": "r2", "param.lr": 0.1, "param.seed": 2}])
    again = pickle.loads(as_pickled)
    again.restore(str(retrain_snapshot))
    rest = [_job(again.suggest(t)) for t in ("e1", "e2")]
    assert rest == [Job(EVALUATE, "moco", seed=0, target="b", project=True),
                    Job(EVALUATE, "moco", seed=2, target="r2")]  # seed 2 not trained again
    assert again.suggest("e3") is None  # r1 (restored by Tune) still runs


def _trial(tid: str, job: Job):
    return SimpleNamespace(trial_id=tid, config=job.config())


def test_each_method_has_its_own_rungs_and_retrains_run_their_budget(tmp_path):
    scheduler = MethodScheduler(_study(tmp_path))
    a, b = _trial("a", Job(SEARCH, "moco")), _trial("b", Job(SEARCH, "moco"))
    c = _trial("c", Job(SEARCH, "lcr"))
    retrain = _trial("r", Job(RETRAIN, "moco", seed=1))
    job = _trial("j", Job(EVALUATE, "moco", target="a"))
    for t in (a, b, c, retrain, job):
        scheduler.on_trial_add(None, t)

    def report(trial, value):
        return scheduler.on_trial_result(None, trial, {"epoch": 1, SELECTION_METRIC: value})

    assert report(a, 50.0) == TrialScheduler.CONTINUE
    # Below moco's first rung (reduction factor 2: the top half of {50, 10} goes on).
    assert report(b, 10.0) == TrialScheduler.STOP
    # The same value is lcr's first result on its own rungs: it goes on.
    assert report(c, 10.0) == TrialScheduler.CONTINUE
    assert report(retrain, 0.0) == TrialScheduler.CONTINUE  # never stopped early
    assert report(job, 0.0) == TrialScheduler.CONTINUE


def test_after_the_experiment_only_untested_models_are_owed_a_job(tmp_path):
    """What the search experiment tested is not tested again after it -- not even by an
    evaluation job that would find it done: an experiment costs a start-up."""
    from fgray.results.records import record_init, record_test
    from fgray.tune.study import evaluation_jobs, init_targets

    study = _study(tmp_path)
    trials = [{"method": "moco", "trial_id": "a", "seed": 0, "best_val_knn_top1": 40.0},
              {"method": "moco", "trial_id": "b", "seed": 1, "best_val_knn_top1": 30.0}]
    record_test(study.study_dir, "moco", "a", {"knn_top1": 41.0}, seed=0)
    # b is not the best of moco (a is): not projected.
    assert evaluation_jobs(study, trials) == [Job(EVALUATE, "moco", seed=1, target="b"),
                                              Job(EVALUATE, INIT, target=INIT)]

    record_init(study.study_dir, INIT, init_targets(study)[INIT], {"knn_top1": 12.0})
    record_test(study.study_dir, "moco", "b", {"knn_top1": 31.0}, seed=1)
    assert evaluation_jobs(study, trials) == []


def test_more_seed_points_extend_each_best_and_skip_completed_seeds(tmp_path):
    """--more-seeds 2 on a 3-seed study: seeds 3 and 4 of each method's best configuration,
    its searched parameters as the searcher's retrains carry them, a seed that already
    completed with that configuration not again (a failed one again)."""
    study = _study(tmp_path, seeds=3)
    best = [{"method": "moco", "trial_id": "b", "config_hash": "h", "seed": 0,
             "param.lr": 0.1, "param.seed": None},
            {"method": "lcr", "trial_id": "c", "config_hash": "g", "seed": 0, "param.nu": 0.5}]
    rows = [{"method": "moco", "config_hash": "h", "seed": 3, "status": "completed"},
            {"method": "moco", "config_hash": "h", "seed": 4, "status": "failed"},
            {"method": "lcr", "config_hash": "other", "seed": 3, "status": "completed"}]
    assert more_seed_points(study, best, rows, 2) == [
        Job(RETRAIN, "moco", {"lr": 0.1}, seed=4),
        Job(RETRAIN, "lcr", {"nu": 0.5}, seed=3), Job(RETRAIN, "lcr", {"nu": 0.5}, seed=4)]
    assert more_seed_points(study, best, rows, 0) == []


def test_configs_of_an_older_study_read_as_jobs():
    """Tune's state of a study interrupted under an older fgray holds untyped configs; a
    resume reads each as the job it was."""
    assert Job.of({"method": "moco", "lr": 0.1}) == Job(SEARCH, "moco", {"lr": 0.1})
    assert Job.of({"method": "moco", "seed": 2, "lr": 0.1}) == Job(RETRAIN, "moco", {"lr": 0.1},
                                                                    seed=2)
    assert Job.of({"point": {"method": "lcr", "seed": 1}}) == Job(JobKind.POINT, "lcr", seed=1)
    assert Job.of({"method": "moco", "evaluate": "b", "seed": 0, "project": True}) == Job(
        EVALUATE, "moco", seed=0, target="b", project=True)
    assert Job.of({"method": INIT, "evaluate": INIT}).tests_init
