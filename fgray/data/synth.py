"""Embedded fine-grained dataset: procedurally drawn birds written in the CUB-200-2011 layout.

`fgray data synth OUT` calls `write_synthetic`. The set is meant for laptops, tests and smoke
studies where CUB itself (Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset", 2011) is not
at hand; it is written file for file like the official archive (images.txt,
image_class_labels.txt, train_test_split.txt, classes.txt, bounding_boxes.txt,
parts/parts.txt, parts/part_locs.txt, attributes/...) so the ordinary CUB reader loads it.

The classes and the drawing of one image are `fgray.data.birds` (what makes the set
fine-grained is explained there); this module splits, renders in parallel and writes the
files. Determinism: an image depends only on (seed, image index) and the class definitions,
which depend only on (seed, classes); the worker count never changes a pixel.
"""


from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fgray.config import check_range
from fgray.data.birds import (
    FACTORS,
    MAX_CLASSES,
    PART_NAMES,
    attribute_names,
    class_attributes,
    class_combinations,
    class_name,
    render_image,
)
from fgray.errors import UserError
from fgray.progress import Progress
from fgray.storage import atomic_path

GENERATOR_VERSION = 2  # 2: shape-coded eye and crown, larger parts
MARKER = "synth.json"
JPEG_QUALITY = 90
GRAY_EVERY = 50  # one image in 50 is saved as a grayscale JPEG (exercises RGB conversion)

