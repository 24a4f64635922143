"""LoDisc — Local Discrimination (Shi, Wei, Nie, Huang; arXiv 2403.04066).

Follows the authors' code (github.com/huanglab-research/LoDisc, `Disc/builder.py`, `main.py`,
`vits.py`) on fgray's MoCo v3 core:

- location-wise mask sampling: the **momentum encoder** runs on each view; the head-averaged
  attention of every block is fused by element-wise product; the CLS -> patch row is ranked and
  the top ~30 % of patches are kept, the rest zeroed at pixel level (patch-size blocks, in the
  normalised image, as the code multiplies the normalised tensor by the mask: a dropped patch
  takes the mean colour of the backbone's own normalisation);
- the masked views go through the momentum encoder only, under no grad, giving k_m;
  `L = L_global + lambda * L_local` with `L_local = ctr(q1, k_m2) + ctr(q2, k_m1)` (lambda = 1);
- test-time feature: normalise(predictor(projector(encoder(x)))).

Implementation choices:

- one momentum pass per unmasked view yields the global key *and* the attention
  (`Backbone.forward_with_attention`, used in that pass only, so the query path keeps timm's
  fused attention); the code runs the momentum encoder twice per view for the same thing;
- the product of 12 softmax maps underflows in bf16 and fp32, so it is computed as a sum of
  logs in float32 (the code multiplies each map by 1000 first); only the ranking matters, and
  `spatial_maps` reports the product renormalised to sum 1 per image (a softmax of the log sum);
- the code keeps the patches strictly above the score at sorted position int(0.3 N), i.e.
  int(0.3 N) patches barring ties; we keep exactly round(rho N) (at least 1) by top-k;
- fusion "last" (last block only) and "rollout" (Abnar & Zuidema 2020: product of
  0.5 A + 0.5 I, rows renormalised) are options [ours]; `sample_temperature` tau > 0 samples the
  kept patches without replacement with probability proportional to score^(1/tau) (Gumbel
  top-k) instead of the code's deterministic top-k [ours];
- CNN backbones [ours]: the location map is the channel L2 norm of the momentum encoder's last
  feature map, each cell standing for an (image / map)-sized block;
- the code steps the EMA once per momentum-encoder update call, four times per iteration
  (`forward` once, `m_extract_attention` once per view, and `images()`, called by `main.py`
  every step), each time towards the same query weights, so its effective momentum is
  m^4 (0.99^4 ~ 0.961 at the start). `momentum_updates=4` reproduces that as one EMA with
  momentum m^4 after the optimiser step (the closed form of four); the default 1 is MoCo v3's.

What the released code does that the MoCo v3 core here does not by default:

- its ViT's `forward` returns the CLS token with the projection head commented out, so no
  projector is used at all: q = predictor(cls) and k = momentum cls, both 768-d (hence
  `--moco-dim 768`). `projector=false` reproduces this (the predictor then maps
  num_features -> num_features, ending in the affine-free BatchNorm1d of its `_build_mlp`
  with `last_bn=True`, and `dim` is unused);
- its MLPs put Dropout(0.2) after every hidden ReLU: `mlp_dropout=0.2` reproduces this.

Recipe (README): AdamW, lr 1e-3 x batch/256, weight decay 0.5, no warm-up, cosine schedule,
T = 0.2, momentum 0.99 ramped to 1, batch 32, 100 epochs, BYOL augmentation (crop min 0.08).
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
from fgray.methods.common import momentum_copy
from fgray.methods.moco import MoCoV3, MoCoV3Config
from fgray.models.backbone import Backbone
from fgray.models.heads import moco_v3_predictor

Fusion = Literal["product", "last", "rollout"]


@dataclass
class LoDiscConfig(MoCoV3Config):
    keep_ratio: float = 0.3  # rho: share of patches kept in the masked view
    local_weight: float = 1.0  # lambda
    fusion: Fusion = "product"
    sample_temperature: float = 0.0  # tau; 0 = deterministic top-k as in the code
    embed: Literal["predictor", "encoder"] = "predictor"
    projector: bool = True  # false: no projector, as the released code
    # Dropout after each hidden ReLU of the projectors and the predictor; the code uses 0.2.
    mlp_dropout: float = 0.0
    # EMA steps per optimiser step (closed form: momentum m^n); the released code makes 4.
    momentum_updates: int = 1

    def validate(self) -> None:
        super().validate()
        check_range("keep_ratio", self.keep_ratio, 0.0, 1.0, lo_open=True)
        check_range("local_weight", self.local_weight, 0.0)
        check_range("sample_temperature", self.sample_temperature, 0.0)
        check_range("mlp_dropout", self.mlp_dropout, 0.0, 1.0, hi_open=True)
        check_range("momentum_updates", self.momentum_updates, 1)


def with_dropout(mlp: nn.Module, p: float) -> nn.Module:
    """`mlp` with Dropout(p) after every ReLU, as LoDisc's `_build_mlp` (same parameters)."""
    if p <= 0 or not isinstance(mlp, nn.Sequential):
        return mlp
    layers: list[nn.Module] = []
    for layer in mlp:
        layers.append(layer)
        if isinstance(layer, nn.ReLU):
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


