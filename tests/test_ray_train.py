"""Ray Train around the engine: 2 CPU workers with gloo keep identical parameters, a worker
killed mid-run restarts the group from the last checkpoint with every epoch reported once,
and a rerun of the same name resumes instead of retraining."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fgray.engine.spec import DataSpec, build_spec
from fgray.errors import UserError
from fgray.results.tables import latest_trials, load
from fgray.storage import absolute
from fgray.train.checkpoints import best_checkpoint_dir
from fgray.train.hooks import check_epoch_hooks, load_epoch_hook
from fgray.train.recording import RANKS_DIR
from fgray.train.resources import WorkerResources, resolve_resources

EPOCHS = 3
FAIL_AT = 2


def test_worker_resources():
    res = WorkerResources(workers=2, cpus_per_worker=1.5)
    scaling = res.scaling_config()
    assert scaling.num_workers == 2 and not scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 1.5}
    assert res.torch_config().backend == "gloo" and res.cpus == 3.0 and res.gpus == 0
    gpu = WorkerResources(workers=4, gpus_per_worker=1)
    assert gpu.torch_config().backend == "nccl" and gpu.scaling_config().use_gpu
    assert gpu.scaling_config().resources_per_worker == {"CPU": 1.0, "GPU": 1}
    assert resolve_resources(2, cluster_gpus=8).gpus_per_worker == 1.0
    assert resolve_resources(2, cluster_gpus=0).gpus_per_worker == 0.0
    assert resolve_resources(1, gpus_per_worker=0.25, cluster_gpus=1).gpus_per_worker == 0.25
    with pytest.raises(UserError, match="NCCL needs a whole GPU per rank"):
        WorkerResources(workers=2, gpus_per_worker=0.5)
    with pytest.raises(UserError, match="--workers -1: expected 0"):
        WorkerResources(workers=-1)
    assert WorkerResources(workers=0).cpus == 1.0  # the trial's own process: one share
    assert absolute("s3://bucket/x/") == "s3://bucket/x"
    assert absolute("runs") == os.path.abspath("runs")


def _record(epoch, rank, run_uri, metrics, *, into=None):
    (into if into is not None else CALLS).append((epoch, rank, run_uri, dict(metrics)))


CALLS: list = []


def test_epoch_hooks_are_callables_or_dotted_names():
    """A hook is a callable, 'package.module:name' (or 'package.module.name'), or a mapping
    with the name and keyword arguments; anything else is a one-line user error, and a name
    is imported only where the hook runs."""
    mine: list = []
    for spec in (lambda *a: mine.append(a), f"{__name__}:_record", f"{__name__}._record",
                 {"hook": f"{__name__}:_record", "kwargs": {"into": mine}}):
        load_epoch_hook(spec)(1, 0, "runs/x", {"epoch": 1})
    assert len(mine) == 2 and CALLS[-2:] == [(1, 0, "runs/x", {"epoch": 1})] * 2
    assert check_epoch_hooks(["no.such.module:hook"]) == ("no.such.module:hook",)
    with pytest.raises(UserError, match="cannot import it"):
        load_epoch_hook("no.such.module:hook")
    with pytest.raises(UserError, match="not callable"):
        load_epoch_hook(f"{__name__}:CALLS")
    for bad in ("hook", {"hook": "m:f", "args": []}, {"kwargs": {}}, 3):
        with pytest.raises(UserError, match="epoch hook"):
            check_epoch_hooks([bad])


@pytest.fixture(scope="module")
def failed_once_run(synth_root, tmp_path_factory, local_ray, exit_once):
    """One 2-worker run in which rank 1 dies after training epoch 2, before reporting it."""
    from fgray.train.trainer import ray_pretrain

    tmp = tmp_path_factory.mktemp("raytrain")
    fault, marker = exit_once(at_epoch=FAIL_AT, on_rank=1)
    spec = build_spec("moco", DataSpec(format="cub", root=str(synth_root),
                                       cache_dir=str(tmp / "cache")),
                      backbone="test_resnet",
                      train={"epochs": EPOCHS, "batch_size": 32, "image_size": 32, "seed": 1},
                      sets={"queue_size": 64, "mlp_hidden": 32})
    storage = str(tmp / "runs")
    run = ray_pretrain(spec, name="ddp", storage=storage, workers=2, max_failures=2,
                       keep_best=1, epoch_hooks=[fault])
    first_epochs = load(storage, "epochs").to_pylist()
    again = ray_pretrain(spec, name="ddp", storage=storage, workers=2, keep_best=1)
    return {"run": Path(run), "again": Path(again), "storage": storage, "marker": marker,
            "first_epochs": first_epochs}


@pytest.mark.slow
def test_ranks_keep_identical_parameters(failed_once_run):
    run = failed_once_run["run"]
    files = sorted((run / RANKS_DIR).glob("epoch-*.json"))
    assert [f.name for f in files] == [f"epoch-{e:04d}.json" for e in range(1, EPOCHS + 1)]
    for f in files:
        ranks = json.loads(f.read_text())
        assert len(ranks) == 2
        assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
        assert ranks[0]["loss"] == ranks[1]["loss"]  # all-reduced
        assert "val_knn_top1" in ranks[0] and "val_knn_top1" not in ranks[1]  # rank 0 evaluates


@pytest.mark.slow
def test_killed_worker_resumes_with_each_epoch_once(failed_once_run):
    assert failed_once_run["marker"].is_file()  # rank 1 did exit hard once
    epochs = failed_once_run["first_epochs"]
    assert sorted(e["epoch"] for e in epochs) == list(range(1, EPOCHS + 1))
    trials = latest_trials(load(failed_once_run["storage"], "trials").to_pylist())
    assert len(trials) == 1 and trials[0]["status"] == "completed"
    assert trials[0]["epochs_run"] == EPOCHS
    val = {e["epoch"]: e["val_knn_top1"] for e in epochs}
    best_val = max(val.values())
    assert trials[0]["best_val_knn_top1"] == best_val
    # Kept: a checkpoint with the best val kNN top-1 (Ray keeps the later one of a tie) and
    # the latest.
    kept = sorted(p.name for p in failed_once_run["run"].glob("epoch-*") if p.is_dir())
    assert f"epoch-{EPOCHS:04d}" in kept and len(kept) <= 2
    assert best_val in {val[int(name[-4:])] for name in kept}
    chosen = best_checkpoint_dir(str(failed_once_run["run"]))
    assert val[int(chosen[-4:])] == best_val
    assert (Path(chosen) / "checkpoint.pt").is_file() and (Path(chosen) / "splits.json").is_file()
    assert json.loads((Path(chosen) / "metrics.json").read_text())["val_knn_top1"] == best_val


@pytest.mark.slow
def test_rerun_of_the_same_name_resumes(failed_once_run):
    assert failed_once_run["again"] == failed_once_run["run"]
    epochs = load(failed_once_run["storage"], "epochs").to_pylist()
    assert sorted(e["epoch"] for e in epochs) == list(range(1, EPOCHS + 1))  # nothing retrained


def test_a_killed_workers_scratch_is_removed_by_the_next_worker(tmp_path):
    """A SIGKILLed trial never removes its scratch; the next worker on the host does, and
    only the scratch of processes that no longer run."""
    import subprocess
    import sys

    from fgray.storage import scratch_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"fgray-worker-{dead.pid}-k1ll3d"
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes(b"weights")
    alive = tmp_path / f"fgray-worker-{os.getppid()}-r4nn1n"  # pytest's parent runs
    alive.mkdir()
    unnamed = tmp_path / "fgray-worker-0lup00wh"  # no pid in the name: left alone
    unnamed.mkdir()
    new = scratch_folder("worker", str(tmp_path))
    assert not stale.exists() and alive.is_dir() and unnamed.is_dir()
    assert new.is_dir() and new.parent == tmp_path
    assert new.name.startswith(f"fgray-worker-{os.getpid()}-")
