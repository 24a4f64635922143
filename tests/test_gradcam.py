"""The shared Grad-CAM (fgray/methods/gradcam.py) against finite differences on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgray.methods.gradcam import feature_gradcam, input_gradcam, normalise_maps


class TinyNet(nn.Module):
    """conv -> feature map F -> pooled logits -> cross-entropy: a small stand-in for an SSL loss
    whose gradient w.r.t. F differs from cell to cell and from sign to sign."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))

    def loss_from_map(self, fmap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Softmax-weighted spatial pooling makes dL/dF depend on position, not only channel.
        weights = fmap.sum(1, keepdim=True).flatten(2).softmax(-1).view_as(fmap[:, :1])
        pooled = (fmap * weights).sum((2, 3))
        return F.cross_entropy(self.fc(pooled), target)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = TinyNet().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    target = torch.tensor([1, 3])
    return net, x, target


@torch.no_grad()
def _finite_difference(fn, point: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of scalar `fn` at every element of `point` (float64)."""
    grad = torch.zeros_like(point)
    flat, out = point.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        saved = flat[i].item()
        flat[i] = saved + eps
        up = fn(point).item()
        flat[i] = saved - eps
        down = fn(point).item()
        flat[i] = saved
        out[i] = (up - down) / (2 * eps)
    return grad


def test_feature_gradcam_lcr_form_matches_finite_differences():
    net, x, target = _setup()
    with torch.no_grad():
        fixed = net.features(x)
    grad = _finite_difference(lambda f: net.loss_from_map(f, target), fixed.clone())
    expected = (fixed * grad).sum(1).clamp(min=0)  # ReLU(sum_c F * dL/dF)
    assert (expected > 0).any() and (expected == 0).any()  # both ReLU sides exercised

    fmap = net.features(x)
    cam = feature_gradcam(net.loss_from_map(fmap, target), fmap)
    assert cam.shape == (2, 5, 5)
    torch.testing.assert_close(cam, expected, atol=1e-7, rtol=1e-5)


def test_feature_gradcam_classic_uses_channel_pooled_weights():
    net, x, target = _setup(1)
    with torch.no_grad():
        fixed = net.features(x)
    grad = _finite_difference(lambda f: net.loss_from_map(f, target), fixed.clone())
    weights = grad.mean((2, 3), keepdim=True)  # Selvaraju et al.: w_c = mean_hw dL/dF_c
    expected = (weights * fixed).sum(1).clamp(min=0)

    fmap = net.features(x)
    cam = feature_gradcam(net.loss_from_map(fmap, target), fmap, mode="classic")
    torch.testing.assert_close(cam, expected, atol=1e-7, rtol=1e-5)
    lcr = feature_gradcam(net.loss_from_map(fmap, target), fmap, mode="lcr")
    assert not torch.allclose(cam, lcr)  # the two forms are different maps


def test_input_gradcam_matches_finite_differences_and_smoothing():
    net, x, target = _setup(2)

    def loss_of(images: torch.Tensor) -> torch.Tensor:
        return net.loss_from_map(net.features(images), target)

    grad = _finite_difference(loss_of, x.clone())
    expected = (x * grad).sum(1).clamp(min=0)  # ReLU(sum_rgb x * dL/dx)

    images = x.clone().requires_grad_(True)
    cam = input_gradcam(loss_of(images), images)
    assert cam.shape == (2, 5, 5)
    torch.testing.assert_close(cam, expected, atol=1e-7, rtol=1e-5)

    # smooth=1: mean over the 3x3 window, only over pixels inside the image.
    smoothed = input_gradcam(loss_of(images), images, smooth=1)
    manual = torch.zeros_like(expected)
    for r in range(5):
        for c in range(5):
            window = expected[:, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
            manual[:, r, c] = window.mean((1, 2))
    torch.testing.assert_close(smoothed, manual, atol=1e-7, rtol=1e-5)


def test_maps_are_detached_and_leave_the_graph_and_parameter_grads_alone():
    net, x, target = _setup(3)
    fmap = net.features(x)
    loss = net.loss_from_map(fmap, target)
    cam = feature_gradcam(loss, fmap)
    classic = feature_gradcam(loss, fmap, mode="classic")
    for m in (cam, classic):
        assert not m.requires_grad and m.grad_fn is None  # a constant: no second graph
    # Grad-CAM asked for dL/dF only: no parameter gradient was accumulated.
    assert all(p.grad is None for p in net.parameters())

    # The forward graph was retained: the same loss still backpropagates, and to the same
    # parameter gradients as a fresh forward without Grad-CAM.
    loss.backward()
    with_cam = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    net.loss_from_map(net.features(x), target).backward()
    for a, b in zip(with_cam, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b)


def test_retain_graph_false_frees_the_graph():
    net, x, target = _setup(4)
    fmap = net.features(x)
    loss = net.loss_from_map(fmap, target)
    feature_gradcam(loss, fmap, retain_graph=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_input_gradcam_is_detached_and_keeps_the_graph():
    net, x, target = _setup(5)
    images = x.clone().requires_grad_(True)
    loss = net.loss_from_map(net.features(images), target)
    cam = input_gradcam(loss, images, smooth=1)
    assert not cam.requires_grad and cam.grad_fn is None
    assert images.grad is None and all(p.grad is None for p in net.parameters())
    loss.backward()
    assert images.grad is not None and net.conv.weight.grad is not None


def test_gradcam_errors_name_the_problem():
    net, x, target = _setup(6)
    fmap = net.features(x)
    loss = net.loss_from_map(fmap, target)
    with pytest.raises(ValueError, match="part of the loss's graph"):
        feature_gradcam(loss, fmap.detach())
    with pytest.raises(ValueError, match="unknown Grad-CAM mode 'pooled'"):
        feature_gradcam(loss, fmap, mode="pooled")


def test_normalise_maps_is_per_map_min_max():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[-2.0, -2.0], [0.0, 2.0]]])
    out = normalise_maps(maps)
    expected = torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.5, 1.0]]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    flat = normalise_maps(torch.full((1, 2, 2), 7.0))  # a constant map stays finite
    assert torch.isfinite(flat).all() and (flat == 0).all()
