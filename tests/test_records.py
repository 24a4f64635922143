"""EpochRecorder and friends: per-epoch metrics into the epochs table and TensorBoard, trial
rows, test evaluations, and `fgray pretrain --workers 0` showing up in `fgray results`."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
from conftest import pretrain_argv
from tensorboard.backend.event_processing import event_accumulator as ea

from fgray.cli import main
from fgray.engine.spec import DataSpec, build_spec
from fgray.results.records import (
    EpochRecorder,
    best_epoch,
    config_hash,
    format_epoch,
    git_revision,
    record_init,
    record_test,
    trial_history,
    weights_name,
)
from fgray.results.report import leaderboard, results_command
from fgray.results.tables import latest_trials, load

TINY = {"queue_size": 64, "mlp_hidden": 32}


def _spec(seed: int = 3, lr: float = 0.05):
    return build_spec("moco", DataSpec(format="cub", root="/data/cub"), backbone="test_resnet",
                      train={"epochs": 4, "batch_size": 16, "image_size": 32, "seed": seed},
                      sets={**TINY, "lr": lr})


def _metrics(epoch: int, val: float | None) -> dict:
    m = {"epoch": epoch, "loss": 5.0 - epoch, "loss_infonce": 5.0 - epoch, "lr": 0.01 * epoch,
         "epoch_time_s": 2.0, "images_per_s": 50.0 + epoch, "peak_mem_mb": 100.0,
         "checkpoint_path": "/somewhere/epoch-0001"}
    if val is not None:
        m.update(val_knn_top1=val, val_knn_top5=val + 10)
    return m


def test_epoch_rows_and_tensorboard_scalars(tmp_path):
    study = str(tmp_path)
    recorder = EpochRecorder(study, "t1", _spec(), study="s1", params={"lr": 0.05})
    vals = [20.0, 35.5, 30.0]
    for epoch, val in enumerate(vals, start=1):
        recorder(_metrics(epoch, val))
    recorder.close()

    rows = sorted(load(study, "epochs").to_pylist(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["val_knn_top1"] for r in rows] == vals
    assert [r["loss_infonce"] for r in rows] == [4.0, 3.0, 2.0]
    assert {r["method"] for r in rows} == {"moco"} and {r["study"] for r in rows} == {"s1"}
    assert "checkpoint_path" not in rows[0]  # bookkeeping, not a measurement

    run = tmp_path / "tensorboard" / "moco" / "t1"
    acc = ea.EventAccumulator(str(run), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("val/knn_top1")] == vals
    assert [e.step for e in acc.Scalars("loss/infonce")] == [1, 2, 3]
    assert "train/epoch" not in acc.Tags()["scalars"]


def test_finish_writes_one_trial_row(tmp_path):
    study = str(tmp_path)
    spec = _spec(seed=3)
    recorder = EpochRecorder(study, "t1", spec, study="s1", params={"lr": 0.05}, cpus=4,
                             gpus=0.5, start_time=1_000.0)
    history = [_metrics(1, 20.0), _metrics(2, 35.5), _metrics(3, 35.5), _metrics(4, None)]
    row = recorder.trial_row(history, "completed", end_time=1_000.0 + 7200)
    assert row["best_val_knn_top1"] == 35.5 and row["best_epoch"] == 2  # first of the ties
    assert row["epochs_run"] == 4 and row["seed"] == 3
    assert row["wall_time_s"] == 7200
    assert row["cpu_hours"] == pytest.approx(8.0) and row["gpu_hours"] == pytest.approx(1.0)
    assert row["param.lr"] == 0.05
    params = json.loads(row["params_json"])
    assert params["lr"] == 0.05 and params["queue_size"] == 64
    # MoCo's EMA momentum and SGD's momentum share a name: both are kept.
    assert params["momentum"] == spec.method_config.momentum
    assert params["optim.momentum"] == spec.optim.momentum

    recorder.finish(history, "completed")
    trials = load(study, "trials").to_pylist()
    assert len(trials) == 1 and trials[0]["trial_id"] == "t1"
    assert trials[0]["status"] == "completed" and trials[0]["backbone"] == "test_resnet"
    assert trials[0]["init"] == "random"
    assert trials[0]["config_hash"] == config_hash(spec)


def test_weights_are_named_with_their_tag(tmp_path):
    assert weights_name("tf_efficientnet_lite0", "imagenet") == "tf_efficientnet_lite0.in1k"
    assert weights_name("resnet50", "imagenet") == "resnet50.a1_in1k"  # timm's default tag
    assert weights_name("resnet50.tv_in1k", "imagenet") == "resnet50.tv_in1k"
    assert weights_name("resnet50", "random") == "resnet50"
    assert weights_name("resnet50", "/w/r50.pth") == "resnet50"  # the path is the init column
    spec = build_spec("moco", DataSpec(format="cub", root="/data/cub"),
                      backbone="tf_efficientnet_lite0", init="imagenet",
                      train={"epochs": 1, "batch_size": 16, "image_size": 32})
    row = EpochRecorder(str(tmp_path), "t", spec).trial_row([], "completed")
    assert (row["backbone"], row["init"]) == ("tf_efficientnet_lite0.in1k", "imagenet")


def test_record_init_is_a_completed_row_with_evals(tmp_path):
    study = str(tmp_path)
    spec = _spec(seed=0)
    metrics = {"rank1": 21.0, "knn_top1": 18.0, "loc_box_mass": 0.41, "loc_pointing": 0.7,
               "val_knn_top1": 17.5}
    row = record_init(study, "init", spec, metrics, study="s1", start_time=100.0)
    assert (row["method"], row["trial_id"], row["status"]) == ("init", "init", "completed")
    assert row["best_val_knn_top1"] == 17.5 and row["epochs_run"] == 0
    assert row["test_loc_box_mass"] == 0.41 and row["test_knn_top1"] == 18.0
    assert json.loads(row["params_json"]) == {"backbone": "test_resnet", "init": "random",
                                             "image_size": 32}
    evals = {(e["split"], e["protocol"], e["metric"]): e["value"]
             for e in load(study, "evals").to_pylist()}
    assert evals == {("test", "retrieval", "rank1"): 21.0, ("test", "knn", "top1"): 18.0,
                     ("test", "localisation", "box_mass"): 0.41,
                     ("test", "localisation", "pointing"): 0.7, ("val", "knn", "top1"): 17.5}
    (board,) = leaderboard(study)
    assert board["method"] == "init" and board["is_init"] and board["val_knn_top1"] == 17.5
    assert board["test_loc_pointing"] == 0.7


def test_config_hash_ignores_only_the_seed():
    assert config_hash(_spec(seed=1)) == config_hash(_spec(seed=2))
    assert config_hash(_spec(lr=0.05)) != config_hash(_spec(lr=0.06))
    base = _spec(seed=1)
    assert config_hash(base) == dataclasses.replace(
        base, train=dataclasses.replace(base.train, seed=0)).hash()


def test_best_epoch_and_format():
    assert best_epoch([{"epoch": 1}, {"epoch": 2, "val_knn_top1": float("nan")}]) == (None, None)
    assert best_epoch([_metrics(1, 10.0), _metrics(2, 12.0)]) == (12.0, 2)
    line = format_epoch(_metrics(2, 12.0))
    assert line.startswith("epoch 2  loss 3.0000") and "val kNN top-1 12.00" in line


def test_recorder_pickles_without_its_writer(tmp_path):
    recorder = EpochRecorder(str(tmp_path), "t1", _spec())
    recorder(_metrics(1, 10.0))
    copy = pickle.loads(pickle.dumps(recorder))
    assert copy._writer is None and copy.start_time == recorder.start_time
    copy(_metrics(2, 11.0))
    copy.close()
    recorder.close()
    assert [r["epoch"] for r in trial_history(str(tmp_path), "moco", "t1")] == [1, 2]


def test_the_controllers_callback_unpickles_and_records_without_torch(tmp_path):
    """Ray Train's controller unpickles `RecordEpochs` in a fresh process: it must not import
    torch there (4-5 s of every Train run's start-up), and it must still record the epoch."""
    import subprocess
    import sys

    from fgray.train.recording import RecordEpochs

    callback = RecordEpochs(str(tmp_path / "run"), EpochRecorder(str(tmp_path), "t1", _spec(),
                                                                 study="s1"))
    (tmp_path / "callback.pkl").write_bytes(pickle.dumps(callback))
    code = (
        "import pickle, sys\n"
        f"callback = pickle.loads(open({str(tmp_path / 'callback.pkl')!r}, 'rb').read())\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        f"callback.after_report(None, [{_metrics(1, 10.0)!r}], None)\n"
        "print(','.join(heavy) or 'none')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"
    [row] = trial_history(str(tmp_path), "moco", "t1")
    assert row["epoch"] == 1 and row["val_knn_top1"] == 10.0


def test_trial_history_keeps_one_row_per_epoch(tmp_path):
    recorder = EpochRecorder(str(tmp_path), "t1", _spec())
    for epoch, val in ((1, 10.0), (2, 11.0), (2, 11.0), (3, 12.0)):
        recorder(_metrics(epoch, val))
    recorder.close()
    assert [r["epoch"] for r in trial_history(str(tmp_path), "moco", "t1")] == [1, 2, 3]
    assert trial_history(str(tmp_path / "empty"), "moco", "t1") == []


def test_record_test_adds_evals_and_test_columns(tmp_path):
    study = str(tmp_path)
    recorder = EpochRecorder(study, "t1", _spec())
    recorder.finish([_metrics(1, 40.0)], "completed")
    metrics = {"rank1": 61.0, "rank5": 80.0, "map": 33.0, "knn_top1": 58.0, "knn_top5": 90.0,
               "linear_top1": 64.0, "linear_top5": 91.0, "loc_box_mass": 0.4,
               "loc_pointing": 0.75, "loc_part_hits": 0.5}
    row = record_test(study, "moco", "t1", metrics, seed=3, study="s1")
    assert row["test_rank1"] == 61.0 and row["test_linear_top1"] == 64.0
    assert row["test_knn_top5"] == 90.0 and row["test_loc_part_hits"] == 0.5
    evals = load(study, "evals").to_pylist()
    got = {(e["protocol"], e["metric"]): e["value"] for e in evals}
    assert got == {("retrieval", "rank1"): 61.0, ("retrieval", "rank5"): 80.0,
                   ("retrieval", "map"): 33.0, ("knn", "top1"): 58.0, ("knn", "top5"): 90.0,
                   ("linear", "top1"): 64.0, ("linear", "top5"): 91.0,
                   ("localisation", "box_mass"): 0.4, ("localisation", "pointing"): 0.75,
                   ("localisation", "part_hits"): 0.5}
    assert {e["split"] for e in evals} == {"test"} and {e["seed"] for e in evals} == {3}
    latest = latest_trials(load(study, "trials").to_pylist())
    assert len(latest) == 1 and latest[0]["test_map"] == 33.0
    board = leaderboard(study)
    assert board[0]["test_rank1"] == 61.0 and board[0]["best_trial"] == "t1"
    assert board[0]["test_loc_pointing"] == 0.75


def test_git_revision_reads_refs_without_git(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / "pkg").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    assert git_revision(repo / "pkg" / "mod.py") == "a" * 40
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs\n{'b' * 40} refs/heads/main\n")
    assert git_revision(repo / "pkg") == "b" * 40
    (repo / ".git" / "HEAD").write_text("c" * 40 + "\n")
    assert git_revision(repo / "pkg") == "c" * 40
    lone = tmp_path / "elsewhere"
    lone.mkdir()
    assert git_revision(lone) is None


TINY_MOCO = ("queue_size=64", "mlp_hidden=32")  # the `--set`s of a tiny MoCo run


def test_pretrain_in_process_shows_in_results(synth_root, tmp_path, capsys):
    storage = tmp_path / "runs"
    code = main(pretrain_argv("moco", synth_root, tmp_path, *TINY_MOCO, name="run1", epochs=2,
                              batch_size=32))
    assert code == 0
    out = capsys.readouterr().out
    assert "epoch 2" in out
    trials = load(str(storage), "trials").to_pylist()
    assert [t["trial_id"] for t in trials] == ["run1"]
    assert trials[0]["status"] == "completed" and trials[0]["epochs_run"] == 2
    metrics = [json.loads(x) for x in (storage / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert trials[0]["best_val_knn_top1"] == max(m["val_knn_top1"] for m in metrics)
    assert len(load(str(storage), "epochs")) == 2
    board = results_command(str(storage), "wide")  # the trial id is a wide column
    assert "run1" in board and "moco" in board
    revision = git_revision()
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    if head.is_file():
        assert revision is not None and len(revision) == 40
    assert trials[0]["git_revision"] == revision


def test_diverged_run_is_recorded_as_failed(synth_root, tmp_path, capsys):
    storage = tmp_path / "runs"
    code = main(pretrain_argv("moco", synth_root, tmp_path, *TINY_MOCO, "lr=1e30", name="nan",
                              batch_size=32))
    assert code == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and len(err.strip().splitlines()) == 1
    trials = load(str(storage), "trials").to_pylist()
    assert trials[0]["status"] == "failed"
    assert trials[0]["error"].startswith("FloatingPointError: non-finite loss")