# -- location scores ---------------------------------------------------------------------------

_TINY = torch.finfo(torch.float32).tiny


def _log(x: Tensor) -> Tensor:
    return x.float().clamp_min(_TINY).log()


def cls_attention_reducer(fusion: str, num_prefix: int):
    """What to keep of each block's attention [B, heads, T, T] while the momentum pass runs:
    the head-averaged CLS row (log, float32) for product/last, the whole head-averaged map for
    rollout (which needs matrix products)."""
    if fusion == "rollout":
        return lambda a: a.float().mean(1)
    return lambda a: _log(a[:, :, 0, num_prefix:].float().mean(1))


def fuse_cls_attention(kept: list[Tensor], fusion: str, num_prefix: int) -> Tensor:
    """Log of the fused CLS -> patch attention [B, N] from the reducer's per-block outputs.

    product: sum over blocks of log A_l[0, patches] (LoDisc's element-wise product);
    last: the last block's; rollout: row 0 of (0.5 A_L + 0.5 I) ... (0.5 A_1 + 0.5 I), each
    factor's rows renormalised (Abnar & Zuidema, ACL 2020).
    """
    if fusion == "product":
        return torch.stack(kept).sum(0)
    if fusion == "last":
        return kept[-1]
    if fusion == "rollout":
        eye = torch.eye(kept[0].shape[-1], device=kept[0].device)
        rollout = None
        for a in kept:
            a = 0.5 * a + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        return _log(rollout[:, 0, num_prefix:])
    raise ValueError(f"unknown fusion {fusion!r}")


def keep_count(num_patches: int, keep_ratio: float) -> int:
    """round(rho N), at least 1 patch and at most N."""
    return min(num_patches, max(1, round(keep_ratio * num_patches)))


