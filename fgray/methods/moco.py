"""MoCo v2 and MoCo v3: the shared core every fgray method builds on.

MoCo v2 — He et al., "Momentum Contrast for Unsupervised Visual Representation Learning"
(CVPR 2020) and Chen et al., "Improved Baselines with Momentum Contrastive Learning"
(arXiv 2003.04297); follows facebookresearch/moco `moco/builder.py`: a query encoder
(backbone + MLP), a momentum key encoder, a queue of negatives, InfoNCE with temperature,
shuffle-BN across ranks and keys all-gathered before enqueueing.

MoCo v3 — Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
Transformers" (ICCV 2021); follows facebookresearch/moco-v3 `moco/builder.py`: projector +
predictor, in-batch negatives gathered across ranks, symmetric loss scaled by 2T, momentum
ramped to 1 along a cosine, T = 0.2 for ViTs and 1.0 for ResNets as its recipes. Not
reproduced: its ViT's stop-gradient patch embedding and fixed 2-D sin-cos position embedding
(`vits.py`), which matter mostly from random initialisation; fgray uses timm's ViT as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fgray.config import check_range
from fgray.methods.base import Method, StepInfo, register
from fgray.methods.common import (
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    concat_all_gather,
    cosine_momentum,
    distributed,
    ema_update,
    info_nce_in_batch,
    info_nce_queue,
    momentum_copy,
    shuffled_groups_forward,
)
from fgray.models.backbone import Backbone
from fgray.models.heads import moco_v2_projector, moco_v3_predictor, moco_v3_projector


@dataclass
class MoCoV2Config:
    dim: int = 128
    mlp_hidden: int = 2048
    queue_size: int = 65536
    temperature: float = 0.2
    momentum: float = 0.999
    # Single-process stand-in for cross-rank shuffle-BN: keys are encoded in this many
    # random sub-batches so BatchNorm statistics cannot pair a key with its query.
    shuffle_bn_groups: int = 2

    def validate(self) -> None:
        check_range("dim", self.dim, 1)
        check_range("mlp_hidden", self.mlp_hidden, 1)
        check_range("queue_size", self.queue_size, 1)
        check_range("temperature", self.temperature, 0.0, lo_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("shuffle_bn_groups", self.shuffle_bn_groups, 1)


class Query(NamedTuple):
    """What the query encoder computes on the way to q, for methods that need more than q."""

    features: Tensor  # the backbone's feature output (timm layout), or its NCHW map if asked
    pooled: Tensor  # z: the pooled backbone feature the projector reads
    q: Tensor  # the L2-normalised projection


@register("moco")
class MoCoV2(Method):
    Config = MoCoV2Config
    default_backbone = "resnet50"
    augment_preset = "mocov2"
    optim_defaults = {"optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4}

    def __init__(self, backbone: Backbone, cfg: MoCoV2Config) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = moco_v2_projector(backbone.num_features, cfg.mlp_hidden, cfg.dim)
        self.backbone_k = momentum_copy(self.backbone)
        self.projector_k = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- pieces subclasses reuse ------------------------------------------------------------

    def query(self, x: Tensor, *, feature_map: bool = False) -> Query:
        """The query encoder on `x`: its features, pooled feature z and q. With `feature_map`,
        `features` is the NCHW map F and the head reads that view of it, so F is in q's graph
        even for an NHWC model (Grad-CAM of the loss w.r.t. F needs it)."""
        feats = self.backbone.forward_features(x)
        out = feats
        if feature_map:
            out = self.backbone.features_to_map(feats)
            if out is not feats:
                feats = out.permute(0, 2, 3, 1)
        z = self.backbone.pool(feats)
        return Query(out, z, F.normalize(self.projector(z), dim=1))

    def _key_encoder(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector_k(self.backbone_k(x)), dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Momentum-encoder keys with shuffle-BN (across ranks, or in sub-batches)."""
        if distributed():
            shuffled, idx_unshuffle = batch_shuffle_ddp(x)
            return batch_unshuffle_ddp(self._key_encoder(shuffled), idx_unshuffle)
        return shuffled_groups_forward(self._key_encoder, x, self.cfg.shuffle_bn_groups)

    def contrast(self, q: Tensor, k: Tensor) -> Tensor:
        return info_nce_queue(q, k, self.queue.clone().detach(), self.cfg.temperature)

    @torch.no_grad()
    def enqueue(self, k: Tensor) -> None:
        """Write the keys of every rank into the ring buffer. A global batch that does not
        divide the queue size wraps around instead of failing."""
        k = concat_all_gather(k)
        size = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(len(k), device=k.device)) % size
        self.queue[idx[-size:]] = k[-size:].to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % size)

    # -- the method surface -----------------------------------------------------------------

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        q = self.query(view1).q
        k = self.keys(view2)
        loss = self.contrast(q, k)
        self.enqueue(k)
        return {"loss": loss, "infonce": loss.detach()}

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.backbone(images), dim=1)

    def momentum_update(self, progress: float) -> None:
        ema_update(self.backbone_k, self.backbone, self.cfg.momentum)
        ema_update(self.projector_k, self.projector, self.cfg.momentum)


