"""A method is one file: a class with `@register`, its Config, search space, structural knobs
and default backbone. A toy method defined here, and nowhere else, goes through the CLI's
flags, `build_spec`, its search space and one in-process epoch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import pretrain_argv
from torch import Tensor, nn

from fgray.cli import build_parser, main
from fgray.config import check_range
from fgray.engine.spec import DataSpec, build_spec
from fgray.methods import method_class, method_names, register, unregister
from fgray.methods.base import Method, StepInfo, Suggest
from fgray.methods.common import info_nce_in_batch
from fgray.train.launch import spec_from_args
from fgray.tune.presets import ALL_METHODS
from fgray.tune.spaces import Space, space_for


@dataclass
class ToyConfig:
    dim: int = 16
    temperature: float = 0.5
    scale: float = 1.0  # loss multiplier, the toy's own knob
    momentum: float = 0.9  # no EMA here: a field for the shared `momentum` knob

    def validate(self) -> None:
        check_range("dim", self.dim, 1)
        check_range("temperature", self.temperature, 0.0, lo_open=True)
        check_range("scale", self.scale, 0.0, lo_open=True)


class Toy(Method):
    """Two views, one linear head, in-batch InfoNCE."""

    Config = ToyConfig
    default_backbone = "test_resnet"
    optim_defaults = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-4}
    structural = ("head",)

    @staticmethod
    def search_space(s: Suggest, fixed: dict[str, Any]) -> None:
        s.float("scale", 0.1, 10.0, log=True)
        if s.categorical("head", ("default", "wide"), default="default") == "wide":
            s.int("dim", 16, 64, log=True)

    def __init__(self, backbone, cfg: ToyConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, cfg.dim)

    def _z(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        loss = self.cfg.scale * info_nce_in_batch(self._z(view1), self._z(view2),
                                                  self.cfg.temperature)
        return {"loss": loss, "infonce": loss.detach()}

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.backbone(images), dim=1)


@pytest.fixture
def toy():
    register("toy", in_presets=False)(Toy)
    yield Toy
    unregister("toy")
    assert "toy" not in method_names()


def test_registered_methods_are_complete():
    assert method_names()[:6] == ("moco", "mocov3", "lcr", "sdf", "ppssl", "lodisc")
    assert ALL_METHODS == ("moco", "lcr", "sdf", "ppssl", "lodisc")  # MoCo v3 opts out
    assert method_class("lodisc").structural == ("sampling",)
    assert method_class("lcr").name == "lcr"
    with pytest.raises(ValueError, match="already registered"):
        register("lcr")(Toy)
    with pytest.raises(ValueError, match="other than method, optim, train, aug"):
        register("optim")


def test_a_registered_method_is_on_the_command_line(toy, tmp_path):
    assert "toy" in method_names() and method_class("toy") is Toy
    args = build_parser().parse_args([
        "pretrain", "--method", "toy", "--dataset", "cub", "--data-root", str(tmp_path),
        "--set", "method.scale=2", "--set", "dim=8", "--set", "optim.momentum=0.8"])
    spec = spec_from_args(args)
    assert spec.backbone_name == "test_resnet"  # its default backbone
    assert (spec.method_config.scale, spec.method_config.dim) == (2.0, 8)
    assert spec.optim.lr == 0.05 and spec.optim.momentum == 0.8
    assert spec.method_config.momentum == 0.9


def test_a_registered_method_has_its_search_space(toy):
    space = space_for("toy", shared=("lr", "momentum"))  # validates every knob
    assert space.structural == ("head",)
    assert space.knob_names() == {"scale", "head", "dim", "lr", "momentum"}
    point = space.defaults()
    assert point == {"scale": 1.0, "head": "default", "lr": 0.05, "momentum": 0.9}
    assert space.settings(point) == {"method.scale": 1.0, "optim.lr": 0.05,
                                     "method.momentum": 0.9}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(6):
        trial = study.ask()
        space(trial)
        spec = build_spec("toy", DataSpec(), sets=space.settings(trial.params))
        assert spec.method_config.scale == trial.params["scale"]
        assert spec.optim.lr == trial.params["lr"]
        assert spec.method_config.dim == trial.params.get("dim", 16)
        study.tell(trial, 0.0)
    assert {t.params["head"] for t in study.trials} == {"default", "wide"}
    assert Space("toy", (), (("method.scale", "3"),)).defaults() == {
        "scale": 3.0, "head": "default"}


def test_a_registered_method_trains_an_epoch(toy, synth_root, tmp_path, capsys):
    argv = pretrain_argv("toy", synth_root, tmp_path, "method.scale=2", "train.knn_k=5",
                         name="toy1", backbone=None, val_fraction=0.25,
                         extra=("--device", "cpu"))
    torch.manual_seed(0)
    assert main(argv) == 0
    assert "epoch 1" in capsys.readouterr().out
    run = tmp_path / "runs" / "toy1"
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["loss"] > 0 and "loss_infonce" in metrics and "val_knn_top1" in metrics
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "toy" and config["method_config"]["scale"] == 2.0
