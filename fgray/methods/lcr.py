"""LCR — Learning Common Rationale (Shu, van den Hengel, Liu, CVPR 2023; arXiv 2303.01669).

Follows the authors' MoCo path (github.com/GANPerf/LCR, `moco/builder.py`, `main_moco.py`) on
fgray's MoCo v2 core:

- a rationale branch on the query encoder's last feature map F: `Conv2d(C_F -> C, 1x1, no bias)
  -> BN -> ReLU` (C = `capacity`, 32 in the code); the attention map A is the max over the C
  channels, min-max normalised;
- its target is the Grad-CAM of the MoCo InfoNCE loss w.r.t. F, `G = ReLU(sum_c F * dL/dF)`,
  taken with `torch.autograd.grad` without `create_graph`, so G is a constant;
- `L = L_InfoNCE + nu * KL(softmax(G/t) || softmax(A/t))` over the h*w positions, summed over the
  batch as the code's `F.kl_div(..., reduction='sum')` does (nu = 0.01; t = 0.4 as in the
  code's BYOL path);
- F is not detached: the fitting loss trains the backbone too;
- test-time feature: L2-normalise(avg-pool(A * F));
- SGD at lr 0.03 for batch 128, unscaled (the README's command): `optim_defaults` holds 0.06
  per 256 images, which fgray's linear scaling turns into 0.03 at batch 128.

Deliberate differences from the code, each a documented choice:

- A is min-max normalised per image; the code normalises over the whole batch (`torch.min(img)`),
  which would make a test-time feature depend on the other images of its batch;
- the code's MoCo path softmaxes each row of the h x w maps separately and without t (the BYOL
  path flattens and uses t); we flatten h*w and use t in both;
- the code also trains a second head and queue on A-pooled features whose logits never enter the
  loss (dead code) — not reproduced;
- `depth` = 2 adds `Conv2d(C -> C, 1x1, no bias) -> BN -> ReLU` after the first block [ours], a
  knob for the capacity sweep;
- `detach_branch_input` [ours] stops L_cam at F, so it trains the branch only;
- `normalise_target` [ours] min-max normalises G per image before the softmax, like A. The
  code's G is the gradient of a batch-mean loss, so its scale shrinks as 1/B: at t = 0.4 the
  target softmax(G/t) is almost uniform (max/min probability ratio about 1.002 for a random
  ResNet-50 at batch 8, 1.02 for test_resnet at batch 16), and L_cam then mostly asks A to be
  flat. Off by default, as in the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgray.config import check_range
from fgray.errors import UserError
from fgray.eval_mode import eval_mode
from fgray.methods.base import StepInfo, Suggest, register
from fgray.methods.gradcam import feature_gradcam, normalise_maps
from fgray.methods.moco import MoCoV2, MoCoV2Config
from fgray.models.backbone import Backbone


@dataclass
class LCRConfig(MoCoV2Config):
    dim: int = 256  # LCR's main_moco.py default (MoCo v2 uses 128)
    capacity: int = 32  # C: channels of the rationale branch
    depth: int = 1  # 1x1 conv-BN-ReLU blocks in the branch
    nu: float = 0.01  # weight of the rationale-fitting loss
    t: float = 0.4  # softmax temperature of both maps in the KL
    cam_reduction: Literal["sum", "mean"] = "sum"  # over the batch; the code sums
    normalise_target: bool = False  # min-max normalise G per image (not in the code)
    detach_branch_input: bool = False
    embed: Literal["rationale", "plain"] = "rationale"

    def validate(self) -> None:
        super().validate()
        check_range("capacity", self.capacity, 1)
        check_range("depth", self.depth, 1, 2)
        check_range("nu", self.nu, 0.0)
        check_range("t", self.t, 0.0, lo_open=True)


def rationale_branch(in_channels: int, capacity: int, depth: int) -> nn.Sequential:
    """`depth` blocks of 1x1 Conv (no bias) -> BatchNorm2d -> ReLU, in_channels -> capacity."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(in_channels if i == 0 else capacity, capacity, 1, bias=False),
                   nn.BatchNorm2d(capacity), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def rationale_kl(gradcam: Tensor, attention: Tensor, t: float, reduction: str) -> Tensor:
    """KL(softmax(G/t) || softmax(A/t)) over the flattened h*w positions of each image, summed
    (as LCR's code) or averaged over the batch. Computed in float32."""
    log_p_att = F.log_softmax(attention.flatten(1).float() / t, dim=1)
    p_cam = F.softmax(gradcam.flatten(1).float() / t, dim=1)
    per_image = F.kl_div(log_p_att, p_cam, reduction="none").sum(1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


@register("lcr")
class LCR(MoCoV2):
    Config = LCRConfig
    default_backbone = "resnet50"
    augment_preset = "mocov2"
    # LCR's README trains at lr 0.03 with batch 128 and does not scale it by batch/256; the
    # engine does (lr x global batch / 256), so the recipe's 0.03 at batch 128 is 0.06 here.
    optim_defaults = {**MoCoV2.optim_defaults, "lr": 0.06}

    @staticmethod
    def search_space(s: Suggest, fixed: dict[str, Any]) -> None:
        s.int("capacity", 1, 256, log=True)
        s.categorical("depth", (1, 2))
        s.float("nu", 1e-3, 1e-1, log=True)
        s.float("t", 0.1, 1.0)

    def __init__(self, backbone: Backbone, cfg: LCRConfig) -> None:
        if backbone.is_vit:
            raise UserError(
                f"LCR needs a CNN backbone with a feature map (the paper uses resnet50), but "
                f"'{backbone.name}' is a ViT; pick e.g. resnet50 or test_resnet")
        super().__init__(backbone, cfg)
        self.cfg: LCRConfig = cfg
        self.rationale = rationale_branch(backbone.num_features, cfg.capacity, cfg.depth)

    # -- pieces ---------------------------------------------------------------------------------

    def attention(self, fmap: Tensor) -> Tensor:
        """A (B, h, w): the branch's max over its C channels, min-max normalised per image."""
        return normalise_maps(self.rationale(fmap).amax(1))

    # -- the method surface ---------------------------------------------------------------------

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        fmap, _, q = self.query(view1, feature_map=True)
        k = self.keys(view2)
        infonce = self.contrast(q, k)
        self.enqueue(k)
        target = feature_gradcam(infonce, fmap)
        if self.cfg.normalise_target:
            target = normalise_maps(target)
        branch_in = fmap.detach() if self.cfg.detach_branch_input else fmap
        cam = rationale_kl(target, self.attention(branch_in), self.cfg.t, self.cfg.cam_reduction)
        loss = infonce + self.cfg.nu * cam
        return {"loss": loss, "infonce": infonce.detach(), "cam": cam.detach()}

    def embed(self, images: Tensor) -> Tensor:
        if self.cfg.embed == "plain":
            return super().embed(images)
        fmap = self.backbone.feature_map(images)
        weighted = self.attention(fmap).unsqueeze(1).to(fmap.dtype) * fmap
        return F.normalize(Backbone.pooled_from_map(weighted), dim=1)

    @torch.no_grad()
    def spatial_maps(self, images: Tensor) -> dict[str, Tensor]:
        with eval_mode(self):
            return {"rationale": self.attention(self.backbone.feature_map(images)).float()}
