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

from fgray.tune.study import (
    EVALUATE,
    INIT,
    SEARCH_METRIC,
    SELECTION_METRIC,
    MethodScheduler,
    StudyConfig,
    StudySearcher,
    more_seed_points,
)

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

    monkeypatch.setattr("fgray.tune.study.best_trials", best_trials)
    return rows


def _method(config) -> str:
    return config["method"]


def test_search_trials_then_retrains_then_evaluations_then_finished(tmp_path, best_rows):
    searcher = StudySearcher(_study(tmp_path))
    assert searcher.totals() == {"moco": 4, "lcr": 4}  # 2 searched + 2 retrains each
    assert searcher.total == 2 * (2 + 3 + 2) + 1  # + a test evaluation per final model, init

    asked = {tid: searcher.suggest(tid) for tid in ("a", "b", "c", "d", "i")}
    assert [_method(asked[t]) for t in "abcd"] == ["moco", "moco", "lcr", "lcr"]
    assert "seed" not in asked["a"] and "lr" in asked["a"]  # a searched point
    assert asked["i"] == {"method": INIT, EVALUATE: INIT}  # short work after the searches
    assert searcher.suggest("e") is None  # searches still running: nothing to give yet

    searcher.on_trial_complete("i", {"evaluation_s": 1.0})
    searcher.on_trial_complete("a", {SEARCH_METRIC: 30.0, "epoch": 4})
    searcher.on_trial_complete("b", {SEARCH_METRIC: 40.0, "epoch": 4})
    best_rows["moco"] = {"trial_id": "b", "method": "moco", "seed": 0,
                         "param.lr": asked["b"]["lr"], "param.seed": None}
    # moco's search has ended: its best is retrained with seeds 1, 2, then tested.
    assert searcher.suggest("e") == {"method": "moco", "seed": 1, "lr": asked["b"]["lr"]}
    assert searcher.suggest("f") == {"method": "moco", "seed": 2, "lr": asked["b"]["lr"]}
    assert searcher.suggest("g") == {"method": "moco", EVALUATE: "b", "seed": 0,
                                     "project": True}
    assert searcher.suggest("h") is None
    searcher.on_trial_complete("e", {SEARCH_METRIC: 41.0})
    searcher.on_trial_complete("f", error=True)  # a failed retrain is not evaluated
    assert searcher.suggest("h") == {"method": "moco", EVALUATE: "e", "seed": 1}

    searcher.on_trial_complete("c", {SEARCH_METRIC: 10.0})
    searcher.on_trial_complete("d", error=True)
    best_rows["lcr"] = {"trial_id": "c", "method": "lcr", "seed": 0, "param.nu": 0.02,
                        "param.capacity": 8}
    rest = [searcher.suggest(t) for t in ("j", "k", "l")]
    assert [r["seed"] for r in rest[:2]] == [1, 2] and EVALUATE not in rest[0]
    assert rest[0]["nu"] == 0.02 and rest[0]["capacity"] == 8
    assert rest[2] == {"method": "lcr", EVALUATE: "c", "seed": 0, "project": True}
    assert searcher.suggest("m") is None  # two retrains still train
    searcher.on_trial_complete("j", {SEARCH_METRIC: 9.0})
    searcher.on_trial_complete("k", {SEARCH_METRIC: 8.0})
    assert [searcher.suggest(t)[EVALUATE] for t in ("m", "n")] == ["j", "k"]
    assert searcher.suggest("o") == Searcher.FINISHED


def test_a_method_without_a_best_trial_gets_no_retrains(tmp_path, best_rows):
    searcher = StudySearcher(_study(tmp_path, methods=["moco"], seeds=2))
    searcher.suggest("a"), searcher.suggest("b")
    assert searcher.suggest("i")[EVALUATE] == INIT
    searcher.on_trial_complete("a", error=True)
    searcher.on_trial_complete("b", error=True)
    assert searcher.suggest("c") == Searcher.FINISHED


