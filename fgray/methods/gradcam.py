"""Grad-CAM from any scalar loss — one implementation for every method.

- `feature_gradcam(loss, F)`, LCR form (Shu et al., CVPR 2023, official code):
  G = ReLU(sum_c F * dL/dF), element-wise gradient times activation summed over channels.
- `feature_gradcam(loss, F, mode="classic")`, Selvaraju et al. (ICCV 2017):
  G = ReLU(sum_c w_c F_c) with w_c the spatial mean of dL/dF_c.
- `input_gradcam(loss, x)`, input level (PP-SSL's IADM): G = ReLU(sum_rgb x * dL/dx), the
  pixels whose presence raises the loss (`sign="raises_loss"`, the default here); with
  `sign="lowers_loss"`, G = ReLU(-sum_rgb x * dL/dx), the pixels whose presence lowers it --
  for a contrastive loss, the evidence for the positive pair, as Grad-CAM of a score is.

Gradients come from `torch.autograd.grad` without `create_graph`, so no second graph is built;
the maps are detached constants. `retain_graph=True` (the default) keeps the forward graph
alive so the caller can still backpropagate the same loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _grad(loss: Tensor, wrt: Tensor, retain_graph: bool) -> Tensor:
    if not wrt.requires_grad:
        raise ValueError("Grad-CAM needs a tensor that is part of the loss's graph")
    (g,) = torch.autograd.grad(loss, wrt, retain_graph=retain_graph, allow_unused=False)
    return g


def feature_gradcam(loss: Tensor, feature_map: Tensor, *,
                    mode: Literal["lcr", "classic"] = "lcr",
                    retain_graph: bool = True) -> Tensor:
    """(B, h, w) non-negative, detached map of `feature_map` (B, C, h, w) for `loss`."""
    g = _grad(loss, feature_map, retain_graph)
    fmap = feature_map.detach()
    if mode == "lcr":
        cam = (fmap * g).sum(1)
    elif mode == "classic":
        cam = (g.mean((2, 3), keepdim=True) * fmap).sum(1)
    else:
        raise ValueError(f"unknown Grad-CAM mode {mode!r}")
    return F.relu(cam).detach()


SIGNS = ("raises_loss", "lowers_loss")


def input_gradcam(loss: Tensor, images: Tensor, *, retain_graph: bool = True,
                  smooth: int = 0,
                  sign: Literal["raises_loss", "lowers_loss"] = "raises_loss") -> Tensor:
    """(B, H, W) non-negative, detached saliency of the input pixels; `smooth` > 0 averages it
    over a (2*smooth+1)^2 window so single-pixel noise does not dominate. `sign` picks which
    part of sum_rgb x * dL/dx is kept: "raises_loss" its positive part, "lowers_loss" the
    positive part of its negation."""
    if sign not in SIGNS:
        raise ValueError(f"unknown saliency sign {sign!r}: expected one of {', '.join(SIGNS)}")
    g = _grad(loss, images, retain_graph)
    attribution = (images.detach() * g).sum(1)
    cam = F.relu(attribution if sign == "raises_loss" else -attribution)
    if smooth > 0:
        k = 2 * smooth + 1
        cam = F.avg_pool2d(cam[:, None], k, stride=1, padding=smooth,
                           count_include_pad=False)[:, 0]
    return cam.detach()


def normalise_maps(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Min-max normalise each (h, w) map of a (B, h, w) batch to [0, 1]."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(maps)
