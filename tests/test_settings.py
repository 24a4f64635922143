"""Run settings in sections (`method.`, `optim.`, `train.`, `aug.`), parsed once to their
types: what `--set` accepts and refuses, what the run spec holds and hashes, and what reaches
the optimiser."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

from fgray.cli import build_parser
from fgray.engine.optim import LARS, OptimConfig, build_optimizer
from fgray.engine.spec import DataSpec, RunSpec, build_spec, parse_settings
from fgray.errors import UserError
from fgray.methods import build_method
from fgray.train.launch import spec_from_args
from fgray.tune.cli import study_main
from fgray.tune.spaces import Space

DATA = DataSpec(format="cub", root="/data/cub")
TINY = {"queue_size": 64, "mlp_hidden": 32, "dim": 16}


V3_TINY = {"mlp_hidden": 32, "dim": 16}  # MoCo v3 cores have no queue


def _spec(method: str = "moco", **sets):
    base = V3_TINY if method in ("mocov3", "lodisc") else TINY
    return build_spec(method, DATA, backbone="test_resnet",
                      train={"batch_size": 32, "image_size": 32}, sets={**base, **sets})


def test_sections_and_unambiguous_bare_names():
    spec = _spec("sdf", **{"method.warmup_epochs": "2", "optim.warmup_epochs": "1.5",
                           "optim.momentum": "0.8", "method.momentum": 0.99, "train.knn_k": "7",
                           "aug.scale_min": "0.5", "alpha": "3", "lr": 0.1})
    assert (spec.method_config.warmup_epochs, spec.optim.warmup_epochs) == (2, 1.5)
    assert (spec.method_config.momentum, spec.optim.momentum) == (0.99, 0.8)
    assert spec.method_config.alpha == 3.0 and spec.optim.lr == 0.1
    assert spec.train.knn_k == 7 and spec.augment.scale_min == 0.5


@pytest.mark.parametrize("method, sets, message", [
    ("sdf", {"warmup_epochs": "2"}, "--set warmup_epochs=2 is ambiguous for sdf: expected "
                                    "method.warmup_epochs or optim.warmup_epochs"),
    ("moco", {"momentum": "0.9"}, "--set momentum=0.9 is ambiguous for moco: expected "
                                  "method.momentum or optim.momentum"),
    ("moco", {"optim.capacity": "3"}, "unknown setting 'optim.capacity' for moco: expected one "
                                      "of optim.exclude_bias_norm_wd, optim.grad_clip"),
    ("moco", {"model.dim": "3"}, "unknown setting 'model.dim' for moco: expected a section "
                                 "method., optim., train., aug. before the name"),
    ("moco", {"queue_sise": "3"}, "unknown setting 'queue_sise' for moco: expected SECTION.NAME"
                                  " with SECTION one of method, optim, train, aug and NAME a "
                                  "field of it (did you mean method.queue_size?)"),
    ("lcr", {"method.nu": "much"}, "method.nu='much': expected a float"),
    ("lcr", {"method.nu": "-1"}, "nu=-1.0 is out of range"),
])
def test_bad_settings_are_one_line_errors(method, sets, message):
    with pytest.raises(UserError) as err:
        _spec(method, **sets)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_spec_holds_typed_values_and_hashes_them():
    """The same run from the command line (strings) and from a Tune trial (floats): equal
    specs, one hash."""
    parser = build_parser()
    args = parser.parse_args(["pretrain", "--method", "lcr", "--dataset", "cub", "--data-root",
                              "/data/cub", "--backbone", "test_resnet", "--set",
                              "method.nu=0.1", "--set", "capacity=16", "--set", "optim.lr=0.05"])
    cli = spec_from_args(args)
    assert (cli.method_config.nu, cli.method_config.capacity, cli.optim.lr) == (0.1, 16, 0.05)
    trial = Space("lcr").settings({"nu": 0.1, "capacity": 16, "lr": 0.05})
    assert trial == {"method.nu": 0.1, "method.capacity": 16, "optim.lr": 0.05}
    tune = build_spec("lcr", DataSpec(format="cub", root="/data/cub"), backbone="test_resnet",
                      train={"epochs": 100, "batch_size": 128, "image_size": 224, "seed": 0},
                      sets=trial)
    assert tune == cli and tune.hash() == cli.hash()
    assert build_spec("lcr", DATA, sets={"method.nu": "0.2"}).hash() != \
        build_spec("lcr", DATA, sets={"method.nu": 0.1}).hash()


def test_run_spec_round_trips_and_reads_the_old_overrides():
    spec = _spec("lodisc", **{"method.fusion": "rollout", "keep_ratio": "0.5",
                              "aug.blur_p": "0.1,0.2"})
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["method_config"]["fusion"] == "rollout"
    assert "method_overrides" not in stored
    again = RunSpec.from_dict(stored)
    assert again == spec and again.hash() == spec.hash()
    assert again.augment.blur_p == (0.1, 0.2)
    # A checkpoint written before typed configs kept the --set strings of the method.
    old = {k: v for k, v in stored.items() if k != "method_config"}
    old["method_overrides"] = {"fusion": "rollout", "keep_ratio": "0.5", "mlp_hidden": "32",
                               "dim": "16"}
    assert RunSpec.from_dict(old) == spec


def _optimizer(spec):
    torch.manual_seed(0)
    method = build_method(spec.method, backbone=spec.backbone, image_size=32,
                          config=spec.method_config)
    return build_optimizer(method.param_groups(), spec.optim, spec.train.batch_size)


def test_optim_momentum_reaches_the_optimiser():
    spec = _spec("moco", **{"optim.momentum": "0.8"})
    assert spec.method_config.momentum == 0.999  # the EMA keeps its recipe value
    opt = _optimizer(spec)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["momentum"] for g in opt.param_groups] == [0.8]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03 * 32 / 256)


def test_biases_and_norms_skip_weight_decay_where_asked():
    moco_sgd = _optimizer(_spec("moco"))  # MoCo v2's SGD decays every parameter
    assert [g["weight_decay"] for g in moco_sgd.param_groups] == [1e-4]
    excluded = _optimizer(_spec("moco", **{"optim.exclude_bias_norm_wd": "true"}))
    assert [g["weight_decay"] for g in excluded.param_groups] == [1e-4, 0.0]
    decay, skip = excluded.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in skip["params"])
    assert len(decay["params"]) + len(skip["params"]) == len(moco_sgd.param_groups[0]["params"])
    # MoCo v3's recipe with LARS (its ResNet recipes), as moco-v3's LARS: on by default.
    lars = _optimizer(_spec("mocov3", **{"optim.optimizer": "lars", "optim.weight_decay": 1e-6}))
    assert isinstance(lars, LARS)
    assert [(g["weight_decay"], g["lars_exclude"]) for g in lars.param_groups] == [
        (1e-6, False), (0.0, True)]
    plain = _optimizer(_spec("mocov3", **{"optim.optimizer": "lars",
                                          "optim.exclude_bias_norm_wd": "false"}))
    assert [g["lars_exclude"] for g in plain.param_groups] == [False]


def test_lars_leaves_excluded_parameters_unscaled():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = nn.Parameter(torch.tensor([3.0, 4.0]))
    cfg = OptimConfig(optimizer="lars", lr=1.0, momentum=0.0, weight_decay=0.5)
    opt = build_optimizer([{"params": [w, b]}], cfg, 256)
    opt.param_groups[0]["trust_coefficient"] = opt.param_groups[1]["trust_coefficient"] = 0.1
    w.grad = torch.tensor([[0.0, 10.0]])
    b.grad = torch.tensor([0.0, 10.0])
    opt.step()
    # w: g + wd w = (1.5, 12), trust ratio 0.1 * 5 / |g| scales it; b: plain SGD, no decay.
    g = torch.tensor([[1.5, 12.0]])
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 / g.norm() * g)
    torch.testing.assert_close(b.detach(), torch.tensor([3.0, -6.0]))


def test_study_settings_are_qualified_and_typed():
    from fgray.tune.cli import _fixed
    from fgray.tune.presets import PRESETS

    smoke = PRESETS["smoke"]
    assert smoke.settings_for("sdf")["method.warmup_epochs"] == 1
    assert smoke.settings_for("moco")["train.knn_k"] == 20
    fixed = _fixed(["lcr.method.capacity=16", "queue_size=128", "optim.momentum=0.8",
                    "sdf.warmup_epochs=3"], ["moco", "lcr"], smoke)
    assert fixed["lcr"]["method.capacity"] == 16 and "method.capacity" not in fixed["moco"]
    assert fixed["moco"]["method.queue_size"] == 128 and fixed["lcr"]["optim.momentum"] == 0.8
    with pytest.raises(UserError, match="ambiguous for sdf"):
        _fixed(["warmup_epochs=2"], ["moco", "sdf"], smoke)
    space = Space("moco", ("lr", "momentum"), tuple(fixed["moco"].items()))
    # optim.momentum is fixed; the shared `momentum` knob is the method's EMA, still searched.
    assert space.config_defaults()["momentum"] == 0.999
    assert set(space.defaults()) == {"lr", "momentum"}
    trial = optuna.create_study().ask()
    space(trial)
    assert set(space.settings(trial.params)) == {"optim.lr", "method.momentum"}
    assert parse_settings("moco", {"aug.mean": "0.5,0.5,0.5"}) == {"aug.mean": (0.5, 0.5, 0.5)}


@pytest.mark.parametrize("flag", ["--epochs", "--trials"])
def test_study_script_refuses_zero_with_one_line(flag, synth_root, tmp_path, capsys):
    code = study_main(["--data-root", str(synth_root), "--preset", "smoke", "--storage",
                       str(tmp_path), flag, "0"], prog="cub_sweep.py", description="x",
                      dataset="cub")
    err = capsys.readouterr().err
    assert code == 2 and err == f"cub_sweep.py: error: {flag} 0: expected 1 or more\n"
    assert not any(tmp_path.iterdir())
