"""The SSL core: MoCo losses and queue, the schedule, exact resume, the CLI's pretrain/eval."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_momentum_step, pretrain_argv

from fgray.cli import main
from fgray.engine.optim import LARS, lr_factor
from fgray.engine.run import run_pretraining
from fgray.engine.spec import DataSpec, RunSpec, build_spec
from fgray.errors import UserError
from fgray.methods import build_method
from fgray.methods.base import StepInfo
from fgray.methods.common import cosine_momentum, info_nce_in_batch, info_nce_queue

TINY = {"queue_size": "64", "mlp_hidden": "64", "dim": "32"}


def test_info_nce_queue_matches_a_manual_softmax():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    expected = 0.0
    for i in range(4):
        pos = math.exp(float(q[i] @ k[i]) / 0.2)
        neg = sum(math.exp(float(q[i] @ queue[j]) / 0.2) for j in range(10))
        expected += -math.log(pos / (pos + neg)) / 4
    assert float(info_nce_queue(q, k, queue, 0.2)) == pytest.approx(expected, rel=1e-5)


def test_info_nce_in_batch_is_scaled_by_2t():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    logits = q @ k.t() / 0.3
    expected = F.cross_entropy(logits, torch.arange(5)) * 0.6
    torch.testing.assert_close(info_nce_in_batch(q, k, 0.3), expected)


def test_queue_wraps_when_the_batch_does_not_divide_it():
    torch.manual_seed(0)
    m = build_method("moco", backbone="test_resnet", image_size=32,
                     overrides={**TINY, "queue_size": "10"})
    keys = F.normalize(torch.randn(7, 32), dim=1)
    m.enqueue(keys)
    m.enqueue(keys * -1)
    torch.testing.assert_close(m.queue[:4], -keys[3:])  # second batch wrapped to the front
    torch.testing.assert_close(m.queue[4:7], keys[4:7])
    torch.testing.assert_close(m.queue[7:10], -keys[:3])
    assert int(m.queue_ptr) == 4


def test_moco_v2_step_updates_query_not_key_and_momentum_moves_key():
    torch.manual_seed(0)
    m = build_method("moco", backbone="test_resnet", image_size=32, overrides=TINY)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    terms = m(x1, x2, StepInfo(0, 0, 0.0))
    terms["loss"].backward()
    assert all(p.grad is None for p in m.backbone_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    assert_momentum_step(m, 0.5, 0.999)  # MoCo v2's momentum is constant


def test_moco_v3_momentum_ramps_along_a_cosine():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    torch.manual_seed(0)
    m = build_method("mocov3", backbone="test_vit", image_size=32,
                     overrides={"mlp_hidden": "64", "dim": "32"})
    terms = m(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), StepInfo(0, 0, 0.0))
    assert set(terms) == {"loss", "infonce"} and terms["loss"].requires_grad
    assert m.embed(torch.randn(2, 3, 32, 32)).shape == (2, m.backbone.num_features)


def test_warmup_cosine_schedule_and_lars():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.1)
    w.grad = torch.tensor([[0.0, 10.0]])
    opt.step()  # trust ratio 0.1 * 5 / 10 = 0.05: update = 0.05 * grad
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 3.5]]))


def _spec(root, tmp_path, epochs=2, method="moco", backbone="test_resnet", sets=TINY):
    data = DataSpec(format="cub", root=str(root), val_fraction=0.25,
                    cache_dir=str(tmp_path / "cache"))
    return build_spec(method, data, backbone=backbone,
                      train={"epochs": epochs, "batch_size": 16, "image_size": 32, "knn_k": 10},
                      sets=dict(sets))


class Crash(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run_exactly(synth_root, tmp_path):
    spec = _spec(synth_root, tmp_path, epochs=3)
    full = run_pretraining(spec, tmp_path / "full", resume=False, progress=False).history

    def crash_after_first(metrics, _ckpt):
        if metrics["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run_pretraining(spec, tmp_path / "part", progress=False, on_epoch=crash_after_first)
    resumed = run_pretraining(spec, tmp_path / "part", progress=False).history
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"], (a, b)
        assert a["val_knn_top1"] == b["val_knn_top1"]
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert (tmp_path / "part" / "checkpoints" / "best" / "checkpoint.pt").is_file()


def test_run_spec_round_trips_and_hash_ignores_where_data_lives(tmp_path):
    spec = _spec(tmp_path, tmp_path)
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    moved = RunSpec.from_dict({**spec.to_dict(), "data": {**spec.to_dict()["data"],
                                                          "root": "/elsewhere"}})
    assert moved.hash() == spec.hash()
    assert _spec(tmp_path, tmp_path, epochs=5).hash() != spec.hash()


def test_set_routes_knobs_and_rejects_unknown_ones(tmp_path):
    spec = _spec(tmp_path, tmp_path, sets={"temperature": "0.1", "lr": "0.5",
                                           "knn_k": "7", "aug.scale_min": "0.5"})
    assert spec.method_config.temperature == 0.1
    assert spec.optim.lr == 0.5 and spec.train.knn_k == 7 and spec.augment.scale_min == 0.5
    with pytest.raises(UserError, match="unknown setting 'capacity' for moco"):
        _spec(tmp_path, tmp_path, sets={"capacity": "3"})
    with pytest.raises(UserError, match=r"temperature=-1.0 is out of range"):
        _spec(tmp_path, tmp_path, sets={"temperature": "-1"})


def test_pretrain_then_eval_through_the_cli(synth_root, tmp_path, capsys):
    args = pretrain_argv("moco", synth_root, tmp_path, "queue_size=64", "mlp_hidden=64",
                         "knn_k=10", name="r1", val_fraction=0.25)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 1" in out and "val kNN top-1" in out
    best = tmp_path / "runs" / "r1" / "checkpoints" / "best"
    assert main(["eval", str(best), "--dataset", "cub", "--data-root", str(synth_root),
                 "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.25",
                 "--protocols", "retrieval,knn,linear"]) == 0
    out = capsys.readouterr().out
    record = json.loads((best / "eval-test.json").read_text())
    assert record["method"] == "moco" and record["split"] == "test"
    assert set(record["metrics"]) == {"rank1", "rank5", "map", "knn_top1", "knn_top5",
                                      "linear_top1", "linear_top5"}
    assert f"test rank1: {record['metrics']['rank1']:.2f}" in out


@pytest.mark.parametrize("argv, message", [
    (["--method", "simclr"], "argument --method: invalid choice: 'simclr'"),
    (["--method", "moco", "--backbone", "resnet_9000"], "unknown backbone 'resnet_9000'"),
    (["--method", "moco", "--epochs", "0"], "epochs=0 is out of range"),
    (["--method", "moco", "--set", "queue_size"], "--set 'queue_size': expected key=value"),
    (["--method", "moco", "--batch-size", "4096"], "batch size 4096 exceeds the train split"),
])
def test_pretrain_user_errors_are_one_line(synth_root, tmp_path, capsys, argv, message):
    base = ["pretrain", "--dataset", "cub", "--data-root", str(synth_root), "--image-size", "32",
            "--backbone", "test_resnet", "--storage", str(tmp_path), "--cache-dir",
            str(tmp_path / "cache")]
    if "--backbone" in argv:
        base = base[:base.index("--backbone")] + base[base.index("--backbone") + 2:]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_eval_of_a_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt"), "--dataset", "cub", "--data-root",
                 str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