@dataclass
class MoCoV3Config:
    dim: int = 256
    mlp_hidden: int = 4096
    temperature: float | None = None  # None: the recipe's, by backbone family (family_defaults)
    momentum: float = 0.99  # ramped to 1 along a cosine

    def validate(self) -> None:
        check_range("dim", self.dim, 1)
        check_range("mlp_hidden", self.mlp_hidden, 1)
        if self.temperature is not None:
            check_range("temperature", self.temperature, 0.0, lo_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0)


@register("mocov3", in_presets=False)
class MoCoV3(Method):
    Config = MoCoV3Config
    default_backbone = "vit_base_patch16_224"
    augment_preset = "byol"
    optim_defaults = {"optimizer": "adamw", "lr": 1.5e-4, "weight_decay": 0.1,
                      "warmup_epochs": 10.0}
    sync_bn = True

    @classmethod
    def family_defaults(cls, is_vit: bool) -> dict[str, Any]:
        # moco-v3: `--moco-t 0.2` in its ViT recipes (CONFIG.md), 1.0 (main_moco.py's default)
        # in its ResNet ones.
        return {"temperature": 0.2 if is_vit else 1.0}

    def __init__(self, backbone: Backbone, cfg: MoCoV3Config) -> None:
        super().__init__()
        cfg = self.resolve_config(cfg, backbone.is_vit)
        cfg.validate()
        self.cfg = cfg
        self.backbone = backbone
        # moco-v3 builder: ViTs get a 3-layer projector and a predictor ending in BN,
        # ResNets a 2-layer projector and a predictor without it.
        vit = backbone.is_vit
        self.projector = moco_v3_projector(backbone.num_features, cfg.mlp_hidden, cfg.dim,
                                           num_layers=3 if vit else 2)
        self.predictor = moco_v3_predictor(cfg.dim, cfg.mlp_hidden, last_bn=vit)
        self.backbone_k = momentum_copy(self.backbone)
        self.projector_k = momentum_copy(self.projector)
        self.current_momentum = cfg.momentum

    def query(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def key(self, x: Tensor) -> Tensor:
        return self.projector_k(self.backbone_k(x))

    def contrast(self, q: Tensor, k: Tensor) -> Tensor:
        return info_nce_in_batch(F.normalize(q, dim=1), F.normalize(k, dim=1),
                                 self.cfg.temperature)

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        q1, q2 = self.query(view1), self.query(view2)
        k1, k2 = self.key(view1), self.key(view2)
        loss = self.contrast(q1, k2) + self.contrast(q2, k1)
        return {"loss": loss, "infonce": loss.detach()}

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.backbone(images), dim=1)

    def ema_momentum(self, progress: float) -> float:
        """The momentum of this step's EMA update: m cosine-ramped to 1."""
        return cosine_momentum(self.cfg.momentum, progress)

    def momentum_update(self, progress: float) -> None:
        self.current_momentum = self.ema_momentum(progress)
        ema_update(self.backbone_k, self.backbone, self.current_momentum)
        ema_update(self.projector_k, self.projector, self.current_momentum)
