"""LoDisc: fused attention against `Backbone.attention_maps`, the keep mask, the masked views,
the global and local losses against an independent computation, gradients, the CNN variant,
and short training runs (engine and CLI) on the embedded set."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_momentum_step, pretrain_argv, short_training
from torch import nn

from fgray.cli import main
from fgray.errors import UserError
from fgray.methods import build_method
from fgray.methods.base import StepInfo
from fgray.methods.lodisc import (
    LoDisc,
    LoDiscConfig,
    cls_attention_reducer,
    fuse_cls_attention,
    keep_mask,
    mask_images,
)
from fgray.models.backbone import Backbone

SMALL = {"mlp_hidden": 32, "dim": 16}
STEP = StepInfo(epoch=0, step=0, progress=0.0)
SIZE = 64  # test_vit has 16 px patches: a 4x4 grid


def _lodisc(backbone: str = "test_vit", **overrides) -> LoDisc:
    torch.manual_seed(0)
    return build_method("lodisc", backbone=backbone, image_size=SIZE,
                        overrides={**SMALL, **overrides})


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _independent_cls_scores(backbone: Backbone, x: torch.Tensor, fusion: str) -> torch.Tensor:
    """The fused CLS -> patch attention [B, N] from `attention_maps`, in float64."""
    maps = [a.double().mean(1) for a in backbone.attention_maps(x)]  # head means [B, T, T]
    if fusion == "product":
        fused = maps[0]
        for a in maps[1:]:
            fused = fused * a
    elif fusion == "last":
        fused = maps[-1]
    else:  # rollout: R = A~_L ... A~_1 with A~ = rownorm(0.5 A + 0.5 I)
        eye = torch.eye(maps[0].shape[-1], dtype=torch.float64)
        fused = eye.expand_as(maps[0])
        for a in maps:
            a = 0.5 * a + 0.5 * eye
            fused = (a / a.sum(-1, keepdim=True)) @ fused
    return fused[:, 0, backbone.num_prefix_tokens:]


@pytest.mark.parametrize("fusion", ["product", "last", "rollout"])
def test_fused_attention_matches_attention_maps(fusion):
    model = _lodisc(fusion=fusion)
    x = _images()
    with torch.no_grad():
        key, log_scores = model.key_and_scores(x)
        expected = _independent_cls_scores(model.backbone_k, x, fusion)
        # The one momentum pass also gives the global key, equal to the fused-attention path's.
        torch.testing.assert_close(key, model.key(x), atol=1e-5, rtol=1e-4)
    assert log_scores.shape == (6, 4, 4)
    torch.testing.assert_close(log_scores.flatten(1).double().exp(), expected,
                               rtol=1e-4, atol=0)


def test_product_fusion_ranks_maps_whose_product_underflows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 2, 3, 10, 10, generator=g) * 8  # peaky: many tiny probabilities
    blocks = logits.softmax(-1).to(torch.bfloat16)
    direct = blocks[0].float().mean(1)[:, 0, 1:]
    for a in blocks[1:]:
        direct = direct * a.float().mean(1)[:, 0, 1:]
    assert (direct == 0).any()  # a plain float32 product loses the ranking here
    reduce = cls_attention_reducer("product", 1)
    fused = fuse_cls_attention([reduce(a) for a in blocks], "product", 1)
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    exact = sum(a.double().mean(1)[:, 0, 1:].log() for a in blocks)
    assert torch.equal(fused.argsort(1), exact.argsort(1))


@pytest.mark.parametrize("ratio, kept", [(0.3, 5), (0.1, 2), (0.5, 8), (0.9, 14), (0.01, 1),
                                         (1.0, 16)])
def test_keep_mask_keeps_exactly_round_rho_n_top_cells(ratio, kept):
    scores = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(2))
    mask = keep_mask(scores, ratio)
    assert mask.dtype == torch.bool and mask.shape == (5, 4, 4)
    assert mask.flatten(1).sum(1).tolist() == [kept] * 5
    for s, m in zip(scores.flatten(1), mask.flatten(1)):
        if kept < 16:
            assert s[m].min() > s[~m].max()  # deterministic: the top-scoring cells
    sampled = keep_mask(scores, ratio, temperature=0.7)
    assert sampled.flatten(1).sum(1).tolist() == [kept] * 5


def test_sampling_follows_score_to_the_one_over_tau():
    probs = torch.tensor([0.5, 0.3, 0.2])
    scores = probs.log().view(1, 1, 3).expand(40000, 1, 3)
    torch.manual_seed(0)
    for tau in (1.0, 0.5):
        freq = keep_mask(scores, 0.3, temperature=tau).float().mean(0).flatten()
        target = probs ** (1 / tau) / (probs ** (1 / tau)).sum()  # one cell kept: Gumbel-max
        torch.testing.assert_close(freq, target, atol=0.015, rtol=0)


def test_masked_images_keep_pixels_of_kept_cells_and_zero_the_rest():
    x = _images(3) + 5.0  # no pixel is zero by chance
    mask = keep_mask(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(4)), 0.3)
    out = mask_images(x, mask)
    for b in range(3):
        for r in range(4):
            for c in range(4):
                block = (b, slice(None), slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
                if mask[b, r, c]:
                    assert torch.equal(out[block], x[block])
                else:
                    assert torch.equal(out[block], torch.zeros_like(x[block]))


def _ctr(q: torch.Tensor, k: torch.Tensor, t: float = 0.2) -> torch.Tensor:
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / t
    return F.cross_entropy(logits, torch.arange(len(q))) * 2 * t


def test_global_and_local_losses_match_an_independent_computation():
    model = _lodisc(local_weight=0.5)
    twin = copy.deepcopy(model)
    x1, x2 = _images(seed=1), _images(seed=2)
    out = model(x1, x2, STEP)
    assert set(out) == {"loss", "global", "local"}

    def key(x):
        return twin.projector_k(twin.backbone_k(x))

    def masked(x):
        scores = _independent_cls_scores(twin.backbone_k, x, "product")
        top = scores.argsort(1, descending=True)[:, :5]  # round(0.3 * 16)
        cells = torch.zeros_like(scores).scatter_(1, top, 1.0).view(-1, 4, 4)
        pixels = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
        return x * pixels[:, None].float()

    q1 = twin.predictor(twin.projector(twin.backbone(x1)))
    q2 = twin.predictor(twin.projector(twin.backbone(x2)))
    with torch.no_grad():
        k1, k2, km1, km2 = key(x1), key(x2), key(masked(x1)), key(masked(x2))
    glob = _ctr(q1, k2) + _ctr(q2, k1)
    local = _ctr(q1, km2) + _ctr(q2, km1)
    torch.testing.assert_close(out["global"], glob.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["local"], local.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], (glob + 0.5 * local).detach(), atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_query_side_only_and_the_masked_pass_has_none():
    model = _lodisc()
    x1, x2 = _images(seed=1), _images(seed=2)
    seen = []
    key = model.key

    def spy(x):
        k = key(x)
        seen.append((x.requires_grad, k.requires_grad, k.grad_fn))
        return k

    model.key = spy  # the masked views' pass
    out = model(x1, x2, STEP)
    assert seen == [(False, False, None)] * 2
    out["loss"].backward()
    for module in (model.backbone_k, model.projector_k):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())

    def backbone_grads(weight):
        twin = _lodisc(local_weight=weight)
        twin(x1, x2, STEP)["loss"].backward()
        return [p.grad for p in twin.backbone.parameters()]

    # The local term trains the query encoder: its gradient changes with lambda.
    assert max((a - b).abs().max() for a, b in zip(backbone_grads(0.0), backbone_grads(1.0))) > 0


def test_embedding_and_spatial_maps():
    model = _lodisc().eval()
    x = _images(4)
    with torch.no_grad():
        expected = F.normalize(model.predictor(model.projector(model.backbone(x))), dim=1)
        torch.testing.assert_close(model.embed(x), expected)
        maps = model.spatial_maps(x)
        scores = _independent_cls_scores(model.backbone_k, x, "product")
    assert set(maps) == {"attention", "kept"}
    assert maps["attention"].shape == maps["kept"].shape == (4, 4, 4)
    torch.testing.assert_close(maps["attention"].flatten(1).double(),
                               scores / scores.sum(1, keepdim=True), rtol=1e-4, atol=1e-7)
    assert maps["kept"].dtype == torch.float32 and maps["kept"].sum((1, 2)).tolist() == [5.0] * 4
    model.cfg = dataclasses.replace(model.cfg, embed="encoder")
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), F.normalize(model.backbone(x), dim=1))
    model.train()
    model.spatial_maps(x)
    assert model.training


def test_cnn_variant_ranks_cells_by_activation_norm():
    model = _lodisc("test_resnet", keep_ratio=0.5)
    x = _images(4)
    with torch.no_grad():
        key, log_scores = model.key_and_scores(x)
        fmap = model.backbone_k.model.forward_features(x)
        torch.testing.assert_close(log_scores, fmap.norm(dim=1).log())
        torch.testing.assert_close(key, model.key(x))
        masked, mask = model.masked_views(x, log_scores)
    assert mask.shape == (4, 2, 2) and mask.flatten(1).sum(1).tolist() == [2] * 4
    pixels = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)  # 64 px / 2 cells
    torch.testing.assert_close(masked, x * pixels[:, None])
    out = model(x, _images(4, seed=3), STEP)
    out["loss"].backward()
    assert torch.isfinite(out["local"])


def test_released_code_options_no_projector_and_dropout():
    model = _lodisc(projector=False, mlp_dropout=0.2)
    dim = model.backbone.num_features
    assert isinstance(model.projector, nn.Identity) and isinstance(model.projector_k, nn.Identity)
    linears = [m for m in model.predictor if isinstance(m, nn.Linear)]
    assert (linears[0].in_features, linears[-1].out_features) == (dim, dim)
    kinds = [type(m) for m in model.predictor]
    assert kinds[kinds.index(nn.ReLU) + 1] is nn.Dropout and model.predictor[3].p == 0.2
    x = _images(4)
    model(x, _images(4, seed=2), STEP)["loss"].backward()
    assert_momentum_step(model, 0.0, 0.99)
    assert model.eval().embed(x).shape == (4, dim)


def test_defaults_follow_the_code():
    cfg = LoDiscConfig()
    assert (cfg.keep_ratio, cfg.local_weight, cfg.fusion, cfg.sample_temperature) == (
        0.3, 1.0, "product", 0.0)
    assert (cfg.temperature, cfg.momentum, cfg.mlp_hidden, cfg.embed, cfg.momentum_updates) == (
        None, 0.99, 4096, "predictor", 1)
    # The temperature is resolved by backbone family when built: 0.2 for a ViT, as the code.
    assert _lodisc().cfg.temperature == 0.2
    assert LoDisc.default_backbone == "vit_base_patch16_224" and LoDisc.augment_preset == "byol"
    assert LoDisc.optim_defaults == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.5,
                                     "warmup_epochs": 0.0}
    assert LoDisc.sync_bn


@pytest.mark.parametrize("overrides, message", [
    ({"keep_ratio": 0}, "keep_ratio=0.0 is out of range"),
    ({"keep_ratio": 1.5}, "keep_ratio=1.5 is out of range"),
    ({"fusion": "mean"}, "fusion='mean': expected one of product, last, rollout"),
    ({"sample_temperature": -1}, "sample_temperature=-1.0 is out of range"),
])
def test_bad_settings_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        build_method("lodisc", backbone="test_vit", image_size=32, overrides=overrides)


def test_a_vit_without_cls_token_is_a_user_error():
    model = timm.create_model("test_vit", num_classes=0, class_token=False, global_pool="avg",
                              img_size=32)
    with pytest.raises(UserError, match="has no CLS token"):
        LoDisc(Backbone(model, "test_vit"), LoDiscConfig(**SMALL))


# Weak augmentation so that instance discrimination is learnable in a dozen short epochs.
TRAIN_SETS = {**SMALL, "lr": 0.01, "knn_k": 10, "aug.scale_min": 0.5, "aug.jitter_p": 0.0,
              "aug.gray_p": 0.0, "aug.blur_p": "0,0", "aug.solarize_p": "0,0"}


def test_training_lowers_the_loss(synth_root, tmp_path):
    history = short_training("lodisc", synth_root, tmp_path, backbone="test_vit",
                             image_size=32, sets=TRAIN_SETS)
    first, last = history[0], history[-2:]
    assert all(k in first for k in ("loss", "loss_global", "loss_local", "val_knn_top1"))
    # Seeds 0 and 1 went from 4.6 to 3.0-3.2 (last two epochs), the local term 2.4 -> 1.7.
    assert sum(h["loss"] for h in last) / 2 < first["loss"] - 0.8
    assert sum(h["loss_local"] for h in last) / 2 < first["loss_local"] - 0.3


def test_pretrain_through_the_cli(synth_root, tmp_path, capsys):
    args = pretrain_argv("lodisc", synth_root, tmp_path, "mlp_hidden=32", "dim=16",
                         "keep_ratio=0.5", "fusion=rollout", "knn_k=10", name="lodisc1",
                         backbone="test_vit")
    assert main(args) == 0
    assert "epoch 1" in capsys.readouterr().out
    run = tmp_path / "runs" / "lodisc1"
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["loss_local"] > 0 and metrics["loss_global"] > 0
    assert json.loads((run / "config.json").read_text())["optim"]["weight_decay"] == 0.5
