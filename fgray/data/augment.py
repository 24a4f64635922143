"""Two-view SSL augmentation, batched on tensors on the training device.

Each sample in the batch draws its own random parameters (crop box, jitter factors, blur sigma,
...) from a seeded CPU generator; the pixels are then transformed for the whole batch at once
on the device: `roi_align` for RandomResizedCrop (adaptive sampling,
so a downscaled crop averages its source pixels), closed-form colour ops, grouped convolutions
for per-sample Gaussian blur. Crops are drawn over each image's whole extent, its region of
the cache canvas (`fgray.data.cache`: whole images, portrait ones stored transposed), as
torchvision draws them over the whole decoded image; the eval view is the centre square of
the shorter side, as it always was. Presets follow MoCo v2 and BYOL / MoCo v3. Differences from
torchvision's PIL transforms, by design: colour-jitter ops run in a fixed order (brightness,
contrast, saturation, hue) rather than a random one, and blur sigmas are given for 224 px and
scaled with the output size so small test images are not blurred away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from fgray.config import check_range
from fgray.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    size: int = 224
    scale_min: float = 0.2
    scale_max: float = 1.0
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: tuple[float, float] = (0.5, 0.5)  # per view
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p: tuple[float, float] = (0.0, 0.0)  # per view
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def validate(self) -> None:
        check_range("size", self.size, 8, 4096)
        check_range("scale_min", self.scale_min, 0.0, self.scale_max, lo_open=True)
        check_range("scale_max", self.scale_max, self.scale_min, 1.0)
        check_range("ratio_min", self.ratio_min, 0.0, self.ratio_max, lo_open=True)
        for name in ("flip_p", "jitter_p", "gray_p"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("hue", self.hue, 0.0, 0.5)
        for p in (*self.blur_p, *self.solarize_p):
            check_range("blur_p/solarize_p", p, 0.0, 1.0)
        check_range("blur_sigma_min", self.blur_sigma_min, 0.0, self.blur_sigma_max,
                    lo_open=True)


PRESETS = {
    # MoCo v2 (moco/main_moco.py, aug_plus): crop 0.2-1, jitter .4/.4/.4/.1 p .8, gray .2,
    # blur p .5 sigma .1-2, flip.
    "mocov2": AugmentConfig(),
    # BYOL / MoCo v3 asymmetric recipe: crop 0.08-1, jitter .4/.4/.2/.1, blur 1.0 / 0.1,
    # solarize 0 / 0.2.
    "byol": AugmentConfig(scale_min=0.08, saturation=0.2, blur_p=(1.0, 0.1),
                          solarize_p=(0.0, 0.2)),
}


def augment_preset(name: str, size: int, **overrides) -> AugmentConfig:
    if name not in PRESETS:
        raise UserError(f"unknown augmentation preset {name!r}: expected one of"
                        f" {', '.join(PRESETS)}")
    from fgray.config import apply_overrides

    return apply_overrides(PRESETS[name], {"size": size, **overrides}, what="augmentation")


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, per sample) through HSV, batched."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = torch.stack([
        torch.stack([v, q, p, p, t, v], 1),
        torch.stack([t, v, v, q, p, p], 1),
        torch.stack([p, p, t, v, v, q], 1),
    ], 1)  # (B, 3, 6, H, W)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def _blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Per-sample separable Gaussian blur via one grouped convolution per axis. Pass
    `max_sigma` when it is known on the host: reading it from a device tensor is a sync."""
    b, c, h, w = x.shape
    if max_sigma is None:
        max_sigma = float(sigma.max())
    radius = max(1, math.ceil(3.0 * max_sigma))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :],
                 groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None],
                 groups=b * c)
    return y.reshape(b, c, h, w)


