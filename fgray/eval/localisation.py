"""How well spatial maps (attention, Grad-CAM, rationale maps) point at the annotated object.

[ours] Scores a batch of (N, h, w) maps, each referring to an image of `image_size` =
(height, width) pixels, against CUB annotations: bounding boxes (x, y, width, height) and part
locations (x, y, visible), all in that image's pixels (x to the right, y down, the image
spanning [0, width] x [0, height]). Map cell (r, c) covers the pixels
[c*W/w, (c+1)*W/w] x [r*H/h, (r+1)*H/h]; its centre stands for it as a point.

A baseline needs no code of its own: pass a constant map (e.g. `torch.ones(N, h, w)`). A
uniform map scores the box's share of the image for box mass and, for the argmax-based
scores, the expected value of picking one of its (all tied) cells at random.

Ties in argmax-based scores (e.g. a constant map, or a flat plateau) get fractional credit:
the share of the tied cells that would score, i.e. the expectation under a random choice
among them, instead of an arbitrary first index.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fgray.errors import UserError


def _check_maps(maps: Tensor) -> None:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise UserError(f"maps: expected a tensor of shape (N, h, w), got {shape}")
    if maps.shape[0] < 1 or maps.shape[1] < 1 or maps.shape[2] < 1:
        raise UserError(f"maps: expected a non-empty (N, h, w) tensor, got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise UserError(f"maps: expected a floating-point tensor, got {maps.dtype}")
    if not bool(torch.isfinite(maps).all()):
        raise UserError("maps: contains NaN or infinite values")


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size))
    if not ok:
        raise UserError(f"image_size={image_size!r}: expected (height, width) positive integers")
    return int(image_size[0]), int(image_size[1])


def _check_annotations(name: str, ann: Tensor, n: int, ndim: int, last: int,
                       shape_text: str) -> Tensor:
    if not isinstance(ann, Tensor):
        raise UserError(f"{name}: expected a torch.Tensor, got {type(ann).__name__}")
    if ann.dim() != ndim or ann.shape[0] != n or ann.shape[-1] != last:
        raise UserError(f"{name}: expected shape {shape_text} with N={n} to match maps, "
                        f"got {tuple(ann.shape)}")
    if not bool(torch.isfinite(ann.float()).all()):
        raise UserError(f"{name}: contains NaN or infinite values")
    return ann


def _interpolation_matrix(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """(out_size, in_size) weights of 1-D linear upsampling with align_corners=False.

    Bilinear upsampling in torch is separable, so `A_y @ m @ A_x.T` equals
    `F.interpolate(m, (H, W), mode="bilinear", align_corners=False)`.
    """
    eye = torch.eye(in_size, device=device).unsqueeze(0)  # channel c holds the c-th unit vector
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T


def _coverage(start: Tensor, length: Tensor, size: int) -> Tensor:
    """(N, size) share of each pixel [j, j+1] that lies inside [start, start + length]."""
    j = torch.arange(size, device=start.device, dtype=start.dtype)
    lo = torch.maximum(j, start.unsqueeze(1))
    hi = torch.minimum(j + 1, (start + length).unsqueeze(1))
    return (hi - lo).clamp(0.0, 1.0)


def _cell_centres(h: int, w: int, image_size: tuple[int, int],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel coordinates (x, y) of every map cell's centre, flattened row-major."""
    height, width = image_size
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (height / h)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (width / w)
    return xs.repeat(h), ys.repeat_interleave(w)


def _argmax_cells(maps: Tensor) -> Tensor:
    """(N, h*w) boolean mask of the cells that attain each map's maximum."""
    flat = maps.flatten(1)
    return flat == flat.max(dim=1, keepdim=True).values


