"""An epoch's row survives a crash between its checkpoint and its row: the resumed run records
the rows its restored history holds and the tables lack, each once; and a resumed trial's
wall time counts only the time it ran, not the time its driver was dead."""

from __future__ import annotations

import time as _time
import types

import pytest
import ray.tune

from fgray.engine.spec import DataSpec, build_spec
from fgray.results.records import (
    EPOCH_END,
    RESTORED_KEY,
    SESSION_START,
    EpochRecorder,
    running_time,
    trial_history,
)
from fgray.results.tables import load
from fgray.storage import join, move_tree
from fgray.train import trainer as trainer_module
from fgray.train.trainer import METRICS_FILE, TuneSession, worker_loop

EPOCHS = 3
GAP = 50_000.0  # seconds the (simulated) driver stays dead before the trial resumes


class Crash(Exception):
    """The process dying."""


class CrashingSession(TuneSession):
    """A trial that dies after epoch `crash_at`'s checkpoint is kept, before its row."""

    def __init__(self, *args, crash_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def report(self, metrics, checkpoint_dir, name) -> None:
        if int(metrics["epoch"]) == self.crash_at:
            move_tree(checkpoint_dir, join(self.run_uri, name), last=METRICS_FILE)
            raise Crash(name)
        super().report(metrics, checkpoint_dir, name)


def _spec(root, cache):
    return build_spec("moco", DataSpec(format="cub", root=str(root), cache_dir=str(cache)),
                      backbone="test_resnet",
                      train={"epochs": EPOCHS, "batch_size": 32, "image_size": 32, "seed": 1},
                      sets={"queue_size": 64, "mlp_hidden": 32})


@pytest.mark.parametrize("crash_at", [2, EPOCHS])
def test_row_lost_after_checkpoint_is_recorded_once_on_resume(synth_root, tmp_path,
                                                              monkeypatch, crash_at):
    study, run_uri = str(tmp_path / "study"), str(tmp_path / "study" / "train" / "t1")
    spec = _spec(synth_root, tmp_path / "cache")
    config = {"spec": spec.to_dict(), "run_uri": run_uri, "tensorboard": None}
    told: list[dict] = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **_: told.append(dict(metrics)))

    def recorder(start=None):
        return EpochRecorder(study, "t1", spec, study="s", start_time=start)

    began = _time.time()
    first = recorder(began)
    with pytest.raises(Crash):
        worker_loop(config, CrashingSession(trainer_module.torch.device("cpu"), run_uri,
                                            first, crash_at=crash_at))
    first.close()
    assert [r["epoch"] for r in trial_history(study, "moco", "t1")] == list(range(1, crash_at))

    # The driver stays dead for GAP seconds: the resumed process's clock reads GAP later.
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(
        time=lambda: _time.time() + GAP, perf_counter=_time.perf_counter))
    for _ in range(2):  # resumed, then resumed again at its end: nothing is written twice
        again = recorder()
        worker_loop(config, TuneSession(trainer_module.torch.device("cpu"), run_uri, again))
        again.close()
        rows = load(study, "epochs").to_pylist()
        assert sorted(r["epoch"] for r in rows) == list(range(1, EPOCHS + 1))
    assert all(RESTORED_KEY not in m for m in told)  # consumed by the recorder
    assert all(RESTORED_KEY not in r for r in rows)
    lost = next(r for r in rows if r["epoch"] == crash_at)
    assert lost["epoch_wall_s"] > 0 and lost["val_knn_top1"] is not None  # its full report
    ran = _time.time() - began

    history = trial_history(study, "moco", "t1")
    row = first.trial_row(history, "completed", end_time=_time.time() + GAP)
    assert row["epochs_run"] == EPOCHS
    if crash_at < EPOCHS:  # the resumed process ran epochs: a running segment of its own
        assert 0 < row["wall_time_s"] <= ran + 1.0  # not the GAP the driver was dead
        assert row["cpu_hours"] == pytest.approx(row["wall_time_s"] / 3600)


def test_epoch_hooks_run_on_each_epoch_before_its_report(synth_root, tmp_path, monkeypatch):
    """The per-epoch hooks of the worker loop: every epoch, with the rank, the run folder and
    what is about to be reported, its checkpoint already written, the report not yet sent."""
    run_uri = str(tmp_path / "train" / "t1")
    told: list[dict] = []
    seen: list[tuple] = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **_: told.append(dict(metrics)))

    def hook(epoch, rank, uri, metrics):
        seen.append((epoch, rank, uri, metrics["epoch"], len(told)))

    spec = _spec(synth_root, tmp_path / "cache")
    worker_loop({"spec": spec.to_dict(), "run_uri": run_uri, "tensorboard": None,
                 "epoch_hooks": [hook]},
                TuneSession(trainer_module.torch.device("cpu"), run_uri))
    assert seen == [(e, 0, run_uri, e, e - 1) for e in range(1, EPOCHS + 1)]
    assert [m["epoch"] for m in told] == list(range(1, EPOCHS + 1))
    assert all(m["best_val_knn_top1"] == max(t["val_knn_top1"] for t in told[:i + 1])
               for i, m in enumerate(told))


def test_wall_time_counts_running_segments_only(tmp_path):
    spec = build_spec("moco", DataSpec(format="cub", root="/data/cub"), backbone="test_resnet",
                      train={"epochs": 4, "batch_size": 16, "image_size": 32, "seed": 1},
                      sets={"queue_size": 64, "mlp_hidden": 32})
    recorder = EpochRecorder(str(tmp_path), "t", spec, cpus=2.0, gpus=0.5, start_time=1000.0)

    def epoch(n, session, end):
        return {"epoch": n, "loss": 1.0, "epoch_wall_s": 9.0, SESSION_START: session,
                EPOCH_END: end}

    # Ran 1000..1020 (2 epochs), then crashed; the driver was dead until 51000; ran 2 more.
    history = [epoch(1, 1002.0, 1010.0), epoch(2, 1002.0, 1020.0),
               epoch(3, 51000.0, 51010.0), epoch(4, 51000.0, 51020.0)]
    row = recorder.trial_row(history, "completed", end_time=51025.0)
    assert row["wall_time_s"] == pytest.approx(20.0 + 25.0)
    assert row["cpu_hours"] == pytest.approx(45.0 * 2 / 3600)
    assert row["gpu_hours"] == pytest.approx(45.0 * 0.5 / 3600)
    # One process (or rows without clocks): from start to end, as before.
    assert running_time(history[:2], 1000.0, 1030.0) == pytest.approx(30.0)
    assert running_time([{"epoch": 1}], 1000.0, 1030.0) == pytest.approx(30.0)
    assert running_time([], 1000.0, 990.0) == 0.0
