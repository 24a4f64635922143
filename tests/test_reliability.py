"""Reliability: exact multi-worker resume (every rank restores its own RNG and augmentation
state), and user-facing failures that end in one line naming the real cause (a read-only
storage, a diverged run) without leaving a run folder behind."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import pretrain_argv

from fgray.cli import main
from fgray.engine.loop import read_checkpoint
from fgray.engine.run import build_pretrainer, latest_checkpoint, load_splits, run_pretraining
from fgray.engine.spec import DataSpec, RunSpec, build_spec
from fgray.errors import UserError

TINY = {"queue_size": "64", "mlp_hidden": "64", "dim": "32"}


def _spec(root, tmp_path, *, epochs=2, batch_size=16, sets=TINY) -> RunSpec:
    data = DataSpec(format="cub", root=str(root), val_fraction=0.25,
                    cache_dir=str(tmp_path / "cache"))
    return build_spec("moco", data, backbone="test_resnet",
                      train={"epochs": epochs, "batch_size": batch_size, "image_size": 32,
                             "knn_k": 10, "visual_every": 0},
                      sets=dict(sets))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.cpu().numpy().tobytes()).hexdigest()[:16]


# ------------------------------------------------------- 1. exact multi-worker resume


class Crash(Exception):
    pass


def _two_rank_worker(rank: int, world: int, init_file: str, spec_dict: dict, out: str) -> None:
    """One rank of a 2-process gloo group: an uninterrupted 2-epoch run, then the same run
    stopped after epoch 1 and resumed from rank 0's checkpoint in fresh Pretrainers."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        spec, out_dir = RunSpec.from_dict(spec_dict), Path(out)
        seen: dict[str, list[dict]] = {"full": [], "resumed": []}

        def recorder(key, trainer_ref, crash_at=None):
            def on_epoch(metrics, _checkpoint):
                t = trainer_ref[0]
                seen[key].append({"epoch": metrics["epoch"], "loss": metrics["loss"],
                                  "augment": _digest(t.augment.state_dict()["gen"]),
                                  "torch_rng": _digest(torch.get_rng_state())})
                if metrics["epoch"] == crash_at:
                    raise Crash
            return on_epoch

        def build(run: str, on_epoch):
            return build_pretrainer(spec, device=torch.device("cpu"), rank=rank,
                                    world_size=world, run_dir=out_dir / run,
                                    on_epoch=on_epoch, progress=False)

        ref: list = [None]
        ref[0] = build("full", recorder("full", ref))
        ref[0].run()

        part: list = [None]
        part[0] = build("part", recorder("part", part, crash_at=1))
        seen["part"] = []
        try:
            part[0].run()
        except Crash:
            pass
        dist.barrier()  # rank 0 has written epoch 1's checkpoint
        resumed: list = [None]
        resumed[0] = build("part", recorder("resumed", resumed))
        resumed[0].resume(latest_checkpoint(out_dir / "part"))
        resumed[0].run()
        (out_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_resume(synth_root, tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("two-rank")
    spec = _spec(synth_root, tmp)
    load_splits(spec.data, spec.train.decoded_size, progress=False)  # one cache, built here
    mp.spawn(_two_rank_worker, args=(2, str(tmp / "pg-init"), spec.to_dict(), str(tmp)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "spec": spec, "ranks": ranks}


def test_two_rank_resume_reproduces_the_uninterrupted_run_on_every_rank(two_rank_resume):
    full = [r["full"] for r in two_rank_resume["ranks"]]
    resumed = [r["resumed"] for r in two_rank_resume["ranks"]]
    # The ranks draw their own augmentations (different seeds), so a resume that gave every
    # rank rank 0's generator would show here.
    assert full[0][0]["augment"] != full[1][0]["augment"]
    for rank in range(2):
        assert [e["epoch"] for e in resumed[rank]] == [2]
        want, got = full[rank][1], resumed[rank][0]
        assert got["augment"] == want["augment"], f"rank {rank}: augmentation state differs"
        assert got["torch_rng"] == want["torch_rng"], f"rank {rank}: torch RNG differs"
        assert got["loss"] == want["loss"], f"rank {rank}: epoch-2 loss differs"


def test_checkpoint_holds_every_ranks_state_as_plain_tensors(two_rank_resume):
    tmp = two_rank_resume["tmp"]
    state = read_checkpoint(latest_checkpoint(tmp / "part"))  # weights_only loading
    assert state["world_size"] == 2
    assert len(state["rng_per_rank"]) == 2 and len(state["augment_per_rank"]) == 2
    assert not torch.equal(state["augment_per_rank"][0]["gen"],
                           state["augment_per_rank"][1]["gen"])
    torch.testing.assert_close(state["augment_per_rank"][0]["gen"], state["augment"]["gen"])


def test_resume_at_another_world_size_warns_and_falls_back(two_rank_resume):
    tmp, spec = two_rank_resume["tmp"], two_rank_resume["spec"]
    trainer = build_pretrainer(spec, device=torch.device("cpu"), run_dir=None, progress=False)
    with pytest.warns(RuntimeWarning, match="written by 2 workers, resumed with 1"):
        trainer.resume(latest_checkpoint(tmp / "full"))
    state = read_checkpoint(latest_checkpoint(tmp / "full"))
    assert torch.equal(trainer.augment.state_dict()["gen"], state["augment_per_rank"][0]["gen"])
    assert trainer.epoch == 2


def test_single_worker_checkpoint_resumes_without_warning(synth_root, tmp_path):
    spec = _spec(synth_root, tmp_path, epochs=1)
    run_pretraining(spec, tmp_path / "run", resume=False, progress=False)
    state = read_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["world_size"] == 1 and len(state["rng_per_rank"]) == 1
    trainer = build_pretrainer(spec, device=torch.device("cpu"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.resume(latest_checkpoint(tmp_path / "run"))


# ------------------------------------------------------- 2. one line, the real cause


def _pretrain_argv(root, tmp_path, storage, *extra) -> list[str]:
    return pretrain_argv("moco", root, tmp_path, "queue_size=64", "mlp_hidden=64", "dim=32",
                         "knn_k=10", *extra, name="r", storage=storage, val_fraction=0.25)


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_storage_under_a_file_is_one_line(synth_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    before = _tree(tmp_path)
    assert main(_pretrain_argv(synth_root, tmp_path, tmp_path / "afile" / "runs")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--storage" in err and "is not a folder" in err, err
    assert _tree(tmp_path) == before  # nothing created, not even the cache


def test_read_only_storage_is_one_line_and_leaves_nothing(synth_root, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:  # root (CI containers) writes through permission bits: nothing to test then
            fd, name = tempfile.mkstemp(dir=ro)
        except OSError:
            pass
        else:
            os.close(fd)
            os.unlink(name)
            pytest.skip("this user can write into a read-only folder (root)")
        assert main(_pretrain_argv(synth_root, tmp_path, ro / "runs")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not writable" in err, err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_check_writable_names_the_folder_and_creates_nothing(tmp_path, monkeypatch):
    from fgray import storage

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(storage.checks.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"--storage .*deep: not writable \(nearest existing "
                                        r"folder .*\): Read-only file system"):
        storage.check_writable(tmp_path / "new" / "deep", "--storage")
    assert not (tmp_path / "new").exists()


def test_a_user_error_before_training_leaves_no_run_folder(synth_root, tmp_path, capsys):
    argv = _pretrain_argv(synth_root, tmp_path, tmp_path / "runs")
    argv[argv.index("--batch-size") + 1] = "4096"
    assert main(argv) == 2
    assert "batch size 4096 exceeds the train split" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()
    assert not (tmp_path / "runs" / "tables").exists()  # no "failed" row for a run never run
    spec = _spec(synth_root, tmp_path, batch_size=4096)
    with pytest.raises(UserError, match="exceeds the train split"):
        run_pretraining(spec, tmp_path / "direct", progress=False)
    assert not (tmp_path / "direct").exists()


def test_nan_weights_after_the_last_step_are_reported_as_divergence(synth_root, tmp_path):
    """The last step of epoch 1 leaves NaN weights after its loss was read: the run must stop
    on the weights, naming the epoch, not in the kNN evaluation blaming the features."""
    spec = _spec(synth_root, tmp_path, epochs=2)
    trainer = build_pretrainer(spec, device=torch.device("cpu"), progress=False)
    step, calls = trainer.optimizer.step, {"n": 0}

    def poisoned_step(*args, **kwargs):
        out = step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == trainer.steps_per_epoch:  # the last step of epoch 1
            with torch.no_grad():
                next(trainer.method.backbone.parameters()).fill_(math.nan)
        return out

    trainer.optimizer.step = poisoned_step
    with pytest.raises(FloatingPointError, match=r"non-finite weights after epoch 1: backbone\."):
        trainer.run()
    assert trainer.history == []


def test_overflowing_model_is_a_divergence_not_a_data_error(synth_root, tmp_path, capsys):
    """lr 1e30 with one step per epoch: the loss read is finite, the weights finite but huge,
    and the embeddings overflow. Reported as divergence at epoch 1, never as NaN data."""
    argv = _pretrain_argv(synth_root, tmp_path, tmp_path / "runs", "lr=1e30")
    argv[argv.index("--batch-size") + 1] = "64"  # 1 step per epoch
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged" in err and "epoch 1" in err, err
    assert "train_features" not in err


# ------------------------------------------------------- 1b. the same through Ray Train


@pytest.mark.slow
def test_ray_train_worker_restart_reproduces_the_uninterrupted_run(synth_root, tmp_path,
                                                                   local_ray, exit_once):
    """2 Ray Train workers: rank 1 dies after training epoch 2 (before reporting it), the group
    restarts from epoch 1's checkpoint; epochs 2 and 3 match an uninterrupted run exactly."""
    from fgray.train.recording import RANKS_DIR
    from fgray.train.resources import WorkerResources
    from fgray.train.trainer import build_trainer, run_trainer

    spec = _spec(synth_root, tmp_path, epochs=3)
    load_splits(spec.data, spec.train.decoded_size, progress=False)
    storage = str(tmp_path / "runs")
    resources = WorkerResources(workers=2)
    fault, marker = exit_once(at_epoch=2, on_rank=1)
    run_trainer(build_trainer(spec, name="full", storage=storage, resources=resources,
                              max_failures=0, keep_best=1))
    run_trainer(build_trainer(spec, name="restarted", storage=storage, resources=resources,
                              max_failures=2, keep_best=1, epoch_hooks=[fault]))
    assert marker.is_file()  # rank 1 did die once

    def epochs(name):
        files = sorted((Path(storage) / name / RANKS_DIR).glob("epoch-*.json"))
        return [json.loads(f.read_text()) for f in files]

    full, restarted = epochs("full"), epochs("restarted")
    assert len(full) == len(restarted) == 3
    for want, got in zip(full, restarted):
        for rank in range(2):
            assert got[rank]["epoch"] == want[rank]["epoch"]
            assert got[rank]["loss"] == want[rank]["loss"], (rank, got[rank], want[rank])
            assert got[rank]["param_checksum"] == want[rank]["param_checksum"]
