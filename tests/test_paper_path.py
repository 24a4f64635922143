"""The `paper` preset's GPU path on CPU: every preset method with the preset's architectures
(ResNet-50 `resnet50.tv_in1k` for the CNN methods, DeiT-B `deit_base_patch16_224.fb_in1k` for
LoDisc; random weights, as no ImageNet weights are offline here), the preset's settings and
each method's own optimiser recipe (`optim_defaults`), trained for one step at 32 px as a
1-worker Ray Train run (gloo) -- what `--workers 1` does on a GPU node with nccl. A break in
that path (a method that cannot build on the paper backbone, a Ray Train change, an
optimiser recipe lost on the way) fails here, without a GPU.

Checked: the run completes with finite losses in its trials and epochs rows, and the
checkpoint's optimiser is the recipe's -- its class (read from its per-parameter state), the
peak lr scaled by batch / 256, and weight decay on every parameter or, where the recipe
excludes them, zero on the biases and norm weights (the 1-d parameters) only."""

from __future__ import annotations

import math

import pytest

from fgray.engine.loop import CHECKPOINT_FILE, read_checkpoint
from fgray.engine.optim import OptimConfig
from fgray.engine.spec import DataSpec, build_spec
from fgray.methods import method_class
from fgray.results.tables import latest_trials, load
from fgray.train.checkpoints import best_checkpoint_dir
from fgray.train.trainer import ray_pretrain
from fgray.tune.presets import PRESETS

PAPER = PRESETS["paper"]
BATCH = 4
# What each optimiser keeps per parameter (torch's SGD and AdamW, fgray's LARS).
STATE_KEY = {"sgd": "momentum_buffer", "adamw": "exp_avg", "lars": "mu"}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """2 classes x 8 images: 6 train, 2 val after a quarter is held out: one step of 4."""
    from fgray.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("paper") / "fg"
    write_synthetic(out, classes=2, per_class=8, size=40, seed=0, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize("method", PAPER.methods)
def test_paper_preset_method_trains_through_ray_train(method, tiny_root, tmp_path):
    backbone = PAPER.backbone_for(method)
    spec = build_spec(method, DataSpec(format="cub", root=str(tiny_root), val_fraction=0.25,
                                       cache_dir=str(tmp_path / "cache")),
                      backbone=backbone, init="random",
                      train={"epochs": 1, "batch_size": BATCH, "image_size": 32, "seed": 0},
                      sets=PAPER.settings_for(method))
    assert spec.backbone_name == backbone  # the preset's architecture, by its timm name
    storage = str(tmp_path / "runs")
    run = ray_pretrain(spec, name=method, storage=storage, workers=1, keep_best=1,
                       max_failures=0, echo=False)

    (trial,) = latest_trials(load(storage, "trials").to_pylist())
    assert trial["status"] == "completed" and trial["epochs_run"] == 1
    (epoch,) = load(storage, "epochs").to_pylist()
    assert epoch["epoch"] == 1 and math.isfinite(epoch["loss"])

    recipe = OptimConfig(**method_class(method).optim_defaults)
    assert recipe == spec.optim  # the preset keeps the method's recipe
    state = read_checkpoint(f"{best_checkpoint_dir(run)}/{CHECKPOINT_FILE}")["optimizer"]
    key = STATE_KEY[recipe.optimizer]
    per_param = state["state"]
    assert per_param and all(key in s for s in per_param.values()), sorted(
        next(iter(per_param.values())))
    excluded = recipe.optimizer == "lars" if recipe.exclude_bias_norm_wd is None \
        else recipe.exclude_bias_norm_wd
    for group in state["param_groups"]:
        assert group["peak_lr"] == pytest.approx(recipe.lr * BATCH / 256)
        dims = {per_param[i][key].ndim for i in group["params"] if i in per_param}
        if excluded and dims <= {0, 1}:
            assert group["weight_decay"] == 0.0
        else:
            assert group["weight_decay"] == recipe.weight_decay, (dims, group)
    if excluded:  # both kinds of group exist: the exclusion did split them
        assert {g["weight_decay"] for g in state["param_groups"]} == {0.0,
                                                                      recipe.weight_decay}
