"""Whole-image caches: train crops reach the whole of wide images, boxes and parts follow the
canvas, and the eval view is the old centre-square view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import fgray.data.cache as cache_mod
from fgray.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViewAugment,
    _crop_boxes,
    as_regions,
    augment_preset,
    eval_transform,
    eval_view_boxes,
    eval_view_points,
)
from fgray.data.cache import build_cache, canvas_width, open_cache
from fgray.data.formats import load_dataset
from fgray.data.images import load_rgb, resize_center_crop
from fgray.data.pil_reference import pil_eval_transform

RED = (230, 20, 20)
PLAIN = dict(jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0), flip_p=0.0)


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    """Gray noise: never red, so any red pixel in a view comes from the planted object."""
    g = np.random.default_rng(seed).integers(60, 200, (h, w, 1), dtype=np.uint8)
    return np.repeat(g, 3, axis=2)


def _write_folder(root: Path, sizes: list[tuple[int, int]], *, left_object: bool) -> Path:
    """A folder layout (train and test, two classes) of images of the given (w, h); with
    `left_object` each has a red object in its leftmost eighth only."""
    for split in ("train", "test"):
        for i, (w, h) in enumerate(sizes):
            arr = _noise(w, h, i + (split == "test") * 1000)
            if left_object:
                arr[h // 4: 3 * h // 4, : w // 8] = RED
            path = root / split / ("ab"[i % 2]) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return root


def _write_cub(root: Path, specs: list[tuple[tuple[int, int], tuple[int, int, int, int]]]
               ) -> Path:
    """A CUB layout whose images ((w, h), box (x, y, bw, bh)) are gray noise with the box
    filled red, and one part at the box centre; every image in train."""
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes",
                                                   "locs")}
    for i, ((w, h), (bx, by, bw, bh)) in enumerate(specs, start=1):
        arr = _noise(w, h, i)
        arr[by:by + bh, bx:bx + bw] = RED
        rel = f"001.A/img_{i}.png"
        (root / "images" / "001.A").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "images" / rel)
        lines["images"].append(f"{i} {rel}")
        lines["labels"].append(f"{i} 1")
        lines["split"].append(f"{i} 1")
        lines["boxes"].append(f"{i} {bx} {by} {bw} {bh}")
        lines["locs"].append(f"{i} 1 {bx + bw / 2} {by + bh / 2} 1")
    (root / "classes.txt").write_text("1 001.A\n")
    for name, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                      ("train_test_split.txt", "split"), ("bounding_boxes.txt", "boxes")):
        (root / name).write_text("\n".join(lines[key]) + "\n")
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 centre\n")
    (root / "parts" / "part_locs.txt").write_text("\n".join(lines["locs"]) + "\n")
    return root


def _is_red(views: torch.Tensor) -> torch.Tensor:
    """(B, 3, P, P) normalised views -> (B, P, P) mask of red pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = views * std + mean
    return (x[:, 0] > 0.6) & (x[:, 1] < 0.35) & (x[:, 2] < 0.35)


