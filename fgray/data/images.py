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
