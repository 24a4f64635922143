"""The decoded cache: each split decoded once into a fixed-size uint8 array on disk.

The array is (N, 3, S, W) uint8, memory-mapped, stored under a key that hashes the source
list (paths, labels, file sizes and modification times) and the decode settings, so a changed
source builds a new cache and an unchanged one is reused by every trial and run. Training
never decodes a JPEG again.

Each image is stored whole, not as a centre square: RandomResizedCrop in the official
pipelines (MoCo, LCR, LoDisc) samples from the whole image, and on wide sets (Stanford Cars,
FGVC-Aircraft, about 2:1) a centre square hides the front and back of every car and plane.
The layout, chosen to keep the eval view exactly as before at a bounded memory cost:

* Landscape canvas S x W: S is the decoded size (the shorter side, as before) and W the
  longer side an image gets at that scale, taken at the `coverage` quantile (95 %) of the
  split and capped at `max_aspect` x S (2). A square set gets W = S: the old layout exactly.
* Portrait images are stored transposed (x and y swapped), so their longer side also runs
  along W; one canvas shape serves both orientations. The crops and the eval view
  transpose them back (`fgray.data.augment`).
* An image is resized with its shorter side to S (the resize of the old cache) when its
  longer side then fits W -- every image but the widest (1 - coverage); those are resized
  to fit W and so get a shorter side under S. It is centred on the canvas and the rest is
  filled by repeating its edge pixels, so bilinear sampling at its border sees no seam.
* `regions` (N, 5) float32 records, per image, the valid region x0, y0, w, h in canvas
  pixels and a flag, 1 where the image is stored transposed.

Memory is W / S of the old square cache: 1.33x for a 4:3 set, 1.5x for 3:2, at most
`max_aspect` (2x). A square canvas holding the same images would cost (W / S)^2 (1.78x for
4:3, 4x for 2:1); letterboxing into the old S x S canvas would cost nothing but halve the
resolution of a 2:1 image's shorter side, which every eval view is cut from.

Boxes and part locations are in canvas pixels (the transposed frame for a transposed image,
like its pixels); `fgray.data.augment.eval_view_boxes` / `eval_view_points` map them into the
eval view that the localisation score compares with the methods' maps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fgray.data.formats import FGDataset
from fgray.data.images import fitted_long_side, load_rgb, resize_within
from fgray.errors import UserError
from fgray.progress import Progress
from fgray.storage import atomic_path

CACHE_VERSION = 2  # 2: whole images on a landscape canvas with regions (1: centre squares)
MAX_ASPECT = 2.0  # canvas width at most this many times its height
COVERAGE = 0.95  # share of a split's images stored at the full shorter side


def default_cache_dir() -> Path:
    return Path(os.environ.get("FGRAY_CACHE", Path.home() / ".cache" / "fgray")).expanduser()


@dataclass
class CachedSplit:
    images: np.ndarray  # uint8 (N, 3, S, W), memory-mapped
    labels: np.ndarray  # int64 (N,)
    image_ids: np.ndarray  # int64 (N,)
    boxes: np.ndarray  # float32 (N, 4) x, y, w, h in canvas pixels; NaN where absent
    parts: np.ndarray | None  # float32 (N, P, 3) x, y, visible in canvas pixels
    num_classes: int
    path: Path
    # float32 (N, 5): x0, y0, w, h of the image on the canvas, 1 if stored transposed
    regions: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.regions is None:  # the whole canvas, as in a version-1 cache
            n, _, h, w = self.images.shape
            self.regions = np.tile(np.array([0, 0, w, h, 0], np.float32), (n, 1))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        """The decoded size S: the canvas height, the shorter side of (almost) every image."""
        return int(self.images.shape[-2])

    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width) of the canvas."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])


def cache_key(ds: FGDataset, split: str, size: int, max_aspect: float = MAX_ASPECT,
              coverage: float = COVERAGE) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, ds.format, split, size, ds.num_classes, max_aspect,
                         coverage]).encode())
    for s in ds.split(split):
        st = s.path.stat()
        h.update(f"{s.image_id}\0{s.path}\0{s.label}\0{st.st_size}\0{st.st_mtime_ns}\0{s.box}\n"
                 .encode())
    for image_id in sorted(ds.part_locs):
        h.update(ds.part_locs[image_id].tobytes())
    return h.hexdigest()[:24]


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except OSError as exc:
        raise UserError(f"{path}: cannot decode image ({exc})") from None


def canvas_width(sizes: list[tuple[int, int]], size: int, max_aspect: float = MAX_ASPECT,
                 coverage: float = COVERAGE) -> int:
    """Width of the S x W canvas for images of these (width, height): the smallest width
    that holds at least `coverage` of them whole at shorter side `size`, capped at
    `max_aspect` x size (never under `size`)."""
    longs = np.sort([fitted_long_side(w, h, size) for w, h in sizes])
    width = int(longs[max(0, math.ceil(coverage * len(longs) - 1e-9) - 1)])
    return max(size, min(width, math.floor(size * max_aspect)))


def place(img: Image.Image, size: int, width: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One image on the size x width canvas: (3, size, width) uint8 pixels, its region
    (x0, y0, w, h, transposed) and the map of source points into canvas pixels as
    (transposed, scale_x, scale_y, x0, y0), where scales apply in the source frame."""
    transposed = img.height > img.width
    out, sx, sy = resize_within(img, size, width)  # either orientation: longer side <= width
    arr = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)  # (3, h, w), source frame
    if transposed:  # resized first, then transposed: the same pixels as the old cache
        arr = arr.transpose(0, 2, 1)
    _, h, w = arr.shape
    x0, y0 = (width - w) // 2, (size - h) // 2
    if (h, w) != (size, width):
        arr = np.pad(arr, ((0, 0), (y0, size - h - y0), (x0, width - w - x0)), mode="edge")
    region = np.array([x0, y0, w, h, float(transposed)], dtype=np.float32)
    return np.ascontiguousarray(arr), region, (transposed, sx, sy, float(x0), float(y0))