def box_scores(maps: Tensor, boxes: Tensor, image_size: tuple[int, int], *,
               upsample: Literal["area", "bilinear"] = "area",
               tolerance: float = 0.0, per_image: bool = False) -> dict[str, Any]:
    """Box mass and pointing game of `maps` (N, h, w) against `boxes` (N, 4).

    Boxes are CUB's (x, y, width, height) in pixels of the image the map refers to;
    `image_size` is that image's (height, width).

    * ``box_mass``: mean over images of the share of the map's mass inside the box. Negative
      values are clamped to zero first; a map with no positive mass counts as uniform. With
      ``upsample="area"`` each cell's mass is spread evenly over the cell's pixel rectangle,
      i.e. the box is rescaled to the map grid and each cell weighted by the share of its
      area the box covers: a map that is 1 on the cells a box covers and 0 elsewhere scores 1.
      With ``"bilinear"`` the clamped map is upsampled bilinearly (align_corners=False, as
      Grad-CAM overlays are drawn) to the image size and integrated with exact fractional
      pixel coverage, computed in closed form without materialising the upsampled map; mass
      then bleeds half a cell past a cell-aligned box. Either way a uniform map scores the
      box's share of the image (box parts outside the image do not count).
    * ``pointing_game``: share of images whose map maximum (a cell centre, raw map values)
      lies within `tolerance` pixels of the box (inside or on it when 0; Zhang et al.,
      ECCV 2016 used 15 px). Tied maxima earn the share of tied cells that hit.

    Both are fractions in [0, 1]. With `per_image`, also ``per_image``: {"box_mass",
    "pointing_game"} float64 CPU tensors (N,), each image's score (their means are the two
    scores).
    """
    _check_maps(maps)
    height, width = _check_image_size(image_size)
    n, h, w = maps.shape
    boxes = _check_annotations("boxes", boxes, n, 2, 4, "(N, 4) as (x, y, width, height)")
    if upsample not in ("area", "bilinear"):
        raise UserError(f"upsample={upsample!r}: expected one of area, bilinear")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)
            and tolerance >= 0):
        raise UserError(f"tolerance={tolerance!r}: expected a finite number >= 0 (pixels)")
    device = maps.device
    boxes = boxes.to(device=device, dtype=torch.float32)
    x, y, bw, bh = boxes.unbind(dim=1)
    if bool((bw <= 0).any() or (bh <= 0).any()):
        raise UserError("boxes: expected width > 0 and height > 0 in (x, y, width, height)")

    mass = maps.float().clamp(min=0.0)
    empty = mass.flatten(1).sum(dim=1) <= 0
    mass = torch.where(empty.view(-1, 1, 1), torch.ones_like(mass), mass)
    if upsample == "area":
        # The box in map-grid units; cells have equal areas, so they weigh alike.
        inside_y = _coverage(y * (h / height), bh * (h / height), h)  # (N, h)
        inside_x = _coverage(x * (w / width), bw * (w / width), w)  # (N, w)
        total = mass.flatten(1).sum(dim=1)
    else:
        up_y = _interpolation_matrix(height, h, device)  # (H, h)
        up_x = _interpolation_matrix(width, w, device)  # (W, w)
        inside_y = _coverage(y, bh, height) @ up_y  # (N, h): box rows seen from the map grid
        inside_x = _coverage(x, bw, width) @ up_x  # (N, w)
        total = torch.einsum("h,nhw,w->n", up_y.sum(dim=0), mass, up_x.sum(dim=0))
    inside = torch.einsum("nh,nhw,nw->n", inside_y, mass, inside_x)
    per_mass = inside / total
    box_mass = per_mass.mean()

    cx, cy = _cell_centres(h, w, (height, width), device)
    dx = torch.maximum(x.view(-1, 1) - cx, cx - (x + bw).view(-1, 1)).clamp(min=0.0)
    dy = torch.maximum(y.view(-1, 1) - cy, cy - (y + bh).view(-1, 1)).clamp(min=0.0)
    near = (dx.square() + dy.square()).sqrt() <= tolerance
    tied = _argmax_cells(maps)
    pointing = (near & tied).sum(dim=1).float() / tied.sum(dim=1).float()

    out: dict[str, Any] = {"box_mass": float(box_mass), "pointing_game": float(pointing.mean())}
    if per_image:
        out["per_image"] = {"box_mass": per_mass.double().cpu(),
                            "pointing_game": pointing.double().cpu()}
    return out