def keep_mask(log_scores: Tensor, keep_ratio: float, temperature: float = 0.0,
              generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask [B, h, w] keeping round(rho N) cells per image: the top-scoring ones, or,
    with temperature tau > 0, a sample without replacement with P proportional to
    score^(1/tau) (Gumbel top-k on log-scores / tau)."""
    flat = log_scores.flatten(1).float()
    k = keep_count(flat.shape[1], keep_ratio)
    if temperature > 0:
        u = torch.rand(flat.shape, device=flat.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp(_TINY, 1.0 - 1e-7)))
        flat = flat / temperature + gumbel
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return mask.view_as(log_scores)


def mask_images(images: Tensor, mask: Tensor) -> Tensor:
    """Zero the pixels of dropped cells: each cell of `mask` [B, h, w] covers an
    (H/h) x (W/w) block of `images` [B, C, H, W] (nearest-neighbour upsampling)."""
    pixels = F.interpolate(mask[:, None].float(), size=images.shape[-2:], mode="nearest")
    return images * pixels.to(images.dtype)


@register("lodisc")
class LoDisc(MoCoV3):
    # Backbone, augmentation preset and sync BN are MoCoV3's.
    Config = LoDiscConfig
    # LoDisc's README command: AdamW, lr 1e-3 (x bs/256), wd 0.5, no warm-up.
    optim_defaults = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.5,
                      "warmup_epochs": 0.0}
    structural = ("sampling",)  # topk or stochastic: whether sample_temperature is searched

    @staticmethod
    def search_space(s: Suggest, fixed: dict[str, Any]) -> None:
        s.float("keep_ratio", 0.1, 0.9)
        s.float("local_weight", 0.1, 10.0, log=True)
        s.categorical("fusion", ("product", "last", "rollout"))
        # The released code keeps the top patches deterministically (temperature 0).
        stochastic = s.defaults.get("sample_temperature", 0.0) > 0
        if s.categorical("sampling", ("topk", "stochastic"),
                         default="stochastic" if stochastic else "topk") == "stochastic":
            s.float("sample_temperature", 0.05, 2.0, log=True)

    def __init__(self, backbone: Backbone, cfg: LoDiscConfig) -> None:
        super().__init__(backbone, cfg)
        cfg = self.cfg  # as resolved by MoCoV3 (the temperature by backbone family)
        if backbone.is_vit and backbone.num_prefix_tokens < 1:
            raise UserError(
                f"LoDisc ranks patches by the CLS token's attention, but '{backbone.name}' has "
                "no CLS token; pick e.g. vit_base_patch16_224 or a CNN such as resnet50")
        if not cfg.projector:
            self.projector = nn.Identity()
            # The released predictor `_build_mlp(2, 768, 4096, 768)` ends in an affine-free BN
            # (last_bn=True), as MoCo v3's ViT predictor; CNNs follow MoCo v3's (none).
            self.predictor = moco_v3_predictor(backbone.num_features, cfg.mlp_hidden,
                                               last_bn=backbone.is_vit)
        self.projector = with_dropout(self.projector, cfg.mlp_dropout)
        self.predictor = with_dropout(self.predictor, cfg.mlp_dropout)
        self.projector_k = momentum_copy(self.projector)

    def ema_momentum(self, progress: float) -> float:
        """n EMA steps towards the same query weights equal one with momentum m^n:
        k <- m^n k + (1 - m^n) q."""
        return super().ema_momentum(progress) ** self.cfg.momentum_updates

    # -- momentum pass: keys and location scores ------------------------------------------------

    @torch.no_grad()
    def key_and_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One momentum-encoder pass: the key [B, dim] and the log location scores [B, h, w]."""
        bk = self.backbone_k
        if bk.is_vit:
            npre = bk.num_prefix_tokens
            out = bk.forward_with_attention(x, reduce=cls_attention_reducer(self.cfg.fusion, npre))
            log_scores = fuse_cls_attention(out.attentions, self.cfg.fusion, npre)
            h, w = bk.grid_size(tuple(x.shape[-2:]))
            return self.projector_k(out.pooled), log_scores.view(-1, h, w)
        feats = bk.forward_features(x)
        log_scores = _log(bk.features_to_map(feats).float().norm(dim=1))
        return self.projector_k(bk.pool(feats)), log_scores

    def masked_views(self, x: Tensor, log_scores: Tensor, *,
                     temperature: float | None = None) -> tuple[Tensor, Tensor]:
        """(images with dropped cells zeroed, kept-cell mask [B, h, w])."""
        tau = self.cfg.sample_temperature if temperature is None else temperature
        mask = keep_mask(log_scores, self.cfg.keep_ratio, tau)
        return mask_images(x, mask), mask

    # -- the method surface ---------------------------------------------------------------------

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        q1, q2 = self.query(view1), self.query(view2)
        with torch.no_grad():
            k1, scores1 = self.key_and_scores(view1)
            k2, scores2 = self.key_and_scores(view2)
            k_m1 = self.key(self.masked_views(view1, scores1)[0])
            k_m2 = self.key(self.masked_views(view2, scores2)[0])
        global_loss = self.contrast(q1, k2) + self.contrast(q2, k1)
        local_loss = self.contrast(q1, k_m2) + self.contrast(q2, k_m1)
        loss = global_loss + self.cfg.local_weight * local_loss
        return {"loss": loss, "global": global_loss.detach(), "local": local_loss.detach()}

    def embed(self, images: Tensor) -> Tensor:
        if self.cfg.embed == "encoder":
            return super().embed(images)
        return F.normalize(self.query(images), dim=1)

    @torch.no_grad()
    def spatial_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The momentum encoder's fused map (renormalised to sum 1 per image) and the cells a
        deterministic top-k keeps."""
        with eval_mode(self):
            _, log_scores = self.key_and_scores(images)
        b, h, w = log_scores.shape
        attention = log_scores.flatten(1).softmax(1).view(b, h, w)
        kept = keep_mask(log_scores, self.cfg.keep_ratio, 0.0).float()
        return {"attention": attention, "kept": kept}
