"""SDF: the perturbed set, perturbation, decoder, synthesized-pair loss and a CLI run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_SDF, pretrain_argv

from fgray.cli import main
from fgray.errors import UserError
from fgray.methods import build_method
from fgray.methods.base import StepInfo
from fgray.methods.sdf import (
    SDF,
    UpConvDecoder,
    lowest_fraction,
    nondiscriminative_dims,
    perturb_features,
)

TINY = {"queue_size": 64, "mlp_hidden": 64, "dim": 16}


def _sdf(**overrides) -> SDF:
    torch.manual_seed(0)
    return build_method("sdf", backbone="test_resnet", image_size=32,
                        overrides={**TINY, **overrides})


def _views(batch: int = 8, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size,
                                                                       generator=g)


def _numpy_lowest(values: np.ndarray, q: float) -> np.ndarray:
    """Independent: rank by pairwise comparison (ties to the lower index), keep rank < ⌊qD⌋."""
    d = len(values)
    idx = np.arange(d)
    less = values[None, :] < values[:, None]
    tie_before = (values[None, :] == values[:, None]) & (idx[None, :] < idx[:, None])
    rank = (less | tie_before).sum(1)
    return rank < int(np.floor(q * d + 1e-9))


@pytest.mark.parametrize("rule", ["union", "intersection"])
@pytest.mark.parametrize("q_var,q_cam", [(0.3, 0.3), (0.5, 0.2), (0.0, 0.4), (1.0, 0.25)])
def test_set_selection_matches_numpy(rule, q_var, q_cam):
    rng = np.random.default_rng(int(q_var * 10 + q_cam * 100))
    var = rng.random(40).astype(np.float32)
    imp = rng.random(40).astype(np.float32)
    imp[5] = imp[6] = imp[7]  # ties resolve by index in both computations
    got = nondiscriminative_dims(torch.from_numpy(var), torch.from_numpy(imp), q_var, q_cam,
                                 rule).numpy()
    low_var, low_cam = _numpy_lowest(var, q_var), _numpy_lowest(imp, q_cam)
    want = low_var | low_cam if rule == "union" else low_var & low_cam
    np.testing.assert_array_equal(got, want)
    # Also against a quantile threshold: with distinct values, the ⌊qD⌋ lowest are exactly
    # those at or below the ⌊qD⌋-th order statistic.
    n = int(np.floor(q_var * 40 + 1e-9))
    if n:
        thr = np.sort(var)[n - 1]
        np.testing.assert_array_equal(lowest_fraction(torch.from_numpy(var), q_var).numpy(),
                                      var <= thr)


@pytest.mark.parametrize("mode", ["gaussian", "shuffle"])
def test_only_selected_dimensions_change(mode):
    torch.manual_seed(1)
    z = torch.randn(6, 20)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[1, 4, 9, 17]] = True
    z_p = perturb_features(z, mask, mode=mode, epsilon=0.5, std=torch.full((20,), 2.0))
    changed = (z_p != z).any(0)
    assert torch.equal(changed, mask)
    if mode == "shuffle":
        # Each sample's selected values come from another sample of the batch.
        for i in range(6):
            src = [j for j in range(6) if torch.equal(z_p[i, mask], z[j, mask])]
            assert len(src) == 1 and src[0] != i
    else:
        noise = (z_p - z)[:, mask]
        assert 0.3 < noise.std().item() / 1.0 < 3.0  # ε·σ = 1


def test_method_perturbs_its_selected_set_only():
    m = _sdf(q_var=0.25, q_cam=0.25, set_rule="intersection").train()
    v1, v2 = _views()
    m(v1, v2, StepInfo(epoch=0, step=0, progress=0.0))
    assert bool(m.stats_ready)
    mask = m.nondiscriminative_mask()
    z = torch.randn(4, m.backbone.num_features)
    changed = (m.perturb(z, mask) != z).any(0)
    assert torch.equal(changed, mask & (m.feat_var > 0))
    want = _numpy_lowest(m.feat_var.numpy(), 0.25) & _numpy_lowest(
        m.feat_importance.numpy(), 0.25)
    np.testing.assert_array_equal(mask.numpy(), want)


def test_statistics_are_batch_variance_and_gradcam_importance():
    m = _sdf(stat_momentum=0.5).train()
    v1, v2 = _views()
    z = m.backbone(v1).detach()
    grad = torch.randn_like(z)
    m.update_statistics(z, grad)
    torch.testing.assert_close(m.feat_var, z.var(0))
    torch.testing.assert_close(m.feat_importance, (z * grad).abs().mean(0))
    m.update_statistics(z * 2, grad)  # EMA with momentum 0.5
    torch.testing.assert_close(m.feat_var, 0.5 * z.var(0) + 0.5 * (2 * z).var(0))


def test_reconstruction_error_falls_on_a_fixed_batch():
    m = _sdf(decoder_size=16, decoder_width=8, recon="l2").train()
    v1, _ = _views(batch=8, size=32)
    z = m.backbone(v1).detach()
    opt = torch.optim.Adam(m.decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = m.recon_loss(m.decode(z), v1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert m.recon_target(v1).shape == (8, 3, 16, 16)


def test_decoder_shapes_and_range():
    dec = UpConvDecoder(24, size=64, width=4)
    out = dec(torch.randn(3, 24))
    assert out.shape == (3, 3, 64, 64)
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(UserError, match="decoder_size=48: expected 4 \\* 2\\^k"):
        _sdf(decoder_size=48)


def test_gradients_reach_encoder_through_synth_loss_only_on_the_query_side():
    m = _sdf(decoder_size=16).train()
    v1, v2 = _views()
    m(v1, v2, StepInfo(epoch=0, step=0, progress=0.0))  # statistics
    m.zero_grad(set_to_none=True)
    z = m.backbone(v1).detach()
    loss = m.synth_loss(z, (32, 32))
    loss.backward()
    grads = [p.grad for p in m.backbone.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in m.decoder.parameters())  # synthesized images are constants
    assert all(p.grad is None for p in m.backbone_k.parameters())


def test_forward_terms_and_warmup():
    m = _sdf(warmup_epochs=1, alpha=0.5, nu=2.0).train()
    v1, v2 = _views()
    ptr = int(m.queue_ptr)
    out = m(v1, v2, StepInfo(epoch=0, step=0, progress=0.0))
    assert set(out) == {"loss", "contrastive", "recon", "synth"}
    assert out["synth"].item() == 0.0
    torch.testing.assert_close(out["loss"].detach(), out["contrastive"] + 0.5 * out["recon"])
    out = m(v1, v2, StepInfo(epoch=1, step=1, progress=0.5))
    assert out["synth"].item() > 0
    torch.testing.assert_close(out["loss"].detach(),
                               out["contrastive"] + 0.5 * out["recon"] + 2.0 * out["synth"])
    assert int(m.queue_ptr) == (ptr + 2 * len(v1)) % 64  # only real keys are enqueued
    out["loss"].backward()
    assert any(p.grad is not None for p in m.decoder.parameters())


def test_recon_stopgrad_knob():
    v1, v2 = _views()
    for stopgrad in (True, False):
        m = _sdf(recon_stopgrad=stopgrad, warmup_epochs=5).train()
        z = m.backbone(v1)
        m.recon_loss(m.decode(z if not stopgrad else z.detach()), v1).backward()
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
        assert got is (not stopgrad)


def test_decoded_pair_for_tensorboard():
    m = _sdf(decoder_size=16).eval()
    a, b = m.decoded_pair(_views(batch=4)[0])
    assert a.shape == b.shape == (4, 3, 16, 16)
    assert 0 <= a.min() and a.max() <= 1
    assert m.spatial_maps(_views(batch=2)[0]) == {}


def test_pretrain_cli_sdf(synth_root, tmp_path):
    rc = main(pretrain_argv("sdf", synth_root, tmp_path, *TINY_SDF, name="sdf-run",
                            batch_size=32))
    assert rc == 0
    lines = (tmp_path / "runs" / "sdf-run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    import json

    last = json.loads(lines[-1])
    assert last["loss_synth"] > 0 and last["loss_recon"] > 0 and "val_knn_top1" in last
