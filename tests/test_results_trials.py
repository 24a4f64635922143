"""The trials table: one row per trial (its current state) for every plain reader, the
states' history in trial_events, concurrent writers, killed writers, old-layout studies."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from fgray.engine.spec import DataSpec, build_spec
from fgray.results import load
from fgray.results.parquet import LEGACY_PREFIX, to_arrow, write_file
from fgray.results.records import EpochRecorder, latest_trial_row, record_init, record_test
from fgray.results.report import leaderboard
from fgray.results.trials import STALE_TEMP_S, read_trial, restore_events, write_trials

UTC = dt.timezone.utc
ROOT = Path(__file__).resolve().parents[1]
TINY = {"queue_size": 64, "mlp_hidden": 32}
DUCKDB_TRIALS = ("select method, trial_id, status, epochs_run, test_rank1 from read_parquet("
                 "'{study}/tables/trials/**/*.parquet', hive_partitioning=true, "
                 "union_by_name=true) order by method, trial_id")


def _spec(seed: int = 0, lr: float = 0.05, method: str = "moco"):
    return build_spec(method, DataSpec(format="cub", root="/data/cub"), backbone="test_resnet",
                      train={"epochs": 4, "batch_size": 16, "image_size": 32, "seed": seed},
                      sets={**TINY, "lr": lr} if method == "moco" else {"lr": lr})


def _epoch(epoch: int, val: float) -> dict:
    return {"epoch": epoch, "loss": 5.0 - epoch, "lr": 0.01, "val_knn_top1": val}


def _duckdb_trials(study) -> list[tuple]:
    return duckdb.sql(DUCKDB_TRIALS.format(study=study)).fetchall()


def _plain_readers_agree(study, expected_ids: list[tuple[str, str]]) -> None:
    """pandas, pyarrow.dataset and DuckDB read the folder as it is: one row per trial."""
    rows = _duckdb_trials(study)
    assert [(m, t) for m, t, *_ in rows] == sorted(expected_ids)
    frame = pd.read_parquet(Path(study) / "tables" / "trials")
    assert sorted(zip(frame["method"].astype(str), frame["trial_id"])) == sorted(expected_ids)
    table = ds.dataset(Path(study) / "tables" / "trials", format="parquet",
                       partitioning="hive").to_table()
    assert table.num_rows == len(expected_ids)
    loaded = load(str(study), "trials")
    assert sorted(zip(loaded.column("method").to_pylist(),
                      loaded.column("trial_id").to_pylist())) == sorted(expected_ids)


def test_study_sequence_gives_one_row_per_trial(tmp_path):
    """What a study writes for 10 trials: a `running` row at start, epochs, a `stopped`,
    `completed` or `failed` row at the end, test metrics on the best ones, the init row --
    and a stale `running` replayed after a trial ended."""
    study = str(tmp_path / "study")
    outcome = {f"t{i:02d}": ("stopped" if i % 3 == 1 else "failed" if i == 9 else "completed")
               for i in range(10)}
    recorders = {}
    for i, trial_id in enumerate(outcome):
        method = "moco" if i < 6 else "lcr"
        rec = EpochRecorder(study, trial_id, _spec(seed=i, method=method), study="s",
                            params={"lr": 0.01 * (i + 1)})
        rec.finish([], "running")
        recorders[trial_id] = rec
    for i, (trial_id, status) in enumerate(outcome.items()):
        rec = recorders[trial_id]
        epochs = 2 if status == "stopped" else 1 if status == "failed" else 4
        history = [_epoch(e, 10.0 * i + e) for e in range(1, epochs + 1)]
        for metrics in history:
            rec(metrics)
        rec.finish(history, status, error="FloatingPointError: nan" if status == "failed"
                   else None)
    tested = {"t00": 61.0, "t03": 64.0, "t06": 55.0}
    for trial_id, rank1 in tested.items():
        method = "moco" if int(trial_id[1:]) < 6 else "lcr"
        row = record_test(study, method, trial_id, {"rank1": rank1, "knn_top1": rank1 - 5},
                          seed=0, study="s")
        assert row is not None and row["test_rank1"] == rank1 and row["status"] == "completed"
    # A late `running` of an ended trial (e.g. a replayed start) never hides its final state.
    recorders["t04"].finish([], "running")
    record_init(study, "init", _spec(), {"rank1": 20.0, "val_knn_top1": 15.0}, study="s")

    rows = _duckdb_trials(study)
    assert len(rows) == 11 and len({(m, t) for m, t, *_ in rows}) == 11
    got = {t: (m, status, epochs, rank1) for m, t, status, epochs, rank1 in rows}
    assert got["init"] == ("init", "completed", 0, 20.0)
    for i, (trial_id, status) in enumerate(outcome.items()):
        method = "moco" if i < 6 else "lcr"
        epochs = 2 if status == "stopped" else 1 if status == "failed" else 4
        assert got[trial_id] == (method, status, epochs, tested.get(trial_id)), trial_id
    _plain_readers_agree(study, [(m, t) for t, (m, *_) in got.items()])

    # The final metrics are the trial's: best val of its history, its test metrics.
    t03 = latest_trial_row(study, "moco", "t03")
    assert t03["best_val_knn_top1"] == 34.0 and t03["best_epoch"] == 4
    assert t03["test_knn_top1"] == 59.0 and t03["param.lr"] == pytest.approx(0.04)
    assert latest_trial_row(study, "moco", "t09") is None  # t09 is lcr
    assert latest_trial_row(study, "lcr", "t09")["error"] == "FloatingPointError: nan"
    board = {r["method"]: r for r in leaderboard(study)}
    assert board["moco"]["trials_stopped"] == 2 and board["moco"]["trials_completed"] == 4
    assert board["lcr"]["trials_failed"] == 1 and board["lcr"]["trials_running"] == 0

    # Every state written is in the history: 10 starts, 10 ends, 3 tests, the replay, init.
    events = load(study, "trial_events").to_pylist()
    assert len(events) == 10 + 10 + 3 + 1 + 1
    t00 = sorted((e for e in events if e["trial_id"] == "t00"), key=lambda e: e["end_time"])
    assert [e["status"] for e in t00] == ["running", "completed", "completed"]
    assert [e["test_rank1"] for e in t00] == [None, None, 61.0]


def test_record_test_without_a_row_writes_nothing(tmp_path):
    study = str(tmp_path)
    assert record_test(study, "moco", "ghost", {"rank1": 1.0}, seed=0) is None
    assert load(study, "trials").num_rows == 0


def test_concurrent_threads_same_and_different_trials(tmp_path):
    """Many threads writing states of many trials at once: every trial has one row, its
    highest-ranked state; nothing is lost."""
    study = str(tmp_path)
    t0 = dt.datetime(2024, 1, 1, tzinfo=UTC)

    def states(k: int) -> list[dict]:
        key = k % 8  # 8 trials: t0..t3 of moco and of sdf, 6 states each
        status = "running" if k % 3 == 0 else "completed"
        return [{"trial_id": f"t{key % 4}", "method": "moco" if key < 4 else "sdf",
                 "status": status, "end_time": t0 + dt.timedelta(seconds=k), "epochs_run": k}]

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda k: write_trials(study, states(k)), range(48)))
    table = load(study, "trials")
    assert table.num_rows == 8
    for row in table.to_pylist():
        key = int(row["trial_id"][1:]) + (0 if row["method"] == "moco" else 4)
        done = [k for k in range(48) if k % 8 == key and k % 3 != 0]
        assert row["status"] == "completed" and row["epochs_run"] == max(done)
    assert load(study, "trial_events").num_rows == 48
    names = [f for _, _, fs in os.walk(tmp_path / "tables" / "trials") for f in fs]
    assert all(n.startswith("trial-") or n == ".lock" for n in names), names


_FINISHER = textwrap.dedent("""
    import sys, time
    from fgray.results.trials import write_trials
    study, worker, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start_at:  # every process writes at the same moment
        time.sleep(0.001)
    for k in range(5):
        write_trials(study, [{"trial_id": f"w{worker}-{k}", "method": ("moco", "lcr")[k % 2],
                              "status": "completed", "epochs_run": k}])