def part_hit_rate(maps: Tensor, parts: Tensor, image_size: tuple[int, int], *,
                  radius: float | None = None, top_fraction: float = 0.2,
                  per_image: bool = False) -> dict:
    """Share of visible annotated parts that `maps` (N, h, w) highlight.

    `parts` is (N, P, 3): x, y in pixels of the image of `image_size` = (height, width), and a
    visibility flag (> 0 is visible; invisible parts are ignored). A visible part is a hit:

    * when `radius` is given: if the map's maximum (a cell centre) lies within `radius`
      pixels of the part;
    * otherwise: if the map cell containing the part is among the ceil(top_fraction * h * w)
      highest cells of that map.

    Ties earn fractional credit (the expectation under a random order of the tied cells), so
    a uniform map scores about `top_fraction` in the second mode. Returns ``hit_rate`` (hits
    over all visible parts; NaN when none is visible), ``per_part`` (a list of P rates, NaN
    for a part never visible) and ``visible_parts`` (their count); with `per_image`, also
    ``per_image``: {"credit", "visible"} float64 CPU tensors (N,), each image's hits and
    visible parts (the rate is sum(credit) / sum(visible)).
    """
    _check_maps(maps)
    height, width = _check_image_size(image_size)
    n, h, w = maps.shape
    parts = _check_annotations("parts", parts, n, 3, 3, "(N, P, 3) as (x, y, visible)")
    if radius is not None and not (isinstance(radius, (int, float)) and math.isfinite(radius)
                                   and radius >= 0):
        raise UserError(f"radius={radius!r}: expected a finite number >= 0 (pixels) or None")
    if not (isinstance(top_fraction, (int, float)) and 0 < top_fraction <= 1):
        raise UserError(f"top_fraction={top_fraction!r}: expected a number in (0, 1]")
    device = maps.device
    parts = parts.to(device=device, dtype=torch.float32)
    px, py, visible = parts[..., 0], parts[..., 1], parts[..., 2] > 0
    flat = maps.float().flatten(1)  # (N, h*w)

    if radius is not None:
        cx, cy = _cell_centres(h, w, (height, width), device)
        dist = ((px.unsqueeze(2) - cx).square() + (py.unsqueeze(2) - cy).square()).sqrt()
        tied = _argmax_cells(maps).unsqueeze(1)  # (N, 1, h*w)
        credit = ((dist <= radius) & tied).sum(dim=2).float() / tied.sum(dim=2).float()
    else:
        # Rounding first keeps e.g. 0.3 * 10 = 3.0000000000000004 from becoming 4 cells.
        keep = math.ceil(round(top_fraction * h * w, 9))
        col = (px * (w / width)).floor().long().clamp(0, w - 1)
        row = (py * (h / height)).floor().long().clamp(0, h - 1)
        value = flat.gather(1, row * w + col).unsqueeze(2)  # (N, P, 1)
        above = (flat.unsqueeze(1) > value).sum(dim=2).float()
        equal = (flat.unsqueeze(1) == value).sum(dim=2).float()
        credit = ((keep - above) / equal).clamp(0.0, 1.0)

    credit = credit * visible
    # 0 / 0 leaves NaN for a part that is never visible.
    per_part = (credit.sum(dim=0) / visible.sum(dim=0)).tolist()
    count = int(visible.sum())
    rate = float(credit.sum()) / count if count else float("nan")
    out = {"hit_rate": rate, "per_part": per_part, "visible_parts": count}
    if per_image:
        out["per_image"] = {"credit": credit.sum(dim=1).double().cpu(),
                            "visible": visible.sum(dim=1).double().cpu()}
    return out
