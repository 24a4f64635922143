"""One image of a dataset as every reader returns it (`fgray.data.formats`) and the split code
moves it (`fgray.data.splits`); its own module so that neither imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    image_id: int
    path: Path
    label: int
    split: str  # "train" | "val" | "test"
    box: tuple[float, float, float, float] | None = None  # x, y, width, height in pixels
