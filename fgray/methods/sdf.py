"""SDF — learning discriminative features from synthesized data (Wang, Liu, Figueroa Weston,
Tian, Li; arXiv 2407.14676), on the MoCo v2 core.

The paper has no public code. What it states [paper]: find the non-discriminative dimensions
of the feature by (a) low variance across the data and (b) low importance under a Grad-CAM
induced from the SSL loss; perturb only those dimensions; a decoder reconstructs images from
the original and the perturbed feature vectors; the two reconstructions form a positive pair
the encoder learns to be invariant to; `L = L_C + α·L_R + ν·L_Cp` (contrastive,
reconstruction, contrastive on synthesized pairs), with MoCo v2 as a baseline.

Everything else is ours [ours]:

- z is the query encoder's pooled backbone feature. Its per-dimension variance is a running
  (EMA, `stat_momentum`) estimate over batches; its per-dimension importance is the batch mean
  of |z ⊙ ∂L_C/∂z| (Grad-CAM on the pooled vector, from `torch.autograd.grad` without
  `create_graph`), EMA'd the same way. Both are buffers, saved with checkpoints, and averaged
  over ranks.
- "Below the q quantile" means the ⌊q·D⌋ dimensions with the lowest value (ties by index), so
  q = 0 selects none and q = 1 all; the set is the union or intersection (`set_rule`) of the
  low-variance and low-importance sets.
- Perturbation on that set only: z' = z + ε·σ_d·N(0,1) ("gaussian", σ_d the running std), or
  "shuffle": the set's values come from another sample of the batch (a derangement).
- The decoder is a DCGAN-style up-convolution generator from z to a `decoder_size` image; a
  sigmoid gives [0,1] RGB, then the views' normalisation (the backbone's own mean/std,
  `Backbone.mean`/`std`) is applied, so its output lives in the views' space. L_R (l1 or l2)
  compares it with the query view area-downsampled to `decoder_size`. With `recon_stopgrad`
  (default) L_R trains only the decoder.
- L_Cp = InfoNCE(f_q(D(z)), f_k(D(z'))) against the MoCo queue, the pair upsampled to the
  view size. The synthesized images are constants for L_Cp: it trains the query encoder, not
  the decoder (otherwise the decoder could learn to hide the perturbation and make the pair
  trivial). Synthesized keys are not enqueued, so the queue holds real-image keys only.
  L_Cp starts after `warmup_epochs`, when the decoder produces images worth contrasting.
  BatchNorm running statistics are not updated by the synthesized pass: evaluation normalises
  with statistics of real images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgray.config import check_range
from fgray.errors import UserError
from fgray.methods.base import StepInfo, Suggest, register
from fgray.methods.common import concat_all_gather, frozen_bn_statistics
from fgray.methods.moco import MoCoV2, MoCoV2Config
from fgray.models.backbone import Backbone

__all__ = ["SDF", "SDFConfig", "UpConvDecoder", "lowest_fraction", "nondiscriminative_dims",
           "perturb_features"]


@dataclass
class SDFConfig(MoCoV2Config):
    epsilon: float = 1.0  # perturbation strength, in running standard deviations
    q_var: float = 0.3  # fraction of dimensions that count as low-variance
    q_cam: float = 0.3  # fraction of dimensions that count as low-importance
    set_rule: Literal["union", "intersection"] = "union"
    perturb: Literal["gaussian", "shuffle"] = "gaussian"
    alpha: float = 1.0  # weight of L_R
    nu: float = 0.5  # weight of L_Cp
    decoder_width: int = 32  # channels of the decoder's last stage (x8 at its 4x4 stem)
    decoder_size: int = 32  # decoded image side; 4 * 2^k
    recon: Literal["l1", "l2"] = "l1"
    recon_stopgrad: bool = True  # L_R trains only the decoder
    warmup_epochs: int = 5  # epochs before L_Cp turns on
    stat_momentum: float = 0.99  # EMA momentum of the variance and importance statistics

    def validate(self) -> None:
        super().validate()
        check_range("epsilon", self.epsilon, 0.0)
        check_range("q_var", self.q_var, 0.0, 1.0)
        check_range("q_cam", self.q_cam, 0.0, 1.0)
        check_range("alpha", self.alpha, 0.0)
        check_range("nu", self.nu, 0.0)
        check_range("decoder_width", self.decoder_width, 1)
        check_range("decoder_size", self.decoder_size, 8, 1024)
        steps = math.log2(self.decoder_size / 4)
        if steps != int(steps):
            raise UserError(f"decoder_size={self.decoder_size}: expected 4 * 2^k, e.g. 16, 32"
                            " or 64")
        check_range("warmup_epochs", self.warmup_epochs, 0)
        check_range("stat_momentum", self.stat_momentum, 0.0, 1.0, hi_open=True)


def lowest_fraction(values: Tensor, q: float) -> Tensor:
    """Boolean mask of the ⌊q·D⌋ entries of a (D,) vector with the lowest values (ties go to
    the lower index)."""
    n = int(q * values.numel() + 1e-9)
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[torch.argsort(values, stable=True)[:n]] = True
    return mask


def nondiscriminative_dims(variance: Tensor, importance: Tensor, q_var: float, q_cam: float,
                           rule: str = "union") -> Tensor:
    """[ours] The dimensions SDF perturbs: low variance and/or low Grad-CAM importance."""
    low_var, low_cam = lowest_fraction(variance, q_var), lowest_fraction(importance, q_cam)
    if rule == "union":
        return low_var | low_cam
    if rule == "intersection":
        return low_var & low_cam
    raise ValueError(f"unknown set rule {rule!r}")


def _derangement(n: int, device: torch.device) -> Tensor:
    """A permutation with no fixed point (n > 1): each sample takes another's values."""
    perm = torch.randperm(n, device=device)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(-1)
    return partner


