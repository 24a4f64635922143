"""Localisation scores on planted maps and against brute-force pixel/cell loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fgray.errors import UserError
from fgray.eval import box_scores, part_hit_rate

H, W = 48, 64  # image height, width
h, w = 6, 8  # map grid: cells of 8x8 pixels


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _brute_box_mass(maps: torch.Tensor, boxes: torch.Tensor, upsample: str) -> float:
    shares = []
    for m, (x, y, bw, bh) in zip(maps.clamp(min=0), boxes.tolist()):
        if float(m.sum()) <= 0:
            m = torch.ones_like(m)
        if upsample == "bilinear":
            up = F.interpolate(m[None, None], size=(H, W), mode="bilinear",
                               align_corners=False)[0, 0]
            inside = sum(float(up[i, j]) * _overlap(j, j + 1, x, x + bw)
                         * _overlap(i, i + 1, y, y + bh) for i in range(H) for j in range(W))
            shares.append(inside / float(up.sum()))
        else:
            ch, cw = H / h, W / w
            inside = sum(float(m[r, c]) * _overlap(c * cw, (c + 1) * cw, x, x + bw)
                         * _overlap(r * ch, (r + 1) * ch, y, y + bh) / (ch * cw)
                         for r in range(h) for c in range(w))
            shares.append(inside / float(m.sum()))
    return sum(shares) / len(shares)


def _centre(r: int, c: int) -> tuple[float, float]:
    return (c + 0.5) * W / w, (r + 0.5) * H / h


def _brute_pointing(maps: torch.Tensor, boxes: torch.Tensor, tolerance: float) -> float:
    scores = []
    for m, (x, y, bw, bh) in zip(maps, boxes.tolist()):
        best = float(m.max())
        tied = [(r, c) for r in range(h) for c in range(w) if float(m[r, c]) == best]
        hits = 0
        for r, c in tied:
            px, py = _centre(r, c)
            dx = max(x - px, 0.0, px - (x + bw))
            dy = max(y - py, 0.0, py - (y + bh))
            hits += math.hypot(dx, dy) <= tolerance
        scores.append(hits / len(tied))
    return sum(scores) / len(scores)


def _random_maps(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, h, w, generator=gen)
    maps[0] = -maps[0].abs()  # no positive mass: counts as uniform
    maps[1] = (maps[1] > 0.5).float()  # a plateau of tied maxima
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([W - 8.0, H - 8.0]) - 4
    size = torch.rand(n, 2, generator=gen) * 36 + 6.3
    boxes = torch.cat([xy, size], dim=1)
    boxes[2] = torch.tensor([50.5, 40.25, 30.0, 20.0])  # partly outside the image
    return maps, boxes


# ---------------------------------------------------------------- planted maps


def test_map_on_the_box_scores_one() -> None:
    maps = torch.zeros(2, h, w)
    maps[0, 1:4, 2:5] = 1.0  # cells covering pixels x 16..40, y 8..32
    maps[1, 0, 7] = 3.0  # cell covering x 56..64, y 0..8
    boxes = torch.tensor([[16.0, 8.0, 24.0, 24.0], [56.0, 0.0, 8.0, 8.0]])
    result = box_scores(maps, boxes, (H, W))
    assert result == {"box_mass": pytest.approx(1.0), "pointing_game": pytest.approx(1.0)}
    # Bilinear upsampling spreads mass half a cell past the box, but keeps the peak inside.
    bilinear = box_scores(maps, boxes, (H, W), upsample="bilinear")
    assert 0.5 < bilinear["box_mass"] < 1.0
    assert bilinear["pointing_game"] == 1.0


def test_full_resolution_map_on_the_box_scores_one_when_bilinear() -> None:
    maps = torch.zeros(1, H, W)
    maps[0, 10:30, 5:45] = 2.0
    result = box_scores(maps, torch.tensor([[5.0, 10.0, 40.0, 20.0]]), (H, W),
                        upsample="bilinear")
    assert result == {"box_mass": pytest.approx(1.0), "pointing_game": pytest.approx(1.0)}


@pytest.mark.parametrize("upsample", ["area", "bilinear"])
def test_uniform_map_scores_the_box_area_fraction(upsample: str) -> None:
    boxes = torch.tensor([[16.0, 8.0, 24.0, 24.0], [3.5, 2.25, 10.0, 7.5],
                          [60.0, 40.0, 10.0, 10.0]])  # the last one half outside
    fractions = [24 * 24 / (H * W), 10 * 7.5 / (H * W), 4 * 8 / (H * W)]
    result = box_scores(torch.full((3, h, w), 0.7), boxes, (H, W), upsample=upsample)
    assert result["box_mass"] == pytest.approx(sum(fractions) / 3)
    # All cells tie: pointing credits the share of cell centres inside each box.
    expected = _brute_pointing(torch.full((3, h, w), 0.7), boxes, 0.0)
    assert result["pointing_game"] == pytest.approx(expected)
    # Centres inside: 3x3 for the first box, 2x1 for the second, 1 (on the edge) for the last.
    assert result["pointing_game"] == pytest.approx((9 + 2 + 1) / 48 / 3)


def test_map_peaked_outside_the_box_points_wrong() -> None:
    maps = torch.zeros(1, h, w)
    maps[0, 5, 0] = 1.0  # bottom-left cell, centre (4, 44)
    box = torch.tensor([[32.0, 0.0, 32.0, 24.0]])  # top-right quarter
    result = box_scores(maps, box, (H, W))
    assert result == {"box_mass": 0.0, "pointing_game": 0.0}
    # The centre lies 28 px left of the box and 20 px below it: about 34.4 px away.
    assert box_scores(maps, box, (H, W), tolerance=34.0)["pointing_game"] == 0.0
    assert box_scores(maps, box, (H, W), tolerance=34.5)["pointing_game"] == 1.0


# ---------------------------------------------------------------- against brute force


@pytest.mark.parametrize("upsample", ["area", "bilinear"])
def test_box_mass_matches_brute_force(upsample: str) -> None:
    maps, boxes = _random_maps(6, seed=0)
    result = box_scores(maps, boxes, (H, W), upsample=upsample)
    assert result["box_mass"] == pytest.approx(_brute_box_mass(maps, boxes, upsample), abs=1e-5)


@pytest.mark.parametrize("tolerance", [0.0, 15.0])
def test_pointing_game_matches_brute_force(tolerance: float) -> None:
    maps, boxes = _random_maps(8, seed=1)
    result = box_scores(maps, boxes, (H, W), tolerance=tolerance)
    assert result["pointing_game"] == pytest.approx(_brute_pointing(maps, boxes, tolerance))


def _brute_parts(maps: torch.Tensor, parts: torch.Tensor, radius: float | None,
                 top_fraction: float) -> tuple[float, list[float]]:
    keep = math.ceil(top_fraction * h * w)
    per_part: list[list[float]] = [[] for _ in range(parts.shape[1])]
    for m, image_parts in zip(maps, parts.tolist()):
        cells = [float(m[r, c]) for r in range(h) for c in range(w)]
        best = max(cells)
        tied = [(r, c) for r in range(h) for c in range(w) if float(m[r, c]) == best]
        for p, (x, y, vis) in enumerate(image_parts):
            if vis <= 0:
                continue
            if radius is not None:
                hits = sum(math.hypot(_centre(r, c)[0] - x, _centre(r, c)[1] - y) <= radius
                           for r, c in tied)
                per_part[p].append(hits / len(tied))
            else:
                r = min(int(y // (H / h)), h - 1)
                c = min(int(x // (W / w)), w - 1)
                v = float(m[r, c])
                above = sum(cell > v for cell in cells)
                equal = sum(cell == v for cell in cells)
                per_part[p].append(min(1.0, max(0.0, (keep - above) / equal)))
    flat = [s for scores in per_part for s in scores]
    return sum(flat) / len(flat), [sum(s) / len(s) if s else math.nan for s in per_part]


@pytest.mark.parametrize(("radius", "top_fraction"), [(None, 0.2), (None, 0.5), (12.0, 0.2)])
def test_part_hit_rate_matches_brute_force(radius: float | None, top_fraction: float) -> None:
    maps, _ = _random_maps(7, seed=2)
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(7, 5, 2, generator=gen) * torch.tensor([W, H])
    xy[0, 0] = torch.tensor([float(W), float(H)])  # on the far image corner
    visible = (torch.rand(7, 5, 1, generator=gen) > 0.3).float()
    visible[:, 4] = 0  # a part never visible
    parts = torch.cat([xy, visible], dim=2)
    result = part_hit_rate(maps, parts, (H, W), radius=radius, top_fraction=top_fraction)
    rate, per_part = _brute_parts(maps, parts, radius, top_fraction)
    assert result["hit_rate"] == pytest.approx(rate)
    assert result["per_part"] == pytest.approx(per_part, nan_ok=True)
    assert math.isnan(result["per_part"][4])
    assert result["visible_parts"] == int(visible.sum())


def test_part_hits_on_planted_and_uniform_maps() -> None:
    maps = torch.zeros(2, h, w)
    maps[0, 2, 3] = 1.0  # cell x 24..32, y 16..24, centre (28, 20)
    maps[1] = 1.0
    parts = torch.tensor([[[27.0, 18.0, 1.0], [60.0, 44.0, 1.0], [28.0, 20.0, 0.0]],
                          [[27.0, 18.0, 1.0], [60.0, 44.0, 1.0], [28.0, 20.0, 0.0]]])
    near = part_hit_rate(maps[:1], parts[:1], (H, W), radius=3.0)
    assert near["hit_rate"] == 0.5 and near["visible_parts"] == 2
    top = part_hit_rate(maps, parts, (H, W), top_fraction=0.25)
    # Map 0: the part in the peak cell hits, the other sits in a zero cell tied with
    # 47 others for the remaining 11 places; map 1 (uniform): 12 of 48 places each.
    assert top["per_part"][0] == pytest.approx((1 + 12 / 48) / 2)
    assert top["per_part"][1] == pytest.approx((11 / 47 + 12 / 48) / 2)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("call", "message"), [
    (lambda: box_scores(torch.rand(2, h, w), torch.rand(3, 4), (H, W)),
     r"boxes: expected shape \(N, 4\)"),
    (lambda: box_scores(torch.rand(h, w), torch.rand(1, 4), (H, W)),
     r"maps: expected a tensor of shape \(N, h, w\)"),
    (lambda: box_scores(torch.rand(1, h, w), torch.tensor([[0.0, 0.0, 0.0, 5.0]]), (H, W)),
     "width > 0 and height > 0"),
    (lambda: box_scores(torch.rand(1, h, w), torch.rand(1, 4) + 1, (H, 0)),
     "expected \\(height, width\\) positive integers"),
    (lambda: box_scores(torch.rand(1, h, w), torch.rand(1, 4) + 1, (H, W), upsample="nearest"),
     "upsample='nearest'"),
    (lambda: box_scores(torch.rand(1, h, w), torch.rand(1, 4) + 1, (H, W), tolerance=-1),
     "tolerance=-1"),
    (lambda: part_hit_rate(torch.rand(2, h, w), torch.rand(2, 5, 2), (H, W)),
     r"parts: expected shape \(N, P, 3\)"),
    (lambda: part_hit_rate(torch.rand(1, h, w), torch.rand(1, 5, 3), (H, W), radius=-2.0),
     "radius=-2.0"),
    (lambda: part_hit_rate(torch.rand(1, h, w), torch.rand(1, 5, 3), (H, W), top_fraction=0),
     "top_fraction=0"),
])
def test_bad_inputs_raise_user_errors(call, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call()