def _old_eval(square_u8: torch.Tensor, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """The eval view as computed on the old centre-square cache (before regions)."""
    x = square_u8.float() / 255
    resized = max(size, round(size / crop_fraction))
    if x.shape[-1] != resized:
        x = F.interpolate(x, size=(resized, resized), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
    top = (resized - size) // 2
    x = x[..., top:top + size, top:top + size]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _old_square(path: Path, size: int) -> torch.Tensor:
    out, *_ = resize_center_crop(load_rgb(path), size)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)[None]


# --------------------------------------------------------------------------- train crops


def test_train_crops_reach_the_left_edge_of_wide_images(tmp_path):
    ds = load_dataset("folder", _write_folder(tmp_path / "wide", [(128, 64)] * 16,
                                              left_object=True), val_fraction=0.0)
    cache = build_cache(ds, "train", 32, cache_dir=tmp_path / "c", progress=False)
    assert cache.canvas == (32, 64)  # the whole 2:1 image at its full shorter side
    np.testing.assert_array_equal(cache.regions, np.tile([0, 0, 64, 32, 0], (16, 1)))
    assert _is_red(torch.from_numpy(cache.images[:, :, :, :4].astype(np.float32) / 255)
                   .sub(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                   .div(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))).any()

    aug = TwoViewAugment(augment_preset("mocov2", 16, **PLAIN), seed=0)
    images = torch.from_numpy(np.array(cache.images))
    hits = []
    for _ in range(8):
        v1, v2 = aug(images, cache.regions)
        hits.append(_is_red(torch.cat([v1, v2])).flatten(1).any(1))
    share = torch.cat(hits).float().mean().item()
    assert 0.05 < share < 0.9  # the object is in some views, as with RandomResizedCrop

    # The old cache held the centre square of each image: no red at all, so no view of it
    # can show the object whatever the crop.
    squares = torch.cat([_old_square(s.path, 32) for s in ds.split("train")])
    assert squares.shape == (16, 3, 32, 32)
    old = TwoViewAugment(augment_preset("mocov2", 16, **PLAIN), seed=0)
    v1, v2 = old(squares)
    assert not _is_red(torch.cat([v1, v2])).any()
    assert not _is_red(_old_eval(squares, 16)).any()
    # And the eval view is still that centre square's: no object either.
    view = eval_transform(images, 16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          regions=cache.regions)
    assert not _is_red(view).any()
    torch.testing.assert_close(view, _old_eval(squares, 16), atol=1e-6, rtol=0)


def test_crop_boxes_follow_torchvision_within_the_region():
    cfg = augment_preset("mocov2", 16)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    region = torch.tensor([[5.0, 3.0, 60.0, 30.0, 0.0]]).expand(n, 5)
    boxes = _crop_boxes(region, cfg, gen)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 5).all() and (boxes[:, 2] <= 65).all()
    assert (boxes[:, 1] >= 3).all() and (boxes[:, 3] <= 33).all()
    assert (boxes[:, :2] == boxes[:, :2].round()).all()
    # torchvision's own sampler on an image of the region's size: the same distribution
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(1, 30, 60), [0.2, 1.0],
                                                           [3 / 4, 4 / 3]) for _ in range(n)],
                           dtype=torch.float32)  # (top, left, h, w)
    for ours, theirs in ((w * h, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]),
                         (boxes[:, 0] - 5 + w / 2, ref[:, 1] + ref[:, 3] / 2)):
        assert abs(ours.mean() - theirs.mean()) < 0.03 * theirs.mean()
        assert abs(ours.std() - theirs.std()) < 0.08 * theirs.std()
    # No try fits (the whole area at ratio <= 4/3 is too tall): torchvision's fallback, the
    # centre crop at the nearest ratio in range.
    fixed = augment_preset("mocov2", 16, scale_min=1.0)
    box = _crop_boxes(torch.tensor([[0.0, 0.0, 48.0, 24.0, 0.0]]), fixed, gen)
    assert box.tolist() == [[8.0, 0.0, 40.0, 24.0]]


def test_transposed_images_give_the_views_of_their_own_orientation():
    gen = torch.Generator().manual_seed(1)
    portrait = torch.randint(0, 256, (3, 3, 40, 20), dtype=torch.uint8, generator=gen)
    stored = portrait.transpose(-1, -2).contiguous()  # as the cache keeps it: 20 x 40
    cfg = augment_preset("byol", 16, flip_p=0.5)
    plain = TwoViewAugment(cfg, seed=4)(portrait, np.tile([0, 0, 20, 40, 0], (3, 1)))
    back = TwoViewAugment(cfg, seed=4)(stored, np.tile([0, 0, 40, 20, 1], (3, 1)))
    for a, b in zip(plain, back):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    eval_kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    torch.testing.assert_close(
        eval_transform(portrait, 14, regions=np.tile([0, 0, 20, 40, 0], (3, 1)), **eval_kw),
        eval_transform(stored, 14, regions=np.tile([0, 0, 40, 20, 1], (3, 1)), **eval_kw),
        atol=1e-5, rtol=0)


def test_square_images_behave_exactly_as_before(tmp_path):
    ds = load_dataset("folder", _write_folder(tmp_path / "sq", [(40, 40)] * 6,
                                              left_object=False), val_fraction=0.0)
    cache = build_cache(ds, "train", 24, cache_dir=tmp_path / "c", progress=False)
    assert cache.images.shape == (6, 3, 24, 24)  # the old layout: no extra memory
    np.testing.assert_array_equal(cache.regions, np.tile([0, 0, 24, 24, 0], (6, 1)))
    squares = torch.cat([_old_square(s.path, 24) for s in ds.split("train")])
    images = torch.from_numpy(np.array(cache.images))
    assert torch.equal(images, squares)
    cfg = augment_preset("byol", 20)
    new = TwoViewAugment(cfg, seed=7)(images, cache.regions)
    old = TwoViewAugment(cfg, seed=7)(squares)  # no regions: the whole canvas, as before
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    for size in (21, 16):  # no resize, and a resize
        view = eval_transform(images, size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              regions=cache.regions)
        torch.testing.assert_close(view, _old_eval(squares, size), atol=1e-6, rtol=0)


