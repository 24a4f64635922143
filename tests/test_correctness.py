"""Recipe and bookkeeping details against the official code, each checked by a number computed
independently of fgray's implementation:

- SDF: BatchNorm running statistics come from real images only (the synthesized pass uses
  batch statistics but updates nothing);
- LoDisc: the released predictor ends in an affine-free BatchNorm1d; `momentum_updates=n`
  gives the closed form of n EMA steps, k <- m^n k + (1 - m^n) q;
- LCR: the recipe's effective lr is the code's unscaled 0.03 at batch 128;
- MoCo v3: T = 0.2 for ViTs and 1.0 for ResNets when unset;
- every method works in its backbone's own normalisation (mean = std = 0.5 for test_resnet).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgray.methods
from fgray.engine.optim import OptimConfig, build_optimizer
from fgray.methods import build_method, method_class
from fgray.methods.base import StepInfo
from fgray.tune.spaces import Space

STEP = StepInfo(epoch=0, step=0, progress=0.0)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


# -- 1. SDF: BN running statistics from real images only ----------------------------------------


def test_sdf_synthetic_pass_leaves_bn_running_statistics_to_real_images():
    torch.manual_seed(0)
    model = build_method("sdf", backbone="test_resnet", image_size=32,
                         overrides={"queue_size": 64, "mlp_hidden": 64, "dim": 16,
                                    "decoder_size": 16, "warmup_epochs": 0}).train()
    twin = copy.deepcopy(model)
    v1, v2 = _images(8, 32, 1), _images(8, 32, 2)
    torch.manual_seed(5)  # the key pass's shuffle-BN permutation is the first random draw
    out = model(v1, v2, STEP)
    assert out["synth"].item() > 0  # the synthesized pass did run
    # Independent: the real images' passes only — query on view 1, keys on view 2 (same
    # permutation), the decoder on the real feature for L_R.
    with torch.no_grad():
        z = twin.backbone(v1)
        torch.manual_seed(5)
        twin.keys(v2)
        twin.decoder(z)
    got, want = _bn_buffers(model), _bn_buffers(twin)
    assert set(got) == set(want) and any(".backbone." in f".{k}" for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    # And the first BN layer by hand: running mean = 0.9 * 0 + 0.1 * batch mean of conv1(v1).
    first_bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    conv1 = next(m for m in copy.deepcopy(model).backbone.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        pre = F.conv2d(v1, conv1.weight, conv1.bias, conv1.stride, conv1.padding)
    torch.testing.assert_close(first_bn.running_mean, 0.1 * pre.mean((0, 2, 3)),
                               atol=1e-5, rtol=1e-4)


# -- 2. LoDisc: the released predictor and four EMA updates per step ------------------------


def test_lodisc_without_projector_has_the_released_predictor():
    torch.manual_seed(0)
    model = build_method("lodisc", backbone="test_vit", image_size=64,
                         overrides={"mlp_hidden": 32, "projector": False, "mlp_dropout": 0.2})
    d = model.backbone.num_features
    # LoDisc `_build_mlp(2, 768, 4096, 768)` with its default last_bn=True:
    # Linear(no bias)–BN–ReLU–Dropout(0.2)–Linear(no bias)–BatchNorm1d(affine=False).
    assert [type(m) for m in model.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU,
                                                  nn.Dropout, nn.Linear, nn.BatchNorm1d]
    last = model.predictor[-1]
    assert last.num_features == d and not last.affine
    assert model.predictor[0].in_features == d and model.predictor[4].out_features == d
    # An affine-free BN in train mode standardises each output dimension over the batch.
    out = model.predictor.train()(torch.randn(16, d))
    torch.testing.assert_close(out.mean(0), torch.zeros(d), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(d), atol=1e-3, rtol=0)


@pytest.mark.parametrize("progress", [0.0, 0.3])
def test_lodisc_momentum_updates_apply_the_ema_n_times(progress):
    torch.manual_seed(0)
    model = build_method("lodisc", backbone="test_vit", image_size=64,
                         overrides={"mlp_hidden": 32, "dim": 16, "momentum_updates": 4})
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))  # queries away from keys
    pairs = [(model.backbone_k, model.backbone), (model.projector_k, model.projector)]
    before = [[k.clone() for k in mk.parameters()] for mk, _ in pairs]
    model.momentum_update(progress)
    # moco-v3's cosine ramp, written out, then four EMA steps towards the same q by hand.
    m = 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
    m4 = m ** 4
    assert model.current_momentum == pytest.approx(m4, rel=1e-12)
    if progress == 0.0:
        assert m4 == pytest.approx(0.96059601, abs=1e-12)  # 0.99^4
    for (mk, mq), ks in zip(pairs, before):
        for k0, k, q in zip(ks, mk.parameters(), mq.parameters()):
            by_hand = k0.double()
            for _ in range(4):
                by_hand = m * by_hand + (1 - m) * q.double()
            torch.testing.assert_close(k.double(), m4 * k0.double() + (1 - m4) * q.double())
            torch.testing.assert_close(k.double(), by_hand)


# -- 3. LCR: the recipe's lr at batch 128 --------------------------------------------------


def test_lcr_recipe_runs_at_the_codes_lr_0_03_at_batch_128():
    """LCR's README: SGD lr 0.03 at batch 128, not scaled by batch/256."""
    lcr = method_class("lcr")
    point = Space("lcr", shared=("lr",)).defaults()  # the study's first trial
    for lr in (lcr.optim_defaults["lr"], point["lr"]):
        cfg = OptimConfig(**{**dataclasses.asdict(OptimConfig()), **lcr.optim_defaults,
                             "lr": lr})
        opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], cfg, 128)
        assert opt.param_groups[0]["peak_lr"] == pytest.approx(0.03, abs=1e-12)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.03, abs=1e-12)