_SPLIT_TAG = 0x5B17  # apart from fgray.data.birds' image and class tags


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the written files (workers and progress do not)."""

    classes: int
    per_class: int
    size: int
    seed: int
    train_fraction: float

    def marker(self) -> dict:
        return {"generator": "fgray.data.synth", "version": GENERATOR_VERSION, **asdict(self)}


@dataclass(frozen=True)
class _Task:
    index: int
    combo: tuple[int, ...]
    size: int
    seed: int
    path: str
    gray: bool


def _render_and_save(task: _Task) -> tuple[int, tuple, list]:
    out = render_image(task.combo, task.size, task.seed, task.index)
    image = out.image.convert("L") if task.gray else out.image
    image.save(task.path, format="JPEG", quality=JPEG_QUALITY)
    return task.index, out.box, out.parts


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}={value!r} must be an integer")
    check_range(name, value, lo, hi)
    return value


def _validate(classes: object, per_class: object, size: object, seed: object,
              train_fraction: object, workers: object) -> SynthParams:
    _check_int("classes", classes, 2, MAX_CLASSES)
    _check_int("per_class", per_class, 2)
    _check_int("size", size, 32, 1024)
    _check_int("seed", seed, 0)
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)):
        raise UserError(f"train_fraction={train_fraction!r} must be a number")
    check_range("train_fraction", float(train_fraction), 0.0, 1.0, lo_open=True, hi_open=True)
    if workers is not None:
        _check_int("workers", workers, 1)
    return SynthParams(classes, per_class, size, seed, float(train_fraction))  # type: ignore[arg-type]


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def train_per_class(per_class: int, train_fraction: float = 0.5) -> int:
    """Train images of each class of an embedded set (the rest are test): at least one of
    each."""
    return min(max(round(train_fraction * per_class), 1), per_class - 1)


def _train_flags(params: SynthParams) -> list[int]:
    """Per image (in id order): 1 for train. Stratified: the same count in every class, at
    least one train and one test image each."""
    n_train = train_per_class(params.per_class, params.train_fraction)
    flags: list[int] = []
    for c in range(params.classes):
        perm = np.random.default_rng([params.seed, c, _SPLIT_TAG]).permutation(params.per_class)
        in_train = set(perm[:n_train].tolist())
        flags.extend(1 if j in in_train else 0 for j in range(params.per_class))
    return flags


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def write_synthetic(out: str | Path, *, classes: int = 10, per_class: int = 60, size: int = 96,
                    seed: int = 0, train_fraction: float = 0.5, workers: int | None = None,
                    progress: bool = True) -> dict:
    """Write the synthetic fine-grained set to `out` in the CUB-200-2011 layout.

    `out` must not exist, or be an empty directory, or hold a previous synthetic set written
    with the same parameters -- then nothing is rewritten (generation is deterministic, so the
    files already are what this call would write) and the summary says `skipped: True`.
    Anything else in `out` raises UserError. The set is written to a temporary directory
    beside `out` and renamed into place at the end, so a failure leaves no `out` behind.

    Returns {"out", "images", "classes", "train", "test", "seconds", "skipped"}.
    """
    start = time.monotonic()
    params = _validate(classes, per_class, size, seed, train_fraction, workers)
    out = Path(out).expanduser()
    flags = _train_flags(params)
    summary = {"out": str(out), "images": params.classes * params.per_class,
               "classes": params.classes, "train": sum(flags), "test": len(flags) - sum(flags)}

    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory; pick a new output directory")
        if any(out.iterdir()):
            previous = _read_marker(out)
            if previous is None:
                raise UserError(f"{out} is a non-empty directory that is not a synthetic set; "
                                "pick a new or empty output directory")
            if previous != params.marker():
                raise UserError(f"{out} holds a synthetic set written with other parameters "
                                f"({_describe(previous)}); delete it or pick another directory")
            return {**summary, "seconds": time.monotonic() - start, "skipped": True}

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write beside {out}: {e.strerror or e}") from e
    with atomic_path(out) as tmp:  # an empty `out` (checked above) is replaced
        try:
            tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot write beside {out}: {e.strerror or e}") from e
        _write_all(tmp, params, flags, workers or _default_workers(), progress)
    return {**summary, "seconds": time.monotonic() - start, "skipped": False}


def _describe(marker: dict) -> str:
    keys = ("classes", "per_class", "size", "seed", "train_fraction", "version")
    return ", ".join(f"{k}={marker.get(k)!r}" for k in keys)


def _write_all(root: Path, params: SynthParams, flags: list[int], workers: int,
               progress: bool) -> None:
    combos = class_combinations(params.classes, params.seed)
    dirs = [f"{c + 1:03d}.{class_name(combo)}" for c, combo in enumerate(combos)]
    (root / "images").mkdir()
    for d in dirs:
        (root / "images" / d).mkdir()

    tasks, rel_paths = [], []
    for c, combo in enumerate(combos):
        for j in range(params.per_class):
            index = c * params.per_class + j
            rel = f"{dirs[c]}/{class_name(combo)}_{j + 1:04d}.jpg"
            rel_paths.append(rel)
            tasks.append(_Task(index, combo, params.size, params.seed,
                               str(root / "images" / rel),
                               index % GRAY_EVERY == params.seed % GRAY_EVERY))

    results: list[tuple | None] = [None] * len(tasks)
    # Lines every 10 % in a log too: a study writes the set before its first trial starts.
    bar = Progress(len(tasks), "synth", progress, unit="images", log_tenths=True)
    workers = min(workers, max(1, len(tasks) // 32))
    try:
        if workers == 1:
            for task in tasks:
                index, box, parts = _render_and_save(task)
                results[index] = (box, parts)
                bar.update()
        else:
            # fork where available: workers then skip re-importing the package (and torch).
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers) as pool:
                for index, box, parts in pool.imap_unordered(_render_and_save, tasks,
                                                              chunksize=16):
                    results[index] = (box, parts)
                    bar.update()
    finally:
        bar.close()

    def lines(rows: object) -> str:
        return "".join(" ".join(str(v) for v in row) + "\n" for row in rows)  # type: ignore[attr-defined]

    ids = range(1, len(tasks) + 1)
    per = params.per_class
    (root / "images.txt").write_text(lines(zip(ids, rel_paths)))
    (root / "image_class_labels.txt").write_text(lines((i, (i - 1) // per + 1) for i in ids))
    (root / "train_test_split.txt").write_text(lines(zip(ids, flags)))
    (root / "classes.txt").write_text(lines(enumerate(dirs, 1)))
    (root / "bounding_boxes.txt").write_text(lines(
        (i, *(f"{v:.1f}" for v in results[i - 1][0])) for i in ids))  # type: ignore[index]
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text(lines(enumerate(PART_NAMES, 1)))
    (root / "parts" / "part_locs.txt").write_text(lines(
        (i, p, f"{x:.1f}", f"{y:.1f}", v)
        for i in ids for p, (x, y, v) in enumerate(results[i - 1][1], 1)))  # type: ignore[index]
    (root / "attributes").mkdir()
    names = attribute_names()
    (root / "attributes" / "attributes.txt").write_text(lines(enumerate(names, 1)))
    (root / "attributes" / "class_attribute_labels_continuous.txt").write_text(lines(
        tuple("100.0" if a in set(class_attributes(combo)) else "0.0" for a in names)
        for combo in combos))
    (root / "README.txt").write_text(_readme(params))
    # The marker goes last: a directory holding it is complete.
    (root / MARKER).write_text(json.dumps(params.marker(), indent=2, sort_keys=True) + "\n")


def _readme(params: SynthParams) -> str:
    factors = "\n".join(f"  {f.attribute}: {', '.join(f.levels)}" for f in FACTORS)
    return f"""\
fgray synthetic fine-grained birds (generator version {GENERATOR_VERSION})

Written by `fgray data synth` with classes={params.classes}, per_class={params.per_class},
size={params.size}, seed={params.seed}, train_fraction={params.train_fraction:g}.
The layout is that of CUB-200-2011 (ids start at 1, space-separated text files), so any CUB
reader loads it: images/, images.txt, image_class_labels.txt, train_test_split.txt,
classes.txt, bounding_boxes.txt (x y width height, pixels), parts/parts.txt,
parts/part_locs.txt (x y visible; hidden parts are 0 0 0), attributes/attributes.txt and
attributes/class_attribute_labels_continuous.txt (one row per class, 100 = has it).

Each class is a unique combination of five small local parts, and any two classes differ in
at least one of them:
{factors}
Body and wing colour, pose (rotation, mirroring), scale, position, the cluttered background,
distractor shapes, occluders and lighting are drawn from one distribution for all classes,
and the class colours (eye ring, crown) also appear in backgrounds and distractors, so only
the parts tell classes apart. About one image in {GRAY_EVERY} is a grayscale JPEG.

Regenerate with: fgray data synth OUT --classes {params.classes} --per-class {params.per_class}\
 --size {params.size} --seed {params.seed}
"""