def test_eval_view_of_wide_and_portrait_images_is_the_old_centre_square(tmp_path):
    sizes = [(40, 30), (60, 30), (30, 45), (40, 30)]
    ds = load_dataset("folder", _write_folder(tmp_path / "mix", sizes, left_object=False),
                      val_fraction=0.0)
    cache = build_cache(ds, "train", 24, cache_dir=tmp_path / "c", progress=False,
                        coverage=1.0)
    assert cache.canvas == (24, 48)
    portrait = [load_rgb(s.path).height > load_rgb(s.path).width for s in ds.split("train")]
    assert sum(portrait) == 1 and (cache.regions[:, 4] > 0).tolist() == portrait
    assert (np.minimum(cache.regions[:, 2], cache.regions[:, 3]) == 24).all()
    squares = torch.cat([_old_square(s.path, 24) for s in ds.split("train")])
    view = eval_transform(torch.from_numpy(np.array(cache.images)), 21, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, regions=cache.regions)
    torch.testing.assert_close(view, _old_eval(squares, 21), atol=1e-6, rtol=0)

    # The PIL reference's eval view is the same view, up to its own resampling.
    smooth = tmp_path / "smooth.png"
    yy, xx = np.mgrid[0:60, 0:80]
    Image.fromarray(np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)).save(smooth)
    ref = pil_eval_transform(28, mean=IMAGENET_MEAN, std=IMAGENET_STD)(load_rgb(smooth))
    square = _old_square(smooth, 32)
    ours = eval_transform(square, 28, mean=IMAGENET_MEAN, std=IMAGENET_STD)[0]
    assert (ours - ref).abs().mean() < 0.1


def test_canvas_width_caps_outliers_and_memory_stays_bounded(tmp_path):
    sizes = [(40, 30)] * 19 + [(120, 30)]  # a 4:1 panorama among 4:3 images
    assert canvas_width(sizes, 24) == 32  # the quantile ignores the outlier: 1.33x memory
    assert canvas_width(sizes, 24, coverage=1.0) == 48  # covering it hits the 2x cap
    assert canvas_width([(40, 40)], 24) == 24
    ds = load_dataset("folder", _write_folder(tmp_path / "f", sizes, left_object=False),
                      val_fraction=0.0)
    cache = build_cache(ds, "train", 24, cache_dir=tmp_path / "c", progress=False)
    old_bytes = len(cache) * 3 * 24 * 24
    assert cache.images.nbytes / old_bytes == pytest.approx(32 / 24)
    # The panorama fits whole, at a shorter side under 24, centred, edges repeated.
    (i,) = np.nonzero(cache.regions[:, 3] < 24)[0]
    np.testing.assert_array_equal(cache.regions[i], [0, 8, 32, 8, 0])
    img = cache.images[i]
    np.testing.assert_array_equal(img[:, :8], np.repeat(img[:, 8:9], 8, axis=1))
    np.testing.assert_array_equal(img[:, 16:], np.repeat(img[:, 15:16], 8, axis=1))
    # Its eval view is its (smaller) centre square, upsampled; train crops stay in it.
    view = eval_transform(torch.from_numpy(img[None].copy()), 16, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, regions=cache.regions[i:i + 1])
    assert view.shape == (1, 3, 16, 16)
    # In a batch with the others (two square sides: two groups), each view is its own.
    whole = eval_transform(torch.from_numpy(np.array(cache.images)), 16, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD, regions=cache.regions)
    torch.testing.assert_close(whole[i], view[0])
    others = [j for j in range(len(cache)) if j != i]
    squares = torch.cat([_old_square(ds.split("train")[j].path, 24) for j in others])
    torch.testing.assert_close(whole[others], _old_eval(squares, 16), atol=1e-6, rtol=0)
    boxes = _crop_boxes(as_regions(np.repeat(cache.regions[i:i + 1], 500, 0), 500, (24, 32)),
                        augment_preset("mocov2", 16), torch.Generator().manual_seed(0))
    assert (boxes[:, 1] >= 8).all() and (boxes[:, 3] <= 16).all()


# --------------------------------------------------------------------- boxes and parts


