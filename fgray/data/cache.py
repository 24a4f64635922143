"""The decoded cache: each split decoded once into a fixed-size uint8 array on disk.

The array is (N, 3, S, S) uint8, memory-mapped, stored under a key that hashes the source
list (paths, labels, file sizes and modification times) and the decode settings, so a changed
source builds a new cache and an unchanged one is reused by every trial and run. Training
never decodes a JPEG again. Boxes and part locations are mapped into cache pixels so the
localisation score can compare them with the methods' maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgray.data.formats import FGDataset
from fgray.data.images import load_rgb, resize_center_crop
from fgray.errors import UserError
from fgray.progress import Progress

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("FGRAY_CACHE", Path.home() / ".cache" / "fgray")).expanduser()


@dataclass
class CachedSplit:
    images: np.ndarray  # uint8 (N, 3, S, S), memory-mapped
    labels: np.ndarray  # int64 (N,)
    image_ids: np.ndarray  # int64 (N,)
    boxes: np.ndarray  # float32 (N, 4) x, y, w, h in cache pixels; NaN where absent
    parts: np.ndarray | None  # float32 (N, P, 3) x, y, visible in cache pixels
    num_classes: int
    path: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def cache_key(ds: FGDataset, split: str, size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, ds.format, split, size, ds.num_classes]).encode())
    for s in ds.split(split):
        st = s.path.stat()
        h.update(f"{s.image_id}\0{s.path}\0{s.label}\0{st.st_size}\0{st.st_mtime_ns}\0{s.box}\n"
                 .encode())
    for image_id in sorted(ds.part_locs):
        h.update(ds.part_locs[image_id].tobytes())
    return h.hexdigest()[:24]


def build_cache(ds: FGDataset, split: str, size: int, *, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> CachedSplit:
    """Return the cached split, decoding it first if no cache with this key exists."""
    samples = ds.split(split)
    if not samples:
        raise UserError(f"{ds.root}: split {split!r} is empty")
    if size < 8:
        raise UserError(f"cache size {size}: expected at least 8 pixels")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{ds.format}-{split}-{size}-{cache_key(ds, split, size)}"
    if (final / "meta.json").is_file():
        return open_cache(final)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        n = len(samples)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(n, 3, size, size))
        boxes = np.full((n, 4), np.nan, dtype=np.float32)
        num_parts = len(ds.part_names)
        parts = np.zeros((n, num_parts, 3), dtype=np.float32) if num_parts else None
        bar = Progress(n, f"decoding {ds.format}/{split} to {size}px", progress)

        def decode(i: int) -> None:
            s = samples[i]
            try:
                img = load_rgb(s.path)
            except OSError as exc:
                raise UserError(f"{s.path}: cannot decode image ({exc})") from None
            out, scale, left, top = resize_center_crop(img, size)
            images[i] = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
            if s.box is not None:
                x, y, w, h = s.box
                boxes[i] = (x * scale - left, y * scale - top, w * scale, h * scale)
            if parts is not None and s.image_id in ds.part_locs:
                loc = ds.part_locs[s.image_id].copy()
                loc[:, 0] = loc[:, 0] * scale - left
                loc[:, 1] = loc[:, 1] * scale - top
                inside = (loc[:, 0] >= 0) & (loc[:, 0] < size) & (loc[:, 1] >= 0) & (
                    loc[:, 1] < size)
                loc[:, 2] *= inside
                parts[i] = loc
            bar.update()

        # Pillow releases the GIL while decoding and resampling, so threads use every core.
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            list(pool.map(decode, range(n)))
        seconds = bar.close()
        images.flush()

        np.save(tmp / "labels.npy", np.array([s.label for s in samples], dtype=np.int64))
        np.save(tmp / "image_ids.npy", np.array([s.image_id for s in samples], dtype=np.int64))
        np.save(tmp / "boxes.npy", boxes)
        if parts is not None:
            np.save(tmp / "parts.npy", parts)
        meta = {"format": ds.format, "root": str(ds.root), "split": split, "size": size,
                "images": n, "num_classes": ds.num_classes, "build_seconds": round(seconds, 3),
                "part_names": ds.part_names}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    )
