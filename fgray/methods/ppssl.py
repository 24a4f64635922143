"""PP-SSL — Priority-Perception Self-Supervised Learning (Li, Cai, Zhang, Zhang, Shu, Liu, Li,
Liu; arXiv 2412.00134), on the MoCo v2 core.

The paper has no public code. What it states [paper]: an Anti-Interference Strategy (AIS)
builds a fine-grained textual description corpus and uses CLIP-based knowledge distillation to
guide the encoder to drop irrelevant features; an Image-Aided Distinction Module (IADM) uses a
Grad-CAM computed on the original image (input level), not on intermediate feature maps, to
reveal subtle differences; inference uses the image encoder only.

Everything else is ours [ours]:

- AIS: the corpus is `fgray.methods.corpus` (attribute sentences, CLIP text embeddings in a
  Parquet table, `corpus_path`, optionally an evenly spaced subset of `corpus_size`). A student
  head (Linear or a 2-layer MLP) maps the pooled backbone feature of the query view into CLIP
  space; the teacher is the frozen CLIP image encoder on the same augmented view (resized to
  CLIP's input size, converted from the views' normalisation, the backbone's own mean/std, to
  CLIP's). Both give cosine similarities to the corpus; the loss is KL(softmax(t/τ) ‖
  softmax(s/τ)), batch mean, weight `kd_weight`. The student head is trained with the encoder;
  the teacher is loaded on the first training step and is not part of the checkpoint. AIS is
  opt-in (kd_weight = 0 by default) because it needs CLIP weights and a corpus; asking for it
  without them is an error.
- IADM: the input-level Grad-CAM ReLU(−Σ_rgb x ⊙ ∂L_C/∂x) of the InfoNCE loss w.r.t. the
  query view -- the pixels whose presence lowers the loss, i.e. the evidence for the positive pair
  (`saliency_sign=lowers_loss`; `raises_loss` keeps ReLU(+Σ_rgb x ⊙ ∂L_C/∂x) instead) --
  box-smoothed (`smooth`), selects what to keep: "crop" keeps the window of area
  `keep_fraction` (the view's aspect) holding the most saliency, resized back to the view size
  with roi_align; "mask" multiplies the view by a soft mask that is 1 on the top
  `keep_fraction` of pixels by saliency and saliency/threshold below it (0 in the views'
  normalised space is the mean colour of the backbone's normalisation). The kept view's query
  is contrasted with the key of the other view (the global key) against the queue, weight
  `iadm_weight`.
- L = L_InfoNCE + kd_weight·L_kd + iadm_weight·L_iadm; only real keys are enqueued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from fgray.config import check_range
from fgray.errors import UserError
from fgray.methods.base import StepInfo, Suggest, register
from fgray.methods.corpus import (
    check_clip_weights,
    corpus_info,
    load_clip,
    load_corpus,
    select_subset,
    weights_identity,
)
from fgray.methods.gradcam import input_gradcam
from fgray.methods.moco import MoCoV2, MoCoV2Config
from fgray.models.backbone import Backbone
from fgray.models.heads import mlp

__all__ = ["PPSSL", "PPSSLConfig", "iadm_boxes", "iadm_view", "kd_loss", "to_clip_input"]


@dataclass
class PPSSLConfig(MoCoV2Config):
    kd_weight: float = 0.0  # AIS distillation weight; > 0 needs clip_weights and corpus_path
    kd_temperature: float = 0.05
    student_head: Literal["linear", "mlp"] = "mlp"
    iadm_weight: float = 1.0
    iadm_mode: Literal["crop", "mask"] = "crop"
    keep_fraction: float = 0.5  # area (crop) or pixel share (mask) kept by IADM
    smooth: int = 2  # saliency box filter half-width, pixels
    # Which pixels IADM's input Grad-CAM keeps: "lowers_loss" = ReLU(-sum_rgb x * dL/dx), the
    # evidence for the positive pair; "raises_loss" = ReLU(sum_rgb x * dL/dx), the form used
    # before. benchmarks/iadm_sign.py measured both (docs/methods.md, PP-SSL).
    saliency_sign: Literal["lowers_loss", "raises_loss"] = "lowers_loss"
    corpus_path: str | None = None
    corpus_size: int = 0  # 0: every text of the corpus
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        check_range("kd_weight", self.kd_weight, 0.0)
        check_range("kd_temperature", self.kd_temperature, 0.0, lo_open=True)
        check_range("iadm_weight", self.iadm_weight, 0.0)
        check_range("keep_fraction", self.keep_fraction, 0.0, 1.0, lo_open=True)
        check_range("smooth", self.smooth, 0, 64)
        check_range("corpus_size", self.corpus_size, 0)
        if self.kd_weight > 0:
            check_clip_weights(self.clip_model, self.clip_weights)
            if self.corpus_path is None:
                raise UserError("kd_weight > 0 (AIS) needs a text corpus: build one with `fgray"
                                " corpus` and set corpus_path=PATH, or set kd_weight=0")
            if not Path(self.corpus_path).expanduser().is_file():
                raise UserError(f"corpus_path {self.corpus_path!r}: file not found; build it"
                                " with `fgray corpus` or set kd_weight=0")


# -- AIS ----------------------------------------------------------------------------------------


def kd_loss(student: Tensor, teacher: Tensor, corpus: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher sims / τ) ‖ softmax(student sims / τ)), batch mean; sims are cosine
    similarities of the (B, D) embeddings to the (N, D) corpus."""
    corpus = F.normalize(corpus.float(), dim=1)
    s = F.normalize(student.float(), dim=1) @ corpus.t() / temperature
    t = F.normalize(teacher.float(), dim=1) @ corpus.t() / temperature
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True,
                    reduction="batchmean")