def test_boxes_and_parts_map_into_canvas_and_eval_view(tmp_path):
    specs = [((80, 40), (4, 10, 12, 16)),  # wide, box at the left edge
             ((40, 60), (10, 40, 16, 12)),  # portrait: stored transposed
             ((40, 30), (14, 9, 12, 12))]
    ds = load_dataset("cub", _write_cub(tmp_path / "cub", specs), val_fraction=0.0)
    cache = build_cache(ds, "train", 24, cache_dir=tmp_path / "c", progress=False,
                        coverage=1.0)
    assert cache.canvas == (24, 48)
    assert cache.regions[:, 4].tolist() == [0, 1, 0]
    red = np.zeros((len(cache), 24, 48), bool)
    for i in range(len(cache)):
        px = cache.images[i].astype(int)
        red[i] = (px[0] > 150) & (px[1] < 90) & (px[2] < 90)
    for i in range(len(cache)):
        x, y, w, h = cache.boxes[i]
        inner = red[i, int(np.ceil(y)) + 1:int(y + h) - 1, int(np.ceil(x)) + 1:int(x + w) - 1]
        assert inner.all()  # the box covers the object in canvas pixels
        outside = red[i].copy()
        outside[max(0, int(y) - 1):int(np.ceil(y + h)) + 1,
                max(0, int(x) - 1):int(np.ceil(x + w)) + 1] = False
        assert not outside.any()  # and nothing red lies outside it
        part = cache.parts[i, 0]
        assert part[2] == 1 and red[i, int(part[1]), int(part[0])]
    # Exact maps, scale 24/40 = 0.6 for both: the wide image fills the canvas; the portrait,
    # 24 x 36 at that scale, is transposed to 36 x 24 and centred (x0 = 6).
    np.testing.assert_allclose(cache.boxes[0], [2.4, 6, 7.2, 9.6], atol=1e-5)
    np.testing.assert_allclose(cache.regions[1], [6, 0, 36, 24, 1])
    np.testing.assert_allclose(cache.boxes[1], [6 + 40 * 0.6, 10 * 0.6, 7.2, 9.6], atol=1e-5)
    np.testing.assert_allclose(cache.regions[2], [8, 0, 32, 24, 0])

    # Into the eval view (centre square, resize, crop): the box lands on the red pixels.
    size = 21
    images = torch.from_numpy(np.array(cache.images))
    view = eval_transform(images, size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          regions=cache.regions)
    red_view = _is_red(view)
    boxes = eval_view_boxes(cache.boxes, cache.regions, size)
    for i in (1, 2):  # the wide image's box is outside its centre square: not in the view
        x, y, w, h = boxes[i].tolist()
        ys, xs = torch.nonzero(red_view[i], as_tuple=True)
        assert len(ys) > 0
        assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1
        assert ys.max() <= y + h
    # The portrait's box comes back in its own orientation: 16 wide, 12 high at scale
    # 0.6 in the cache, times 24 / 24 into the view.
    w1, h1 = boxes[1, 2:].tolist()
    assert w1 == pytest.approx(16 * 0.6, abs=1e-4) and h1 == pytest.approx(12 * 0.6, abs=1e-4)
    assert boxes[0, 0] + boxes[0, 2] <= 0  # the wide image's box lies left of the view
    parts = eval_view_points(cache.parts[:, :, :2], cache.regions, size)
    torch.testing.assert_close(parts[:, 0], boxes[:, :2] + boxes[:, 2:] / 2, atol=1e-4,
                               rtol=0)


# -------------------------------------------------------------------- versioned caches


def test_cache_version_bump_rebuilds_and_old_caches_still_open(tmp_path, monkeypatch):
    ds = load_dataset("folder", _write_folder(tmp_path / "f", [(40, 30)] * 4,
                                              left_object=False), val_fraction=0.0)
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", 1)
    old = build_cache(ds, "train", 16, cache_dir=tmp_path / "c", progress=False)
    monkeypatch.undo()
    assert cache_mod.CACHE_VERSION >= 2
    new = build_cache(ds, "train", 16, cache_dir=tmp_path / "c", progress=False)
    assert new.path != old.path
    assert len([p for p in (tmp_path / "c").iterdir()]) == 2
    assert build_cache(ds, "train", 16, cache_dir=tmp_path / "c", progress=False).path \
        == new.path
    # A version-1 cache folder (no regions.npy) opens with the whole canvas as the region.
    (old.path / "regions.npy").unlink()
    reopened = open_cache(old.path)
    np.testing.assert_array_equal(reopened.regions,
                                  np.tile([0, 0, *reopened.canvas[::-1], 0], (4, 1)))


def test_eval_without_regions_takes_the_centre_square_of_a_wide_canvas():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randint(0, 256, (2, 3, 24, 40), dtype=torch.uint8, generator=gen)
    kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    torch.testing.assert_close(eval_transform(wide, 16, **kw),
                               eval_transform(wide[..., 8:32].contiguous(), 16, **kw))
