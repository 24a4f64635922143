"""A study on a simulated two-node cluster with its storage in a real S3 API (moto's server):
trials on both nodes, the study read back from the bucket by every reader a user has, and a
driver killed mid-study resumed from the bucket alone, as a replacement head would.

The nodes are started *without* any AWS_* variable: only the driver has them. Every trial
reaches the bucket because the driver hands its storage variables to the job's runtime_env
(`fgray.train.cluster.storage_env`), the path a user's cluster takes when its nodes were not
started with the bucket's endpoint or keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fgray.results.tables import latest_trials, load
from fgray.storage import join, local_copy, resolve

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRIALS = 4


def _args(synth_root, cache: Path, storage: str) -> list[str]:
    return [PYTHON, str(REPO / "studies" / "cub_sweep.py"), "--data-root", str(synth_root),
            "--preset", "smoke", "--methods", "moco", "--trials", str(TRIALS), "--epochs", "2",
            "--backbone", "test_resnet", "--init", "random", "--image-size", "32",
            "--set", "queue_size=64", "--set", "mlp_hidden=32", "--workers", "0",
            "--grace-period", "2", "--concurrency", "2", "--batch-size", "16",
            "--val-fraction", "0.5", "--seeds", "1", "--protocols", "knn",
            "--cache-dir", str(cache), "--storage", storage, "--name", "two"]


def _done(study: str) -> list[dict]:
    try:
        rows = latest_trials(load(study, "trials").to_pylist())
    except Exception:  # noqa: BLE001 - nothing written yet
        return []
    return [r for r in rows if r["method"] == "moco" and r.get("status") == "completed"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_two_node_study_in_a_bucket_is_read_back_and_survives_its_driver(
        s3_server, synth_root, tmp_path, monkeypatch):
    from twonode import ray_cluster

    bucket = s3_server.bucket()
    storage = f"s3://{bucket}/studies"
    study = join(storage, "two")
    with ray_cluster(nodes=2, cpus=1) as cluster:  # started before any AWS_* is set
        nodes = set(cluster.node_ids())
        for key, value in s3_server.env().items():  # this process reads the bucket too
            monkeypatch.setenv(key, value)

        def driver_env(name: str) -> tuple[dict, Path]:
            home = tmp_path / name  # a fresh working folder and cache: a new head machine
            (home / "cwd").mkdir(parents=True)
            return ({**os.environ, "RAY_ADDRESS": cluster.address,
                     "FGRAY_CACHE": str(home / "fgray-cache")}, home)

        env, first_home = driver_env("first")
        args = _args(synth_root, tmp_path / "data-cache", storage)
        with open(tmp_path / "first.log", "w") as log:
            driver = subprocess.Popen(args, env=env, cwd=first_home / "cwd", stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 600
            # Killed once a trial has completed on each node: a completed trial is never rerun,
            # so its row keeps the node it ran on (a trial still running at the kill may be
            # restarted on the other node, and on a loaded machine node B's first trial can
            # finish after node A's second one, which the kill used to cut short).
            while (time.time() < deadline and driver.poll() is None
                   and {r["node_id"] for r in _done(study)} != nodes):
                time.sleep(1)
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            os.killpg(driver.pid, signal.SIGKILL)  # the head machine is lost with its driver
            driver.wait(60)
        before = {r["trial_id"]: r for r in _done(study)}
        assert before

        env, second_home = driver_env("second")
        second = subprocess.run([*args, "--resume"], env=env, cwd=second_home / "cwd",
                                capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]

    # -- 3c: nothing repeated, nothing duplicated -------------------------------------------
    from fgray.tune.study import LOST

    rows = latest_trials(load(study, "trials").to_pylist())
    assert not [r for r in rows if r["status"] == "running"]
    searched = [r for r in rows if r["method"] == "moco" and r.get("error") != LOST]
    assert len(searched) == TRIALS, ([(r["trial_id"], r["status"], r.get("error")) for r in rows],
                                     second.stdout[-3000:])
    events = load(study, "trial_events").to_pylist()
    for trial_id, first in before.items():
        terminal = [e for e in events if e["trial_id"] == trial_id
                    and e["status"] != "running" and e["test_knn_top1"] is None]
        assert [e["status"] for e in terminal] == ["completed"], trial_id  # never rerun
        assert latest_trials([r for r in rows if r["trial_id"] == trial_id])[0][
            "epochs_run"] == first["epochs_run"]
    epochs = Counter((e["trial_id"], e["epoch"]) for e in load(study, "epochs").to_pylist())
    assert epochs and max(epochs.values()) == 1  # every epoch recorded once
    # -- 3a: the trials ran on both nodes ----------------------------------------------------
    ran_on = {r["node_id"] for r in searched}
    assert ran_on == nodes, [(r["trial_id"], r["node_id"], r["status"]) for r in rows]
    # -- 3a: every reader reads the study from the bucket ------------------------------------
    results = subprocess.run([PYTHON, "-m", "fgray.cli", "results", study], env=dict(os.environ),
                             capture_output=True, text=True, timeout=300)
    assert results.returncode == 0, results.stderr
    assert "moco" in results.stdout and "init" in results.stdout

    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    fs, root = resolve(study)
    trials = pads.dataset(f"{root}/tables/trials", filesystem=fs, format="parquet",
                          partitioning="hive")
    con = duckdb.connect()
    con.register("trials", trials)
    per_trial = con.sql("select trial_id, count(*) as n from trials group by trial_id"
                        ).fetchall()
    assert per_trial and all(n == 1 for _, n in per_trial)  # one row per trial
    assert {t for t, _ in per_trial} == {r["trial_id"] for r in rows}
    frame = pd.read_parquet(f"{root}/tables/epochs", filesystem=fs)
    assert not frame.duplicated(["trial_id", "epoch"]).any()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    best = max(searched, key=lambda r: r["best_val_knn_top1"])
    with local_copy(join(study, "tensorboard", "moco", best["trial_id"])) as run:
        board = EventAccumulator(str(run))
        board.Reload()
        steps = [e.step for e in board.Scalars("val/knn_top1")]
    assert steps == list(range(1, best["epochs_run"] + 1))

    from optuna_dashboard._storage_url import get_storage

    with local_copy(join(study, "optuna", "journal.log")) as journal:
        storage_ = get_storage(str(journal))
        summaries = storage_.get_all_studies()
        assert [s.study_name for s in summaries] == ["moco"]
        told = storage_.get_all_trials(summaries[0]._study_id)
        assert len([t for t in told if t.state.is_finished()]) >= TRIALS
    # Nothing of the study on the heads' local disks, outside the caches (the journal's
    # local copy, which Optuna needs to append to, under FGRAY_CACHE).
    for home in (first_home, second_home):
        assert _files(home / "cwd") == []
        assert all(f.startswith("fgray-cache/journals/") for f in _files(home)), _files(home)
    keys = s3_server.keys(bucket)
    (tmp_path / "bucket-keys.txt").write_text("\n".join(keys) + "\n")
    print(f"\nbucket {bucket}: {len(keys)} keys")
    for key in keys:
        print(f"  {key}")
    tops = {k.split("/")[2] for k in keys}
    assert {"study.json", "tables", "tensorboard", "optuna", "tune", "train"} <= tops, tops
    assert json.loads(s3_server.client().get_object(
        Bucket=bucket, Key="studies/two/study.json")["Body"].read())["methods"] == ["moco"]