def to_clip_input(view: Tensor, size: tuple[int, int], mean: tuple[float, ...],
                  std: tuple[float, ...], *, view_mean: tuple[float, ...],
                  view_std: tuple[float, ...]) -> Tensor:
    """A view normalised with `view_mean`/`view_std` (the student backbone's), resized to
    CLIP's input `size` and normalised with CLIP's `mean`/`std`."""
    def stats(v):
        return torch.tensor(v, device=view.device, dtype=torch.float32).view(1, 3, 1, 1)

    x = view.float() * stats(view_std) + stats(view_mean)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - stats(mean)) / stats(std)


# -- IADM ---------------------------------------------------------------------------------------


def iadm_boxes(saliency: Tensor, keep_fraction: float) -> Tensor:
    """(B, 4) boxes x1, y1, x2, y2 (pixels) of the window of area `keep_fraction` of a
    (B, H, W) saliency map holding the most saliency; flat maps give the centre window."""
    b, h, w = saliency.shape
    side = math.sqrt(keep_fraction)
    kh, kw = max(1, min(h, round(h * side))), max(1, min(w, round(w * side)))
    mass = F.avg_pool2d(saliency[:, None].float(), (kh, kw), stride=1)[:, 0]  # (B, h', w')
    flat = mass.flatten(1)
    best = flat.argmax(1)
    centre = ((h - kh) // 2) * mass.shape[-1] + (w - kw) // 2
    best = torch.where(flat.max(1).values > flat.min(1).values, best, torch.full_like(best,
                                                                                     centre))
    y = (best // mass.shape[-1]).float()
    x = (best % mass.shape[-1]).float()
    return torch.stack([x, y, x + kw, y + kh], 1)


def iadm_view(images: Tensor, saliency: Tensor, mode: str, keep_fraction: float) -> Tensor:
    """The view IADM contrasts: the most salient region of `images` (B, 3, H, W)."""
    if mode == "crop":
        boxes = iadm_boxes(saliency, keep_fraction).to(images.dtype)
        rois = torch.cat([torch.arange(len(images), device=images.device,
                                       dtype=images.dtype)[:, None], boxes], 1)
        return roi_align(images, rois, output_size=tuple(images.shape[-2:]), spatial_scale=1.0,
                         sampling_ratio=2, aligned=True)
    if mode == "mask":
        flat = saliency.flatten(1).float()
        thr = torch.quantile(flat, 1.0 - keep_fraction, dim=1, keepdim=True)
        soft = torch.where(thr > 0, (flat / thr.clamp_min(1e-12)).clamp(max=1.0),
                           (flat > 0).float())
        # A map with no saliency at all keeps the whole image rather than blanking it.
        soft = torch.where(flat.amax(1, keepdim=True) > 0, soft, torch.ones_like(soft))
        return images * soft.view_as(saliency)[:, None].to(images.dtype)
    raise ValueError(f"unknown IADM mode {mode!r}")


@register("ppssl")
class PPSSL(MoCoV2):
    Config = PPSSLConfig

    @staticmethod
    def search_space(s: Suggest, fixed: dict[str, Any]) -> None:
        s.float("iadm_weight", 0.1, 2.0, log=True)
        s.float("keep_fraction", 0.2, 0.8)
        # AIS needs a CLIP teacher and a text corpus; without them it stays off (kd_weight 0).
        if fixed.get("clip_weights") and fixed.get("corpus_path"):
            s.float("kd_weight", 0.01, 10.0, log=True, default=1.0)
            s.float("kd_temperature", 0.01, 0.5, log=True)

    def __init__(self, backbone: Backbone, cfg: PPSSLConfig) -> None:
        super().__init__(backbone, cfg)
        self.cfg: PPSSLConfig = cfg
        self.corpus_texts: list[str] = []
        self._teacher: list[nn.Module] = []  # a plain list: not a submodule, not checkpointed
        self._clip_io: tuple = ()
        self.student = None
        if cfg.kd_weight > 0:
            texts, emb = load_corpus(cfg.corpus_path)
            self._check_corpus_model()
            keep = select_subset(len(texts), cfg.corpus_size or None)
            self.corpus_texts = [texts[i] for i in keep]
            self.register_buffer("corpus", F.normalize(emb[keep], dim=1), persistent=False)
            dim = emb.shape[1]
            self.student = (nn.Linear(backbone.num_features, dim) if cfg.student_head == "linear"
                            else mlp(backbone.num_features, cfg.mlp_hidden, dim, 2,
                                     batch_norm=False))

    def _check_corpus_model(self) -> None:
        """The corpus must come from the CLIP the teacher uses (a moved file still matches)."""
        info = corpus_info(self.cfg.corpus_path)["clip"]
        want = weights_identity(self.cfg.clip_model, self.cfg.clip_weights)

        def same(a: dict) -> tuple:
            weights = str(a.get("weights", ""))
            return (a.get("model"), a.get("config_sha256"), Path(weights).name, a.get("size"))

        if same(info) != same(want):
            raise UserError(
                f"corpus {self.cfg.corpus_path} was embedded with CLIP {info.get('model')}"
                f" / {Path(str(info.get('weights'))).name}, but clip_model/clip_weights are"
                f" {want.get('model')} / {Path(str(want.get('weights'))).name}: rebuild it with"
                " `fgray corpus` for these weights")

    # -- AIS -----------------------------------------------------------------------------------

    def teacher(self, device: torch.device) -> nn.Module:
        """The frozen CLIP image encoder, loaded on first use."""
        if not self._teacher:
            clip = load_clip(self.cfg.clip_model, self.cfg.clip_weights)
            visual = clip.model.visual
            out = visual(torch.zeros(1, 3, *clip.image_size))
            if not isinstance(out, Tensor) or out.shape[-1] != self.corpus.shape[1]:
                raise UserError(f"CLIP {self.cfg.clip_model}'s image embedding does not match"
                                f" the corpus dimension {self.corpus.shape[1]}: rebuild the"
                                " corpus with `fgray corpus` for this model")
            self._teacher.append(visual)
            self._clip_io = (clip.image_size, clip.mean, clip.std)
        visual = self._teacher[0]
        if next(visual.parameters()).device != device:
            visual.to(device)
        return visual

    @torch.no_grad()
    def teacher_embed(self, view: Tensor) -> Tensor:
        visual = self.teacher(view.device)
        visual.eval()
        size, mean, std = self._clip_io
        # The views carry the student backbone's normalisation, not necessarily ImageNet's.
        return visual(to_clip_input(view, size, mean, std, view_mean=self.backbone.mean,
                                    view_std=self.backbone.std)).float()

    # -- IADM ----------------------------------------------------------------------------------

    def saliency(self, loss: Tensor, images: Tensor, retain_graph: bool = True) -> Tensor:
        return input_gradcam(loss, images, smooth=self.cfg.smooth, retain_graph=retain_graph,
                             sign=self.cfg.saliency_sign)

    def iadm_view(self, images: Tensor, saliency: Tensor) -> Tensor:
        return iadm_view(images.detach(), saliency, self.cfg.iadm_mode, self.cfg.keep_fraction)

    # -- the method surface ---------------------------------------------------------------------

    def forward(self, view1: Tensor, view2: Tensor, step: StepInfo) -> dict[str, Tensor]:
        cfg = self.cfg
        iadm = cfg.iadm_weight > 0
        x = view1.detach().requires_grad_(True) if iadm else view1
        _, z, q = self.query(x)
        k = self.keys(view2)
        loss_c = self.contrast(q, k)
        total = loss_c
        zero = torch.zeros((), device=loss_c.device)
        loss_kd, loss_i = zero, zero
        if self.student is not None:
            student = self.student(z)
            loss_kd = kd_loss(student, self.teacher_embed(view1), self.corpus,
                              cfg.kd_temperature)
            total = total + cfg.kd_weight * loss_kd
        if iadm:
            kept = self.iadm_view(view1, self.saliency(loss_c, x))
            loss_i = self.contrast(self.query(kept).q, k)
            total = total + cfg.iadm_weight * loss_i
        self.enqueue(k)
        return {"loss": total, "infonce": loss_c.detach(), "kd": loss_kd.detach(),
                "iadm": loss_i.detach()}

    def spatial_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The IADM saliency (B, H, W), with `saliency_sign`, of the InfoNCE loss with the
        image's own momentum key as the positive (no augmentation at evaluation time); nothing
        is enqueued."""
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            loss = self.contrast(self.query(x).q, self.keys(images.detach()))
            return {"saliency": self.saliency(loss, x, retain_graph=False)}