# -- 4. MoCo v3: temperature by backbone family ----------------------------------------------


def _ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / t
    return F.cross_entropy(logits, torch.arange(len(q))) * 2 * t


@pytest.mark.parametrize("backbone, overrides, want", [
    ("test_resnet", {}, 1.0),  # moco-v3 main_moco.py default, its ResNet recipe
    ("test_vit", {}, 0.2),  # its ViT recipes (--moco-t=.2)
    ("test_resnet", {"temperature": 0.3}, 0.3),  # an explicit value wins
])
def test_mocov3_temperature_follows_the_backbone_family(backbone, overrides, want):
    torch.manual_seed(0)
    model = build_method("mocov3", backbone=backbone, image_size=32,
                         overrides={"mlp_hidden": 32, "dim": 16, **overrides}).train()
    assert model.cfg.temperature == want
    twin = copy.deepcopy(model)
    x1, x2 = _images(6, 32, 1), _images(6, 32, 2)
    out = model(x1, x2, STEP)
    with torch.no_grad():
        q1 = twin.predictor(twin.projector(twin.backbone(x1)))
        q2 = twin.predictor(twin.projector(twin.backbone(x2)))
        k1 = twin.projector_k(twin.backbone_k(x1))
        k2 = twin.projector_k(twin.backbone_k(x2))
    torch.testing.assert_close(out["loss"].detach(), _ctr(q1, k2, want) + _ctr(q2, k1, want),
                               atol=1e-5, rtol=1e-5)


def test_search_space_recipe_temperature_follows_the_backbone():
    assert method_class("mocov3").Config().temperature is None
    for backbone, t in ((None, 0.2), ("test_vit", 0.2), ("resnet50", 1.0)):
        space = Space("mocov3", ("temperature",), backbone=backbone)
        assert space.defaults() == {"temperature": t}  # inside its own search range


# -- 5. The backbone's own normalisation -----------------------------------------------------


def test_sdf_decodes_into_the_backbones_normalisation():
    torch.manual_seed(0)
    model = build_method("sdf", backbone="test_resnet", image_size=32,
                         overrides={"queue_size": 64, "mlp_hidden": 64, "dim": 16,
                                    "decoder_size": 16}).eval()
    assert model.backbone.mean == (0.5, 0.5, 0.5) and model.backbone.std == (0.5, 0.5, 0.5)
    z = torch.randn(4, model.backbone.num_features)
    with torch.no_grad():
        rgb = model.decoder(z)  # [0, 1]
        # Normalised with mean = std = 0.5, then mapped back: the [0, 1] image again.
        torch.testing.assert_close(model.decode(z), 2 * rgb - 1)
        torch.testing.assert_close(model.decode(z) * 0.5 + 0.5, rgb)


class _Echo(nn.Module):
    """A stand-in CLIP image encoder that returns its input (flattened)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_ppssl_teacher_input_converts_from_the_backbones_normalisation():
    torch.manual_seed(0)
    model = build_method("ppssl", backbone="test_resnet", image_size=16,
                         overrides={"queue_size": 64, "mlp_hidden": 32, "dim": 16})
    assert model.backbone.mean == (0.5, 0.5, 0.5) and model.backbone.std == (0.5, 0.5, 0.5)
    model._teacher = [_Echo()]
    model._clip_io = ((16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # CLIP space = [0, 1] RGB
    img = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    view = (img - 0.5) / 0.5  # what the engine feeds a backbone with mean = std = 0.5
    torch.testing.assert_close(model.teacher_embed(view), img.flatten(1))


def test_no_method_hard_codes_imagenet_statistics():
    root = Path(fgray.methods.__file__).parent
    offenders = [p.name for p in sorted(root.glob("*.py"))
                 if "IMAGENET_MEAN" in p.read_text() or "IMAGENET_STD" in p.read_text()]
    assert offenders == []
