"""`fgray data check`: read a layout, decode every image, report a summary and all problems."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from fgray.data.formats import FGDataset, Problems, read_layout
from fgray.data.splits import carve_val
from fgray.progress import Progress


@dataclass
class CheckReport:
    dataset: FGDataset
    problems: list[str]
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> list[str]:
        ds = self.dataset
        counts = ds.counts()
        lines = [
            f"format: {ds.format}",
            f"root: {ds.root}",
            f"images: {len(ds.samples)}",
            f"classes: {ds.num_classes}",
            f"train/val/test: {counts['train']}/{counts['val']}/{counts['test']}",
        ]
        if self.sizes:
            ws, hs = [w for w, _ in self.sizes], [h for _, h in self.sizes]
            lines.append(f"size range: {min(ws)}x{min(hs)} .. {max(ws)}x{max(hs)} (w x h)")
        n_box = sum(s.box is not None for s in ds.samples)
        lines.append(f"boxes: {'yes' if n_box else 'no'} ({n_box} images)")
        lines.append(f"parts: {'yes' if ds.part_locs else 'no'}"
                     + (f" ({len(ds.part_names)} named parts)" if ds.part_names else ""))
        lines.append(f"attributes: {len(ds.attributes)}")
        lines.append(f"problems: {len(self.problems)}")
        return lines


def _inspect(path) -> tuple[tuple[int, int] | None, str | None]:
    try:
        with Image.open(path) as img:
            img.load()  # a full decode is the only way to see truncation
            return img.size, None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem here
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return None, f"{path}: unreadable image ({reason})"


def check_dataset(fmt: str, root: str, *, val_fraction: float = 0.1, seed: int = 0,
                  aircraft_level: str = "variant", workers: int | None = None,
                  progress: bool = True) -> CheckReport:
    problems = Problems(strict=False)
    ds = read_layout(fmt, root, problems, aircraft_level=aircraft_level)
    ds.samples = carve_val(ds.samples, val_fraction, seed)
    present = [s for s in ds.samples if s.path.is_file()]
    bar = Progress(len(present), "checking images", progress)
    sizes = []

    def one(sample):
        result = _inspect(sample.path)
        bar.update()
        return result

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for size, problem in pool.map(one, present):
            if problem:
                problems.add(problem)
            else:
                sizes.append(size)
    bar.close()
    for s in present:
        if s.box is not None and (s.box[2] <= 0 or s.box[3] <= 0):
            problems.add(f"{s.path}: bounding box {s.box} has no area")
    return CheckReport(ds, problems.lines, sizes)
