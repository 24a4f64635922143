"""Image decoding that always yields RGB: real CUB has grayscale JPEGs, and CMYK, palette,
16-bit and transparent images exist in the wild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (so truncation surfaces here) and return it in RGB mode."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            hi = max(float(arr.max()), 1.0)
            img = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> tuple[Image.Image, float, float, float]:
    """Resize the shorter side to `size` and centre-crop a size x size square.

    Returns the image and the affine map from source pixels to output pixels:
    out = src * scale - (left, top).
    """
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size)), scale, float(left), float(top)


def fitted_long_side(width: int, height: int, size: int) -> int:
    """The longer side, in pixels, of a `width` x `height` image whose shorter side is resized
    to `size` (exactly as `resize_center_crop` and `resize_within` round it)."""
    return max(size, round(max(width, height) * (size / min(width, height))))


def resize_within(img: Image.Image, size: int, max_long: int) -> tuple[Image.Image, float, float]:
    """Resize keeping the aspect ratio: the shorter side to `size` -- the very resize of
    `resize_center_crop`, so its centre square is that function's output pixel for pixel --
    unless the longer side would then exceed `max_long`; such an image is resized so that
    its longer side is `max_long` instead (the whole image still fits, at less resolution).

    Returns the image and the per-axis map from source to output pixels:
    out = src * (scale_x, scale_y).
    """
    w, h = img.size
    if fitted_long_side(w, h, size) <= max_long:
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    else:
        scale = max_long / max(w, h)
        new_w = max_long if w >= h else max(1, min(max_long, round(w * scale)))
        new_h = max_long if h > w else max(1, min(max_long, round(h * scale)))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img, new_w / w, new_h / h