def perturb_features(z: Tensor, mask: Tensor, *, mode: str, epsilon: float,
                     std: Tensor) -> Tensor:
    """[ours] z with only the `mask` dimensions perturbed: Gaussian noise of ε·σ_d, or the
    values of another sample of the batch ("shuffle")."""
    if mode == "gaussian":
        noise = torch.randn_like(z) * (epsilon * std.to(z.dtype))
        return z + noise * mask.to(z.dtype)
    if mode == "shuffle":
        if len(z) < 2:
            return z.clone()
        return torch.where(mask, z[_derangement(len(z), z.device)], z)
    raise ValueError(f"unknown perturbation {mode!r}")


class UpConvDecoder(nn.Module):
    """[ours] z (B, D) -> image (B, 3, size, size) in [0, 1]: a Linear to a 4x4 stem, then
    ConvTranspose2d(4, 2, 1)–BN–ReLU stages doubling the side and halving the channels
    (DCGAN, Radford et al. 2016), a 3x3 conv to RGB and a sigmoid."""

    def __init__(self, in_dim: int, size: int = 32, width: int = 32) -> None:
        super().__init__()
        stages = int(round(math.log2(size / 4)))
        chans = [width * 2 ** min(stages - i, 3) for i in range(stages + 1)]
        self.stem_channels = chans[0]
        self.stem = nn.Sequential(nn.Linear(in_dim, chans[0] * 16),
                                  nn.BatchNorm1d(chans[0] * 16), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.stem(z).view(len(z), self.stem_channels, 4, 4)
        return torch.sigmoid(self.to_rgb(self.blocks(h)))


@register("sdf")
class SDF(MoCoV2):
    Config = SDFConfig

    @staticmethod
    def search_space(s: Suggest, fixed: dict[str, Any]) -> None:
        if s.categorical("perturb", ("gaussian", "shuffle")) == "gaussian":
            s.float("epsilon", 0.1, 3.0, log=True)
        s.float("q_var", 0.05, 0.6)
        s.float("q_cam", 0.05, 0.6)
        s.categorical("set_rule", ("union", "intersection"))
        s.float("alpha", 0.1, 10.0, log=True)
        s.float("nu", 0.05, 2.0, log=True)

    def __init__(self, backbone: Backbone, cfg: SDFConfig) -> None:
        super().__init__(backbone, cfg)
        self.cfg: SDFConfig = cfg
        dim = backbone.num_features
        self.decoder = UpConvDecoder(dim, cfg.decoder_size, cfg.decoder_width)
        self.register_buffer("feat_var", torch.ones(dim))
        self.register_buffer("feat_importance", torch.ones(dim))
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))
        # The views are normalised with the backbone's own statistics (its weights'
        # pretrained_cfg), so D(z) must be too, to live in the same space.
        self.register_buffer("view_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("view_std", torch.tensor(backbone.std).view(1, 3, 1, 1),
                             persistent=False)

    # -- statistics and the perturbed set ---------------------------------------------------

    @torch.no_grad()
    def update_statistics(self, z: Tensor, grad_z: Tensor) -> None:
        """EMA of the per-dimension variance of z and of the batch mean of |z ⊙ ∂L_C/∂z|."""
        z = z.detach().float()
        importance = concat_all_gather((z * grad_z.float()).abs().mean(0, keepdim=True)).mean(0)
        z_all = concat_all_gather(z)
        variance = z_all.var(0, unbiased=True) if len(z_all) > 1 else torch.zeros_like(z[0])
        # The first batch initialises the averages (momentum 0), chosen on the device so the
        # training step never waits for the host.
        m = torch.where(self.stats_ready, self.cfg.stat_momentum, 0.0)
        self.feat_var.copy_(m * self.feat_var + (1 - m) * variance)
        self.feat_importance.copy_(m * self.feat_importance + (1 - m) * importance)
        self.stats_ready.fill_(True)

    def nondiscriminative_mask(self) -> Tensor:
        return nondiscriminative_dims(self.feat_var, self.feat_importance, self.cfg.q_var,
                                      self.cfg.q_cam, self.cfg.set_rule)

    def perturb(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = self.nondiscriminative_mask() if mask is None else mask
        return perturb_features(z, mask, mode=self.cfg.perturb, epsilon=self.cfg.epsilon,
                                std=self.feat_var.clamp_min(0).sqrt())

    # -- decoder ------------------------------------------------------------------------------

    def decode(self, z: Tensor) -> Tensor:
        """D(z) in the views' normalised space, (B, 3, decoder_size, decoder_size)."""
        return (self.decoder(z) - self.view_mean) / self.view_std

    def recon_target(self, view: Tensor) -> Tensor:
        size = self.cfg.decoder_size
        if view.shape[-1] == size and view.shape[-2] == size:
            return view.detach()
        return F.interpolate(view.detach().float(), size=(size, size), mode="area")

    def recon_loss(self, recon: Tensor, view: Tensor) -> Tensor:
        target = self.recon_target(view).to(recon.dtype)
        if self.cfg.recon == "l1":
            return F.l1_loss(recon, target)
        return F.mse_loss(recon, target)

    @torch.no_grad()
    def synthesized_pair(self, z: Tensor, size: tuple[int, int],
                         recon: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(D(z), D(z')) at the view size, as constants."""
        a = self.decode(z.detach()) if recon is None else recon.detach()
        b = self.decode(self.perturb(z.detach()))
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return a, b

    def synth_loss(self, z: Tensor, size: tuple[int, int],
                   recon: Tensor | None = None) -> Tensor:
        """L_Cp: InfoNCE between the query of D(z) and the key of D(z') against the queue;
        the gradient reaches the query encoder only.

        BatchNorm layers normalise these batches with their own statistics (train mode) but
        leave the running statistics alone: those are what evaluation uses, and they must
        describe real images, not 32-px decodings.
        """
        with frozen_bn_statistics(self):
            x, x_p = self.synthesized_pair(z, size, recon)
            return self.contrast(self.query(x).q, self.keys(x_p))

    @torch.no_grad()
    def decoded_pair(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(D(z), D(z')) as [0, 1] RGB images at decoder_size, for TensorBoard. Uses the
        running statistics (before the first step: all ones, so ties go by index)."""
        z = self.backbone(images)
        return self.decoder(z), self.decoder(self.perturb(z))

    def pair_images(self, images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        return {"decoded": self.decoded_pair(images)}

    # -- the method surface -----------------------------------------------------------------

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        cfg = self.cfg
        _, z, q = self.query(view1)
        k = self.keys(view2)
        loss_c = self.contrast(q, k)
        if self.training:
            (grad_z,) = torch.autograd.grad(loss_c, z, retain_graph=True)
            self.update_statistics(z, grad_z)
        recon = self.decode(z.detach() if cfg.recon_stopgrad else z)
        loss_r = self.recon_loss(recon, view1)
        total = loss_c + cfg.alpha * loss_r
        loss_s = torch.zeros((), device=loss_c.device)
        if step.epoch >= cfg.warmup_epochs:
            loss_s = self.synth_loss(z, tuple(view1.shape[-2:]), recon)
            total = total + cfg.nu * loss_s
        self.enqueue(k)
        return {"loss": total, "contrastive": loss_c.detach(), "recon": loss_r.detach(),
                "synth": loss_s.detach()}
