"""The decoded cache, the batch loader and the on-device two-view augmentation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import make_image

from fgray.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    TwoViewAugment,
    _blur,
    _shift_hue,
    augment_preset,
    eval_transform,
)
from fgray.data.cache import build_cache
from fgray.data.formats import load_dataset
from fgray.data.images import load_rgb, resize_center_crop
from fgray.data.loader import CachedBatches
from fgray.data.pil_reference import PILTwoViews
from fgray.errors import UserError


def test_cache_content_boxes_reuse_and_invalidation(cub_root, tmp_path):
    ds = load_dataset("cub", cub_root, val_fraction=0.0)
    cache = build_cache(ds, "train", 24, cache_dir=tmp_path / "c", progress=False)
    # 40x30 images: the whole image at shorter side 24 is 32x24, the canvas exactly that
    assert cache.images.shape == (6, 3, 24, 32) and cache.images.dtype == np.uint8
    assert cache.size == 24 and cache.canvas == (24, 32)
    np.testing.assert_array_equal(cache.regions, np.tile([0, 0, 32, 24, 0], (6, 1)))
    assert list(cache.labels) == [0, 0, 1, 1, 2, 2]
    first = ds.split("train")[0]
    expected, scale, left, top = resize_center_crop(load_rgb(first.path), 24)
    assert (left, top) == (4, 0)  # the old cache: the centre square of the same resize
    np.testing.assert_array_equal(cache.images[0][:, :, 4:28],
                                  np.asarray(expected).transpose(2, 0, 1))
    # box (5, 4, 20, 15) in a 40x30 image: scale 24/30 = 0.8, no crop any more
    np.testing.assert_allclose(cache.boxes[0], [5 * 0.8, 4 * 0.8, 16, 12], atol=1e-5)
    np.testing.assert_allclose(cache.parts[0, 0], [8, 6.4, 1], atol=1e-5)
    assert cache.parts is not None and cache.parts[0, 1, 2] == 0  # invisible part stays so

    again = build_cache(ds, "train", 24, cache_dir=tmp_path / "c", progress=False)
    assert again.path == cache.path
    assert len(list((tmp_path / "c").iterdir())) == 1  # nothing rebuilt, no temp left

    make_image(first.path, 999)  # the source changes
    os.utime(first.path, ns=(1, 1))
    changed = build_cache(load_dataset("cub", cub_root, val_fraction=0.0), "train", 24,
                          cache_dir=tmp_path / "c", progress=False)
    assert changed.path != cache.path
    assert not np.array_equal(changed.images[0], cache.images[0])
    np.testing.assert_array_equal(changed.images[1:], cache.images[1:])


def test_corrupt_image_fails_cache_build_cleanly(cub_root, tmp_path):
    ds = load_dataset("cub", cub_root, val_fraction=0.0)
    bad = ds.split("train")[2].path
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"{bad.name}: cannot decode image"):
        build_cache(ds, "train", 16, cache_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c").iterdir()) == []


def test_loader_shards_ranks_disjointly_and_reshuffles_per_epoch(cub_root, tmp_path):
    cache = build_cache(load_dataset("cub", cub_root, val_fraction=0.0), "test", 16,
                        cache_dir=tmp_path, progress=False)
    seen = []
    for rank in range(2):
        loader = CachedBatches(cache, 1, rank=rank, world_size=2, seed=3)
        seen.append([int(y) for _, y in loader])
    assert len(seen[0]) == len(seen[1]) == 3
    loader = CachedBatches(cache, 6, seed=3, drop_last=False)
    (x0, y0), = list(loader)
    loader.set_epoch(1)
    (x1, y1), = list(loader)
    assert sorted(y0.tolist()) == sorted(cache.labels.tolist())
    assert not torch.equal(x0, x1)  # a new permutation
    idx = [int(np.where((cache.images == x0[i].numpy()).all((1, 2, 3)))[0][0]) for i in range(6)]
    assert [int(cache.labels[i]) for i in idx] == y0.tolist()  # images and labels stay paired


def _images(n=6, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_two_views_shapes_range_and_difference():
    cfg = augment_preset("mocov2", 32)
    v1, v2 = TwoViewAugment(cfg, seed=0)(_images())
    assert v1.shape == v2.shape == (6, 3, 32, 32) and v1.dtype == torch.float32
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    pixels = v1 * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert not torch.allclose(v1, v2)
    assert not torch.allclose(v1[0], v1[1])


def test_augment_is_deterministic_under_a_seed():
    imgs = _images()
    a = TwoViewAugment(PRESETS["byol"], seed=5)(imgs)
    b = TwoViewAugment(PRESETS["byol"], seed=5)(imgs)
    c = TwoViewAugment(PRESETS["byol"], seed=6)(imgs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_whole_image_crop_without_colour_ops_is_identity_after_normalise():
    cfg = augment_preset("mocov2", 48, scale_min=1.0, ratio_min=1.0, ratio_max=1.0, flip_p=0.0,
                         jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0))
    imgs = _images()
    v1, _ = TwoViewAugment(cfg)(imgs)
    expected = TF.normalize(imgs.float() / 255, list(cfg.mean), list(cfg.std))
    torch.testing.assert_close(v1, expected, atol=1e-4, rtol=0)


def test_grayscale_flip_and_solarize_probabilities_one():
    base = dict(scale_min=1.0, ratio_min=1.0, ratio_max=1.0, jitter_p=0.0, blur_p=(0.0, 0.0))
    imgs = _images()
    gray, _ = TwoViewAugment(augment_preset("mocov2", 48, gray_p=1.0, flip_p=0.0, **base))(imgs)
    pix = gray * torch.tensor(PRESETS["mocov2"].std).view(1, 3, 1, 1) + torch.tensor(
        PRESETS["mocov2"].mean).view(1, 3, 1, 1)
    assert torch.allclose(pix[:, 0], pix[:, 1], atol=1e-5)
    flip, _ = TwoViewAugment(augment_preset("mocov2", 48, gray_p=0.0, flip_p=1.0, **base))(imgs)
    plain, _ = TwoViewAugment(augment_preset("mocov2", 48, gray_p=0.0, flip_p=0.0, **base))(imgs)
    torch.testing.assert_close(flip, plain.flip(-1))
    sol_cfg = augment_preset("mocov2", 48, gray_p=0.0, flip_p=0.0, solarize_p=(1.0, 0.0), **base)
    sol, _ = TwoViewAugment(sol_cfg)(imgs)
    raw = imgs.float() / 255
    expected = TF.normalize(torch.where(raw >= 0.5, 1 - raw, raw), list(sol_cfg.mean),
                            list(sol_cfg.std))
    torch.testing.assert_close(sol, expected, atol=1e-4, rtol=0)


def test_hue_and_blur_match_torchvision():
    x = _images(3, 16).float() / 255
    for shift in (-0.1, 0.05, 0.3):
        ours = _shift_hue(x, torch.full((3,), shift))
        torch.testing.assert_close(ours, TF.adjust_hue(x, shift), atol=2e-3, rtol=0)
    sigma = 1.3
    ours = _blur(x, torch.full((3,), sigma))
    radius = int(np.ceil(3 * sigma))
    ref = TF.gaussian_blur(x, [2 * radius + 1] * 2, [sigma, sigma])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_eval_transform_and_bad_config():
    out = eval_transform(_images(2, 40), 32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert out.shape == (2, 3, 32, 32)
    with pytest.raises(UserError, match="scale_min"):
        augment_preset("mocov2", 32, scale_min=0.0)
    with pytest.raises(UserError, match="unknown augmentation preset 'simclr'"):
        augment_preset("simclr", 32)
    with pytest.raises(UserError, match="unknown augmentation 'blurr'"):
        augment_preset("mocov2", 32, blurr=1)


def test_pil_reference_pipeline_matches_shapes(cub_root):
    ds = load_dataset("cub", cub_root)
    v1, v2, label = PILTwoViews(ds.split("train"), augment_preset("mocov2", 32))[0]
    assert v1.shape == v2.shape == (3, 32, 32) and isinstance(label, int)
