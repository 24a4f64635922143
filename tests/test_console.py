"""The study's console: per-experiment progress a person can follow, Ray's output elsewhere."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

from fgray.tune.cli import ray_log_file
from fgray.tune.study import Job, JobKind, StudyProgress


def _trial(tid: str, epoch: int = 0, method: str = "moco"):
    return SimpleNamespace(trial_id=tid, last_result={"epoch": epoch},
                           config=Job(JobKind.SEARCH, method).config())


def test_plain_lines_count_trials_best_and_eta(monkeypatch):
    clock = iter([100.0, 100.0, 100.0, 130.0, 130.0, 160.0, 160.0, 160.0, 175.0])
    monkeypatch.setattr("fgray.tune.study.console.time.time", lambda: next(clock))
    out = io.StringIO()  # not a terminal: plain lines, no bar
    progress = StudyProgress({"moco": 3, "lcr": 1}, epochs=3, concurrency=1, stream=out)
    a, b = _trial("a", 3), _trial("b", 1)
    progress.on_trial_start(0, [], a)  # clock 100 (start), 100 (ETA)
    progress.on_trial_start(0, [], b)  # 100, 100 would be the ETA's: no durations yet
    progress.on_trial_result(0, [], a, {"val_knn_top1": 41.25, "epoch": 1})
    progress.on_trial_result(0, [], a, {"val_knn_top1": float("nan"), "epoch": 2})
    progress.on_trial_complete(0, [], a)  # 3 of 3 epochs: completed, took 30 s (at 130)
    progress.on_trial_complete(0, [], b)  # 1 of 3: stopped by ASHA, took 60 s (at 160)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[moco] trial a started: 1 of 3 started, 0 completed, 0 stopped, 0 "
                        "failed; best val kNN -; ETA -")
    # Two trials not started (moco's third, lcr's), b running for 30 s of a 30 s mean: 60 s.
    assert lines[2] == ("[moco] trial a completed: 2 of 3 started, 1 completed, 0 stopped, 0 "
                        "failed; best val kNN 41.2; ETA 60 s")
    assert lines[3].startswith("[moco] trial b stopped: 2 of 3 started, 1 completed, 1 stopped")
    assert lines[3].endswith("ETA 90 s")  # two left, mean of 30 s and 60 s
    progress.on_trial_error(0, [], _trial("c", method="lcr"))  # at 175
    assert out.getvalue().splitlines()[-1] == (
        "[lcr] trial c failed: 0 of 1 started, 0 completed, 0 stopped, 1 failed; best val "
        "kNN -; ETA 45 s")


def test_eta_moves_between_trial_events(monkeypatch):
    """Without a terminal, an epoch report prints the status line again once none was
    printed for heartbeat_s, with the ETA recomputed at that time."""
    wall = iter([0.0, 0.0, 10.0, 10.0, 40.0, 40.0, 70.0])
    mono = iter([0.0, 0.0, 10.0, 10.0, 20.0, 45.0, 45.0])
    monkeypatch.setattr("fgray.tune.study.console.time.time", lambda: next(wall))
    monkeypatch.setattr("fgray.tune.study.console.time.monotonic", lambda: next(mono))
    out = io.StringIO()
    progress = StudyProgress({"moco": 3}, epochs=2, concurrency=1, stream=out,
                             heartbeat_s=30.0)  # mono 0
    a, b = _trial("a", 2), _trial("b")
    progress.on_trial_start(0, [], a)  # wall 0 (start), 0 (ETA); mono 0 (printed)
    progress.on_trial_complete(0, [], a)  # wall 10, 10: a took 10 s; mono 10
    progress.on_trial_start(0, [], b)  # wall 40 (start) 40 (ETA): mean 10 s, 2 left: 20 s
    progress.on_trial_result(0, [], b, {"epoch": 1})  # mono 20: 10 s since the last line
    assert len(out.getvalue().splitlines()) == 3
    progress.on_trial_result(0, [], b, {"epoch": 1})  # mono 45: 35 s since the last line
    lines = out.getvalue().splitlines()
    # at wall 70, b has run 30 s of a 10 s mean: only the third trial's 10 s are left
    assert lines[-1] == ("[moco] trial b epoch 1: 2 of 3 started, 1 completed, 0 stopped, 0 "
                         "failed; best val kNN -; ETA 10 s")
    assert lines[-2].endswith("ETA 20 s")


def test_evaluation_jobs_are_one_line_and_not_counted():
    out = io.StringIO()
    progress = StudyProgress({"moco": 1}, epochs=3, concurrency=1, stream=out)
    job = SimpleNamespace(trial_id="j", last_result={"evaluation_s": 4.2},
                          config=Job(JobKind.EVALUATE, "moco", target="a").config())
    progress.on_trial_start(0, [], job)
    progress.on_trial_complete(0, [], job)
    assert out.getvalue().splitlines() == ["[moco] test evaluation of the trial a done in 4 s"]
    assert progress.counts["moco"] == {"completed": 0, "stopped": 0, "failed": 0}


def test_ray_output_goes_to_the_study_log_file(tmp_path):
    logger = logging.getLogger("ray.tune")
    before = logger.handlers[:]
    with ray_log_file(str(tmp_path), enabled=True) as path:
        logger.warning("a Ray Tune table line")
    assert path == tmp_path / "logs" / "ray.log"
    assert "a Ray Tune table line" in path.read_text()
    assert logger.handlers == before  # restored afterwards
    with ray_log_file("s3://bucket/study", enabled=True) as none:
        assert none is None


def test_ray_token_auth_notice_is_dropped_and_nothing_else(caplog):
    from fgray.tune.cli import quiet_token_notice

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING, logger=logger.name), quiet_token_notice():
        logger.warning("Token authentication is enabled for this Ray cluster. Set "
                       "RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is enabled but no token was found.")
    assert [r.getMessage() for r in caplog.records] == [
        "Token authentication is enabled but no token was found."]
    assert not logger.filters  # removed afterwards