def test_a_restored_searcher_goes_on_from_its_snapshot(tmp_path, best_rows):
    study = _study(tmp_path, methods=["moco"], trials=3, seeds=2)
    searcher = StudySearcher(study)
    as_pickled = pickle.dumps(searcher)  # what tuner.pkl holds
    first = [searcher.suggest(t) for t in ("a", "b")]
    searcher.on_trial_complete("a", {SEARCH_METRIC: 20.0})
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))
    later = searcher.suggest("c")  # asked after the snapshot, then the driver dies
    restored = pickle.loads(as_pickled)
    restored.restore(str(snapshot))
    assert first[0]["lr"] == pytest.approx(0.03)  # the recipe came first
    again = restored.suggest("c2")
    assert set(again) == set(later) and again["method"] == "moco"
    # The journal holds the lost trial as failed: Optuna never waits for it.
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "s" / "optuna" / "journal.log")))
    states = [t.state.name for t in optuna.load_study(study_name="moco",
                                                      storage=journal).trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 1
    restored.on_trial_complete("b", {SEARCH_METRIC: 25.0})
    restored.on_trial_complete("c2", {SEARCH_METRIC: 5.0})
    best_rows["moco"] = {"trial_id": "b", "method": "moco", "seed": 0, "param.lr": 0.1}
    assert restored.suggest("d") == {"method": "moco", "seed": 1, "lr": 0.1}
    assert [restored.suggest(t)[EVALUATE] for t in ("e", "f")] == [INIT, "b"]


def _trial(tid: str, **config):
    return SimpleNamespace(trial_id=tid, config=config)


def test_each_method_has_its_own_rungs_and_retrains_run_their_budget(tmp_path):
    scheduler = MethodScheduler(_study(tmp_path))
    a, b = _trial("a", method="moco"), _trial("b", method="moco")
    c = _trial("c", method="lcr")
    retrain = _trial("r", method="moco", seed=1)
    job = _trial("j", method="moco", evaluate="a")
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


def test_after_the_experiment_only_untested_models_start_a_task(tmp_path, monkeypatch):
    """What the search experiment tested is not tested again after it -- not even by a Ray
    task that would find it done: a task costs a fresh worker's imports."""
    from fgray.results.records import record_init, record_test
    from fgray.tune import study as study_module

    study = _study(tmp_path)
    launched = []

    class Task:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            launched.append((self.fn.__name__, args[1:3]))

    monkeypatch.setattr(study_module, "_task", lambda resources, fn: Task(fn))
    monkeypatch.setattr(study_module.ray, "get", lambda refs: refs)
    trials = [{"method": "moco", "trial_id": "a", "seed": 0, "best_val_knn_top1": 40.0},
              {"method": "moco", "trial_id": "b", "seed": 1, "best_val_knn_top1": 30.0}]
    record_test(study.study_dir, "moco", "a", {"knn_top1": 41.0}, seed=0)
    study_module.evaluate_trials(study, trials, study_module.WorkerResources())
    study_module.evaluate_init_rows(study, study_module.WorkerResources())
    assert launched == [("test_final_model", ("moco", "b")),
                        ("test_init_weights", (INIT, study_module.WorkerResources()))]

    launched.clear()
    spec = study_module.init_targets(study)[INIT]
    record_init(study.study_dir, INIT, spec, {"knn_top1": 12.0})
    record_test(study.study_dir, "moco", "b", {"knn_top1": 31.0}, seed=1)
    study_module.evaluate_trials(study, trials, study_module.WorkerResources())
    study_module.evaluate_init_rows(study, study_module.WorkerResources())
    assert launched == []


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
        {"method": "moco", "seed": 4, "lr": 0.1},
        {"method": "lcr", "seed": 3, "nu": 0.5}, {"method": "lcr", "seed": 4, "nu": 0.5}]
    assert more_seed_points(study, best, rows, 0) == []