def _map_points(xy: np.ndarray, fit: tuple) -> np.ndarray:
    """(..., 2) source pixel coordinates to canvas pixels (see `place`)."""
    transposed, sx, sy, x0, y0 = fit
    out = np.stack([xy[..., 0] * sx, xy[..., 1] * sy], -1)
    if transposed:
        out = out[..., ::-1]
    return out + np.array([x0, y0], dtype=out.dtype)


def build_cache(ds: FGDataset, split: str, size: int, *, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True,
                max_aspect: float = MAX_ASPECT, coverage: float = COVERAGE) -> CachedSplit:
    """Return the cached split, decoding it first if no cache with this key exists.

    `size` is the canvas height S (the shorter side); the width follows from the images,
    `max_aspect` and `coverage` (module docstring)."""
    samples = ds.split(split)
    if not samples:
        raise UserError(f"{ds.root}: split {split!r} is empty")
    if size < 8:
        raise UserError(f"cache size {size}: expected at least 8 pixels")
    if not (max_aspect >= 1.0 and 0.0 < coverage <= 1.0):
        raise UserError(f"max_aspect {max_aspect}, coverage {coverage}: expected"
                        " max_aspect >= 1 and 0 < coverage <= 1")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(ds, split, size, max_aspect, coverage)
    final = root / f"{ds.format}-{split}-{size}-{key}"
    if (final / "meta.json").is_file():
        return open_cache(final)

    root.mkdir(parents=True, exist_ok=True)
    pool_size = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=pool_size) as pool:
        sizes = list(pool.map(lambda s: _image_size(s.path), samples))
    width = canvas_width(sizes, size, max_aspect, coverage)
    # Built under a temporary name; a cache another process finished first is kept.
    with atomic_path(final, keep_existing=True) as tmp:
        tmp.mkdir()
        n = len(samples)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(n, 3, size, width))
        regions = np.zeros((n, 5), dtype=np.float32)
        boxes = np.full((n, 4), np.nan, dtype=np.float32)
        num_parts = len(ds.part_names)
        parts = np.zeros((n, num_parts, 3), dtype=np.float32) if num_parts else None
        bar = Progress(n, f"decoding {ds.format}/{split} to {size}x{width}px", progress)

        def decode(i: int) -> None:
            s = samples[i]
            try:
                img = load_rgb(s.path)
            except OSError as exc:
                raise UserError(f"{s.path}: cannot decode image ({exc})") from None
            images[i], regions[i], fit = place(img, size, width)
            if s.box is not None:
                x, y, w, h = s.box
                corners = _map_points(np.array([[x, y], [x + w, y + h]], np.float64), fit)
                boxes[i] = (*corners[0], *(corners[1] - corners[0]))
            if parts is not None and s.image_id in ds.part_locs:
                loc = ds.part_locs[s.image_id].astype(np.float32)
                loc[:, :2] = _map_points(loc[:, :2].astype(np.float64), fit)
                x0, y0, w, h = regions[i, :4]
                inside = ((loc[:, 0] >= x0) & (loc[:, 0] < x0 + w) & (loc[:, 1] >= y0)
                          & (loc[:, 1] < y0 + h))
                loc[:, 2] *= inside
                parts[i] = loc
            bar.update()

        # Pillow releases the GIL while decoding and resampling, so threads use every core.
        with ThreadPoolExecutor(max_workers=pool_size) as pool:
            list(pool.map(decode, range(n)))
        seconds = bar.close()
        images.flush()

        np.save(tmp / "labels.npy", np.array([s.label for s in samples], dtype=np.int64))
        np.save(tmp / "image_ids.npy", np.array([s.image_id for s in samples], dtype=np.int64))
        np.save(tmp / "boxes.npy", boxes)
        np.save(tmp / "regions.npy", regions)
        if parts is not None:
            np.save(tmp / "parts.npy", parts)
        meta = {"version": CACHE_VERSION, "format": ds.format, "root": str(ds.root),
                "split": split, "size": size, "canvas": [size, width],
                "max_aspect": max_aspect, "coverage": coverage, "images": n,
                "transposed": int(regions[:, 4].sum()),
                "reduced": int((np.minimum(regions[:, 2], regions[:, 3]) < size).sum()),
                "num_classes": ds.num_classes, "build_seconds": round(seconds, 3),
                "part_names": ds.part_names}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return open_cache(final)


def open_cache(path: str | Path) -> CachedSplit:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    parts = np.load(path / "parts.npy") if (path / "parts.npy").is_file() else None
    return CachedSplit(
        images=np.load(path / "images.npy", mmap_mode="r"),
        labels=np.load(path / "labels.npy"),
        image_ids=np.load(path / "image_ids.npy"),
        boxes=np.load(path / "boxes.npy"),
        parts=parts,
        num_classes=int(meta["num_classes"]),
        path=path,
        regions=np.load(path / "regions.npy") if (path / "regions.npy").is_file() else None,
    )
