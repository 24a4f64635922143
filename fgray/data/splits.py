"""The validation split carved from train: stratified by class, seeded, recorded by image id.

Model selection uses this split; the test split is evaluated once per final model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fgray.config import check_range
from fgray.data.sample import Sample


def val_count(n: int, fraction: float) -> int:
    """Images `carve_val` moves to "val" from a class of `n` train images."""
    return min(round(fraction * n), n - 1)


def carve_val(samples: list[Sample], fraction: float = 0.1, seed: int = 0) -> list[Sample]:
    """Move round(fraction * n_c) train images of each class c to the "val" split.

    Depends only on (image ids, labels, fraction, seed), so the same seed always gives the
    same split. Every class keeps at least one train image.
    """
    check_range("val_fraction", fraction, 0.0, 1.0, hi_open=True)
    by_class: dict[int, list[int]] = {}
    for s in samples:
        if s.split in ("train", "val"):
            by_class.setdefault(s.label, []).append(s.image_id)
    rng = np.random.default_rng(seed)
    val_ids: set[int] = set()
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        n_val = val_count(len(ids), fraction)
        order = rng.permutation(len(ids))
        val_ids.update(ids[i] for i in order[:n_val])
    out = []
    for s in samples:
        if s.split in ("train", "val"):
            s = replace(s, split="val" if s.image_id in val_ids else "train")
        out.append(s)
    return out


def split_record(samples: list[Sample]) -> dict[str, list[int]]:
    """Image ids per split, for writing beside a run so results can be reproduced."""
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for s in samples:
        out[s.split].append(s.image_id)
    return out