""")


@pytest.mark.slow
def test_trials_finishing_at_the_same_moment_lose_nothing(tmp_path):
    study = str(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start_at = time.time() + 6  # after every process has imported pyarrow
    procs = [subprocess.Popen([sys.executable, "-c", _FINISHER, study, str(w), str(start_at)],
                              env=env) for w in range(4)]
    assert [p.wait(120) for p in procs] == [0] * 4
    expected = [(("moco", "lcr")[k % 2], f"w{w}-{k}") for w in range(4) for k in range(5)]
    _plain_readers_agree(study, expected)
    assert load(study, "trial_events").num_rows == 20


# ---------------------------------------------------------------- killed writers

_WRITER = textwrap.dedent("""
    import hashlib, os, signal, sys, time
    import fgray.results.trials as trials
    study, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "crash-before-rename":
        # Killed between writing the temp file and renaming it over the trial's file.
        def killed(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        trials.os.replace = killed
    i = 0
    while True:
        i += 1
        blob = os.urandom(size).hex()  # incompressible: the write takes a while
        trials.write_trials(study, [{
            "trial_id": "big", "method": "moco", "status": "completed", "epochs_run": i,
            "end_time": time.time(), "error": blob,
            "config_hash": hashlib.sha256(blob.encode()).hexdigest()}])
        if mode != "loop":
            break
        print(i, flush=True)
""")


def _run_writer(study: str, mode: str, size: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, study, mode, str(size)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _check_big_row(study: str) -> int:
    """The trial's row reads whole with every reader; returns the write it holds."""
    rows = _duckdb_trials(study)
    assert [(m, t) for m, t, *_ in rows] == [("moco", "big")]
    epochs = rows[0][3]
    blob, digest = duckdb.sql(
        f"select error, config_hash from read_parquet('{study}/tables/trials/**/*.parquet', "
        "hive_partitioning=true)").fetchall()[0]
    assert hashlib.sha256(blob.encode()).hexdigest() == digest  # not torn
    frame = pd.read_parquet(Path(study) / "tables" / "trials")
    assert len(frame) == 1 and frame["epochs_run"][0] == epochs
    assert load(study, "trials").column("epochs_run").to_pylist() == [epochs]
    assert read_trial(study, "moco", "big")["epochs_run"] == epochs
    return epochs


@pytest.mark.slow
def test_writer_killed_between_temp_write_and_rename(tmp_path):
    study = str(tmp_path)
    write_trials(study, [{"trial_id": "big", "method": "moco", "status": "running",
                          "epochs_run": 0, "error": "0",
                          "config_hash": hashlib.sha256(b"0").hexdigest()}])
    proc = _run_writer(study, "crash-before-rename", 1_000_000)
    assert proc.wait(60) == -signal.SIGKILL
    temps = [f for _, _, fs in os.walk(tmp_path / "tables" / "trials") for f in fs
             if f.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".trial-big.parquet.")
    assert _check_big_row(study) == 0  # the previous state, whole; the temp file unseen
    # The next write replaces the state; an old temp file is cleared away.
    old = time.time() - STALE_TEMP_S - 1
    temp_path = next(Path(d) / f for d, _, fs in os.walk(tmp_path) for f in fs
                     if f.endswith(".tmp"))
    os.utime(temp_path, (old, old))
    write_trials(study, [{"trial_id": "big", "method": "moco", "status": "completed",
                          "epochs_run": 7, "error": "7",
                          "config_hash": hashlib.sha256(b"7").hexdigest()}])
    assert _check_big_row(study) == 7 and not temp_path.exists()


def test_a_writer_killed_before_the_event_leaves_a_history_resume_restores(tmp_path,
                                                                           monkeypatch):
    """`write_trials` writes the state, then its event: a driver killed in between leaves
    trial_events one state short (the multinode study's CI run did), and `restore_events`
    (what --resume runs) appends exactly the missing states, once."""
    import fgray.results.trials as trials

    study = str(tmp_path)
    running = {"trial_id": "a", "method": "moco", "status": "running", "epochs_run": 0}
    write_trials(study, [running, {**running, "trial_id": "b", "method": "lcr"}])
    done = {**running, "status": "completed", "epochs_run": 3, "best_val_knn_top1": 41.5,
            "test_knn_top1": float("nan")}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the state and its event")

    monkeypatch.setattr(trials, "append_files", killed)
    with pytest.raises(KeyboardInterrupt):
        write_trials(study, [done])
    monkeypatch.undo()

    def history() -> list[tuple[str, str]]:
        return sorted((r["trial_id"], r["status"]) for r in load(study, "trial_events")
                      .to_pylist())

    assert read_trial(study, "moco", "a")["status"] == "completed"
    assert history() == [("a", "running"), ("b", "running")]
    restored = restore_events(study)
    assert [(r["trial_id"], r["status"], r["epochs_run"]) for r in restored] == [
        ("a", "completed", 3)]
    assert history() == [("a", "completed"), ("a", "running"), ("b", "running")]
    assert restore_events(study) == []  # NaN metrics compare equal: nothing appended twice


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_a_readable_table(tmp_path):
    """SIGKILL at arbitrary moments of a writer rewriting a ~2 MB trial file in a loop."""
    study = str(tmp_path)
    proc = _run_writer(study, "loop", 1_000_000)
    seen = []
    try:
        for delay in (0.05, 0.13, 0.21):
            line = proc.stdout.readline()  # at least one write done
            assert line.strip()
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            seen.append(_check_big_row(study))
            proc = _run_writer(study, "loop", 1_000_000)
    finally:
        proc.kill()
        proc.wait(30)
    assert seen[0] >= 1
    _check_big_row(study)


# ---------------------------------------------------------------- old layout


def _legacy_append(study: str, rows: list[dict]) -> None:
    """A trials write of the append-only layout (one state row per file)."""
    import pyarrow.fs as pafs

    for row in rows:
        data = to_arrow("trials", [row]).drop_columns(["method"])
        write_file(pafs.LocalFileSystem(), f"{study}/tables/trials/method={row['method']}",
                    data)


def test_old_layout_is_read_then_migrated(tmp_path):
    study = str(tmp_path)
    t0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
    _legacy_append(study, [
        {"trial_id": "a", "method": "moco", "status": "running", "start_time": t0},
        {"trial_id": "a", "method": "moco", "status": "completed", "end_time": t0,
         "best_val_knn_top1": 40.0},
        {"trial_id": "b", "method": "moco", "status": "running", "start_time": t0},
        {"trial_id": "c", "method": "lcr", "status": "stopped", "end_time": t0}])
    # Read as it is: one row per trial for fgray's readers.
    latest = {r["trial_id"]: r["status"] for r in load(study, "trials").to_pylist()}
    assert latest == {"a": "completed", "b": "running", "c": "stopped"}
    assert load(study, "trials", filter={"status": "running"}).column(
        "trial_id").to_pylist() == ["b"]
    assert latest_trial_row(study, "moco", "a")["best_val_knn_top1"] == 40.0

    # The next write of a method moves its old rows into trial_events.
    write_trials(study, [{"trial_id": "b", "method": "moco", "status": "completed",
                          "end_time": t0 + dt.timedelta(hours=1)}])
    moco = os.listdir(tmp_path / "tables" / "trials" / "method=moco")
    assert sorted(moco) == ["trial-a.parquet", "trial-b.parquet"]
    assert any(n.startswith(LEGACY_PREFIX) for n in
               os.listdir(tmp_path / "tables" / "trials" / "method=lcr"))  # not written yet
    record_test(study, "lcr", "c", {"rank1": 50.0}, seed=0)
    assert not any(n.startswith(LEGACY_PREFIX) for n in
                   os.listdir(tmp_path / "tables" / "trials" / "method=lcr"))
    rows = _duckdb_trials(study)
    assert rows == [("lcr", "c", "stopped", None, 50.0), ("moco", "a", "completed", None, None),
                    ("moco", "b", "completed", None, None)]
    events = load(study, "trial_events")
    assert events.num_rows == 4 + 1 + 1  # the old rows, b's new state, c's test


def test_trials_rows_need_a_trial_id_and_valid_values(tmp_path):
    from fgray.errors import UserError

    with pytest.raises(UserError, match="trials row has no trial_id"):
        write_trials(str(tmp_path), [{"method": "moco", "status": "completed"}])
    with pytest.raises(ValueError, match="trials.status: 'done'"):
        write_trials(str(tmp_path), [{"trial_id": "t", "method": "moco", "status": "done"}])
    assert not (tmp_path / "tables").exists()


def test_trial_ids_that_need_quoting_round_trip(tmp_path):
    study = str(tmp_path)
    ids = ["_hidden", ".dot", "a/b", "init:tf_efficientnet_lite0.in1k"]
    write_trials(study, [{"trial_id": t, "method": "init:x", "status": "completed"}
                         for t in ids])
    assert sorted(r[1] for r in _duckdb_trials(study)) == sorted(ids)
    assert read_trial(study, "init:x", "a/b")["status"] == "completed"
    assert load(study, "trials").schema.field("trial_id").type == pa.string()