def as_regions(regions, n: int, canvas: tuple[int, int]) -> torch.Tensor:
    """Regions (n, 5) as a float64 CPU tensor: x0, y0, w, h of each image on its canvas
    and 1 where it is stored transposed (`fgray.data.cache`); (n, 4) means none is; None
    means the whole (height, width) canvas. Pass host arrays: reading a device tensor syncs."""
    if regions is None:
        return torch.tensor([[0.0, 0.0, canvas[1], canvas[0], 0.0]],
                            dtype=torch.float64).expand(n, 5)
    r = torch.as_tensor(regions).detach().to("cpu", torch.float64)
    if r.dim() != 2 or r.shape[0] != n or r.shape[1] not in (4, 5):
        raise ValueError(f"expected regions of shape ({n}, 5), got {tuple(r.shape)}")
    if r.shape[1] == 4:
        r = torch.cat([r, torch.zeros(n, 1, dtype=r.dtype)], 1)
    return r


def _crop_boxes(regions: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (x1, y1, x2, y2) in canvas pixels, sampled as torchvision
    samples them on each image (its valid region, in its own orientation): up to 10 tries of
    (area, log-ratio) relative to the region, else its centre crop clamped to the ratio range.
    `regions` as `as_regions` returns them."""
    n = regions.shape[0]
    # float32 throughout, as before regions existed: a square canvas draws the same boxes.
    rx, ry, rw, rh, flip_xy = regions.float().unbind(1)
    transposed = flip_xy > 0.5
    width = torch.where(transposed, rh, rw)  # of the image in its own orientation
    height = torch.where(transposed, rw, rh)
    area = (width * height)[:, None] * (cfg.scale_min + (cfg.scale_max - cfg.scale_min)
                                        * torch.rand(n, attempts, generator=gen))
    log_lo, log_hi = math.log(cfg.ratio_min), math.log(cfg.ratio_max)
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, generator=gen))
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    ok = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    found = ok.any(1)
    pick = ok.float().argmax(1, keepdim=True)
    # torchvision's fallback: the centre crop, the whole image when its ratio is in range.
    in_ratio = width / height
    fw = torch.where(in_ratio > cfg.ratio_max, (height * cfg.ratio_max).round(), width)
    fh = torch.where(in_ratio < cfg.ratio_min, (width / cfg.ratio_min).round(), height)
    w = torch.where(found, w.gather(1, pick)[:, 0], fw)
    h = torch.where(found, h.gather(1, pick)[:, 0], fh)
    x0 = torch.floor(torch.rand(n, generator=gen) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=gen) * (height - h + 1))
    x0 = torch.where(found, x0, torch.div(width - w, 2, rounding_mode="floor"))
    y0 = torch.where(found, y0, torch.div(height - h, 2, rounding_mode="floor"))
    # Into the canvas: a transposed image's x runs down the canvas, its y across.
    cx = rx + torch.where(transposed, y0, x0)
    cy = ry + torch.where(transposed, x0, y0)
    cw, ch = torch.where(transposed, h, w), torch.where(transposed, w, h)
    return torch.stack([cx, cy, cx + cw, cy + ch], 1)


class TwoViewAugment:
    """Callable: uint8 (B, 3, H, W) on any device and the images' `regions` (host array
    (B, 5), `CachedSplit.regions[idx]`; None = the whole canvas) -> two normalised float
    views (B, 3, P, P). Crops are drawn over each image's whole valid region, as torchvision's
    RandomResizedCrop draws them over the whole decoded image; a transposed image's view is
    transposed back."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        cfg.validate()
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])

    def __call__(self, images: torch.Tensor,
                 regions=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(images, 0, regions), self.view(images, 1, regions)

    def _draw(self, regions: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every random parameter of one view, drawn on the host in a fixed order: the
        crop rois (n, 5) and the per-sample scalars (n, 11), float32; the last scalar is
        the image's transposed flag (not random)."""
        n = regions.shape[0]
        cfg, gen = self.cfg, self.gen

        def coin(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=gen) < p).float()

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        boxes = _crop_boxes(regions, cfg, gen)
        rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], 1)
        scalars = torch.stack([
            coin(cfg.flip_p), coin(cfg.jitter_p),
            uniform(1 - cfg.brightness, 1 + cfg.brightness),
            uniform(1 - cfg.contrast, 1 + cfg.contrast),
            uniform(1 - cfg.saturation, 1 + cfg.saturation),
            uniform(-cfg.hue, cfg.hue), coin(cfg.gray_p), coin(cfg.blur_p[which]),
            uniform(cfg.blur_sigma_min, cfg.blur_sigma_max) * (cfg.size / 224.0),
            coin(cfg.solarize_p[which]), regions[:, 4].float()], 1)
        return rois, scalars

    def view(self, images: torch.Tensor, which: int, regions=None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype}"
                             f" {tuple(images.shape)}")
        cfg, dev = self.cfg, images.device
        regions = as_regions(regions, images.shape[0], tuple(images.shape[-2:]))
        any_transposed = bool((regions[:, 4] > 0.5).any())
        rois, scalars = self._draw(regions, which)
        # Which samples blur, and how wide, are decided on the host; everything the device
        # needs travels in one copy (pinned and non-blocking on a GPU): no host sync here.
        blur_idx = scalars[:, 7].nonzero()[:, 0]
        max_sigma = float(scalars[blur_idx, 8].max()) if len(blur_idx) else 0.0
        packed = torch.cat([rois, scalars], 1)
        if dev.type == "cuda":
            packed, blur_idx = packed.pin_memory(), blur_idx.pin_memory()
        packed = packed.to(dev, non_blocking=True)
        blur_idx = blur_idx.to(dev, non_blocking=True)
        rois, p = packed[:, :5], packed[:, 5:]

        def flag(col: int) -> torch.Tensor:
            return (p[:, col] > 0.5).view(-1, 1, 1, 1)

        def column(col: int) -> torch.Tensor:
            return p[:, col].view(-1, 1, 1, 1)

        x = roi_align(images.float().div_(255.0), rois, output_size=cfg.size,
                      spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if any_transposed:  # known on the host: no sync, no work for landscape batches
            x = torch.where(flag(10), x.transpose(-1, -2), x)
        x = torch.where(flag(0), x.flip(-1), x)

        bright, contrast, sat = column(2), column(3), column(4)
        y = (x * bright).clamp_(0, 1)
        mean = _gray(y).mean((2, 3), keepdim=True)
        y = (contrast * y + (1 - contrast) * mean).clamp_(0, 1)
        y = (sat * y + (1 - sat) * _gray(y)).clamp_(0, 1)
        if cfg.hue > 0:
            y = _shift_hue(y, p[:, 5])
        x = torch.where(flag(1), y, x)

        x = torch.where(flag(6), _gray(x).expand(-1, 3, -1, -1), x)

        if len(blur_idx):
            x = x.index_copy(0, blur_idx, _blur(x[blur_idx], p[blur_idx, 8], max_sigma))

        x = torch.where(flag(9) & (x >= 0.5), 1.0 - x, x)
        return normalize(x, cfg.mean, cfg.std)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[0, 1] RGB to the backbone's input space (its weights' mean/std, timm pretrained_cfg)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _eval_squares(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the centre square of the shorter side of its region: x, y, side (canvas
    pixels, whole numbers) -- the old cache's centre crop (`resize_center_crop`)."""
    x0, y0, w, h = regions[:, :4].round().unbind(1)
    side = torch.minimum(w, h)
    return (x0 + torch.div(w - side, 2, rounding_mode="floor"),
            y0 + torch.div(h - side, 2, rounding_mode="floor"), side)


def eval_transform(images: torch.Tensor, size: int, *, mean: tuple[float, ...],
                   std: tuple[float, ...], crop_fraction: float = 0.875,
                   regions=None) -> torch.Tensor:
    """Resize to size / crop_fraction and centre-crop `size`, batched: the usual eval view,
    normalised with the backbone's own `mean` / `std` (as every training view is).

    With `regions` (host (B, 5), `CachedSplit.regions[idx]`) the view is taken from the
    centre square of the shorter side of each image's region, transposed back where the
    image is stored transposed: for every image the cache holds at its full shorter side
    this is pixel for pixel the view of the old centre-square cache. Without, the whole
    canvas is the image (right for square canvases and plain tensors; a wider canvas gives
    its centre square)."""
    resized = max(size, round(size / crop_fraction))
    top = (resized - size) // 2
    if regions is None and images.shape[-1] == images.shape[-2]:
        x = images.float().div_(255.0)
        if x.shape[-1] != resized or x.shape[-2] != resized:
            x = F.interpolate(x, size=(resized, resized), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)
        x = x[..., top:top + size, top:top + size]
        return normalize(x, mean, std)

    n, dev = images.shape[0], images.device
    r = as_regions(regions, n, tuple(images.shape[-2:]))
    left, upper, side = (t.long().tolist() for t in _eval_squares(r))
    flip = (r[:, 4] > 0.5).tolist()
    groups = sorted(set(side))
    for s in groups:  # one group in practice: the decoded size
        members = [i for i in range(n) if side[i] == s]
        # A transposed image's square is transposed back here, on its uint8 pixels.
        if len({(left[i], upper[i], flip[i]) for i in members}) == 1:  # one batch slice
            i = members[0]
            sel = images if len(members) == n else images[torch.tensor(members, device=dev)]
            x = sel[..., upper[i]:upper[i] + s, left[i]:left[i] + s]
            x = x.transpose(-1, -2) if flip[i] else x
        else:  # views stacked in one copy of the squares' uint8 pixels
            crops = (images[i, :, upper[i]:upper[i] + s, left[i]:left[i] + s] for i in members)
            x = torch.stack([c.transpose(-1, -2) if flip[i] else c
                             for i, c in zip(members, crops)])
        x = x.float().div_(255.0)
        if s != resized:
            x = F.interpolate(x, size=(resized, resized), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)
        x = x[..., top:top + size, top:top + size]
        if len(groups) == 1:
            out = x
        else:
            if s == groups[0]:
                out = torch.empty((n, 3, size, size), device=dev, dtype=torch.float32)
            out[torch.tensor(members, device=dev)] = x
    return normalize(out, mean, std)


def eval_view_points(xy, regions, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Map (N, ..., 2) canvas pixel coordinates (`CachedSplit.boxes` / `parts` space) of N
    cached images into their eval views (`eval_transform` with these `regions`, (N, 5),
    `CachedSplit.regions[idx]`): continuous coordinates, pixel i covering [i, i + 1); a
    transposed image's points come back in its own orientation. Points outside the view
    map outside [0, size)."""
    xy = torch.as_tensor(xy).detach().cpu().double()
    r = as_regions(regions, xy.shape[0], (0, 0))
    resized = max(size, round(size / crop_fraction))
    top = (resized - size) // 2
    sx, sy, side = _eval_squares(r)
    shape = (-1,) + (1,) * (xy.dim() - 2)
    scale = (resized / side).view(shape)
    px = (xy[..., 0] - sx.view(shape)) * scale - top
    py = (xy[..., 1] - sy.view(shape)) * scale - top
    t = (r[:, 4] > 0.5).view(shape)
    return torch.stack([torch.where(t, py, px), torch.where(t, px, py)], -1).float()


def eval_view_boxes(boxes, regions, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Map (N, 4) boxes x, y, w, h in canvas pixels into the eval views (see
    `eval_view_points`); a transposed image's box comes back in its own orientation."""
    b = torch.as_tensor(boxes).detach().cpu().double()
    corners = torch.stack([b[:, :2], b[:, :2] + b[:, 2:]], 1)  # (N, 2, 2)
    p = eval_view_points(corners, regions, size, crop_fraction).double()
    lo, hi = torch.minimum(p[:, 0], p[:, 1]), torch.maximum(p[:, 0], p[:, 1])
    return torch.cat([lo, hi - lo], 1).float()
