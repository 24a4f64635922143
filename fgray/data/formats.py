"""Dataset layouts: CUB-200-2011, Stanford Cars, FGVC-Aircraft and a generic folder layout.

Every reader returns the same `FGDataset`: samples with a stable image id, a 0-based label,
a split (train / val / test) and, where the layout has them, a bounding box and part
locations. Readers collect every problem they see (one line each, naming the file) so that
`fgray data check` can print them all; `load_dataset` stops at the first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fgray.data.sample import Sample
from fgray.data.splits import carve_val
from fgray.errors import UserError

FORMATS = ("cub", "cars", "aircraft", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class FGDataset:
    format: str
    root: Path
    classes: list[str]
    samples: list[Sample]
    # part_locs[image_id] = array (P, 3) of x, y, visible; part_names[p] names column p.
    part_names: list[str] = field(default_factory=list)
    part_locs: dict[int, np.ndarray] = field(default_factory=dict)
    attributes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, int]:
        c = Counter(s.split for s in self.samples)
        return {k: c.get(k, 0) for k in ("train", "val", "test")}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Problems:
    """Collects one-line problems; `strict` raises on the first, as loaders want."""

    def __init__(self, strict: bool, hint: str = "") -> None:
        self.strict = strict
        self.hint = hint
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        if self.strict:
            raise UserError(line + self.hint)
        self.lines.append(line)


def _read_table(path: Path, ncols: int, problems: Problems, *, optional: bool = False,
                at_least: bool = False) -> list[list[str]] | None:
    """Read a whitespace-separated text table; the last column may contain spaces."""
    if not path.is_file():
        if not optional:
            problems.add(f"{path}: missing file")
        return None
    rows = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, ncols - 1) if not at_least else line.split()
        if len(parts) < ncols:
            problems.add(f"{path}:{lineno}: expected {ncols} fields, found {len(parts)}")
            continue
        rows.append(parts)
    return rows


def _int_ids(path: Path, rows: list[list[str]], problems: Problems) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for lineno, row in enumerate(rows, 1):
        try:
            key = int(row[0])
        except ValueError:
            problems.add(f"{path}:{lineno}: id {row[0]!r} is not an integer")
            continue
        if key in out:
            problems.add(f"{path}: id {key} appears twice")
        out[key] = row[1:]
    return out


def read_cub(root: Path, problems: Problems) -> tuple[FGDataset, dict[int, int]]:
    """Read the CUB-200-2011 layout. Returns the dataset (splits train/test) and the raw
    train flag per image id. IDs start at 1 in every file."""
    images = _read_table(root / "images.txt", 2, problems)
    labels = _read_table(root / "image_class_labels.txt", 2, problems)
    split = _read_table(root / "train_test_split.txt", 2, problems)
    classes = _read_table(root / "classes.txt", 2, problems)
    boxes = _read_table(root / "bounding_boxes.txt", 5, problems, optional=True, at_least=True)
    if images is None or labels is None or split is None or classes is None:
        return FGDataset("cub", root, [], []), {}

    image_ids = _int_ids(root / "images.txt", images, problems)
    label_ids = _int_ids(root / "image_class_labels.txt", labels, problems)
    split_ids = _int_ids(root / "train_test_split.txt", split, problems)
    class_ids = _int_ids(root / "classes.txt", classes, problems)
    box_ids = _int_ids(root / "bounding_boxes.txt", boxes, problems) if boxes else {}

    num_classes = len(class_ids)
    if sorted(class_ids) != list(range(1, num_classes + 1)):
        problems.add(f"{root / 'classes.txt'}: class ids must run 1..{num_classes}")
    for name, table in (("image_class_labels.txt", label_ids), ("train_test_split.txt", split_ids),
                        ("bounding_boxes.txt", box_ids)):
        if name == "bounding_boxes.txt" and not boxes:
            continue
        if len(table) != len(image_ids):
            problems.add(f"{root / name}: {len(table)} lines but images.txt has {len(image_ids)}")
        for missing in sorted(set(image_ids) - set(table))[:5]:
            problems.add(f"{root / name}: image id {missing} from images.txt is absent")
        for extra in sorted(set(table) - set(image_ids))[:5]:
            problems.add(f"{root / name}: image id {extra} is not in images.txt")

    samples, train_flags = [], {}
    for image_id in sorted(image_ids):
        rel = image_ids[image_id][0].strip()
        path = root / "images" / rel
        try:
            label = int(label_ids[image_id][0])
            flag = int(split_ids[image_id][0])
        except (KeyError, ValueError):
            continue  # already reported above
        if not 1 <= label <= num_classes:
            problems.add(f"{root / 'image_class_labels.txt'}: image {image_id} has label {label},"
                         f" expected 1..{num_classes}")
            continue
        if flag not in (0, 1):
            problems.add(f"{root / 'train_test_split.txt'}: image {image_id} has flag {flag},"
                         " expected 0 or 1")
            continue
        box = None
        if image_id in box_ids:
            try:
                x, y, w, h = (float(v) for v in box_ids[image_id][:4])
                box = (x, y, w, h)
            except ValueError:
                problems.add(f"{root / 'bounding_boxes.txt'}: image {image_id} box is not numeric")
        train_flags[image_id] = flag
        samples.append(Sample(image_id, path, label - 1, "train" if flag else "test", box))

    class_names = [class_ids[i][0].strip() for i in sorted(class_ids)]
    ds = FGDataset("cub", root, class_names, samples)
    _read_cub_parts(root, ds, set(image_ids), problems)
    attr = _read_table(root / "attributes" / "attributes.txt", 2, problems, optional=True)
    if attr is None:  # the official archive keeps it one level up
        attr = _read_table(root.parent / "attributes.txt", 2, problems, optional=True)
    ds.attributes = [row[1].strip() for row in attr or []]
    return ds, train_flags


def _read_cub_parts(root: Path, ds: FGDataset, ids: set[int], problems: Problems) -> None:
    parts = _read_table(root / "parts" / "parts.txt", 2, problems, optional=True)
    locs = _read_table(root / "parts" / "part_locs.txt", 5, problems, optional=True,
                       at_least=True)
    if not parts or locs is None:
        return
    ds.part_names = [row[1].strip() for row in parts]
    num_parts = len(ds.part_names)
    out: dict[int, np.ndarray] = {}
    path = root / "parts" / "part_locs.txt"
    for lineno, row in enumerate(locs, 1):
        try:
            image_id, part_id = int(row[0]), int(row[1])
            x, y, visible = float(row[2]), float(row[3]), int(float(row[4]))
        except ValueError:
            problems.add(f"{path}:{lineno}: expected integers and coordinates")
            continue
        if image_id not in ids:
            problems.add(f"{path}:{lineno}: image id {image_id} is not in images.txt")
            continue
        if not 1 <= part_id <= num_parts:
            problems.add(f"{path}:{lineno}: part id {part_id}, expected 1..{num_parts}")
            continue
        arr = out.setdefault(image_id, np.zeros((num_parts, 3), dtype=np.float32))
        arr[part_id - 1] = (x, y, visible)
    ds.part_locs = out


def read_folder(root: Path, problems: Problems) -> tuple[FGDataset, dict[int, int]]:
    """ROOT/train/<class>/* and ROOT/test/<class>/*; classes are the sorted train folders."""
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            problems.add(f"{d}: missing folder (expected ROOT/train/<class>/ and"
                         " ROOT/test/<class>/)")
    if not train_dir.is_dir():
        return FGDataset("folder", root, [], []), {}
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        problems.add(f"{train_dir}: no class folders")
    index = {c: i for i, c in enumerate(classes)}
    samples, flags = [], {}
    for split_name, d in (("train", train_dir), ("test", test_dir)):
        if not d.is_dir():
            continue
        for class_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                problems.add(f"{class_dir}: class {class_dir.name!r} is not among the train"
                             " classes")
                continue
            files = sorted(p for p in class_dir.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.add(f"{class_dir}: no images")
            for path in files:
                image_id = len(samples) + 1
                flags[image_id] = int(split_name == "train")
                samples.append(Sample(image_id, path, index[class_dir.name], split_name))
    return FGDataset("folder", root, classes, samples), flags


def read_cars(root: Path, problems: Problems) -> tuple[FGDataset, dict[int, int]]:
    """Stanford Cars through torchvision's reader on its on-disk layout (never downloads)."""
    import scipy.io as sio
    from torchvision.datasets import StanfordCars

    ds, flags = _read_torchvision(
        root, problems, "cars",
        lambda split: StanfordCars(str(root), split=split, download=False),
        (("train", "train"), ("test", "test")),
        "ROOT/stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}",
    )
    base = root / "stanford_cars"
    boxes = []  # same order as torchvision's samples: train annotations, then test
    for mat in (base / "devkit" / "cars_train_annos.mat", base / "cars_test_annos_withlabels.mat"):
        if ds.samples:
            for a in sio.loadmat(mat, squeeze_me=True)["annotations"]:
                x1, y1, x2, y2 = (float(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
                boxes.append((x1, y1, x2 - x1 + 1, y2 - y1 + 1))
    if len(boxes) == len(ds.samples):
        ds.samples = [replace(s, box=b) for s, b in zip(ds.samples, boxes)]
    return ds, flags


def read_aircraft(root: Path, problems: Problems, level: str = "variant",
                  ) -> tuple[FGDataset, dict[int, int]]:
    """FGVC-Aircraft through torchvision's reader; its trainval split is our train split."""
    from torchvision.datasets import FGVCAircraft

    if level not in ("variant", "family", "manufacturer"):
        raise UserError(f"aircraft annotation level {level!r}: expected variant, family or"
                        " manufacturer")
    ds, flags = _read_torchvision(
        root, problems, "aircraft",
        lambda split: FGVCAircraft(str(root), split=split, annotation_level=level,
                                   download=False),
        (("trainval", "train"), ("test", "test")),
        "ROOT/fgvc-aircraft-2013b/data/{images,variants.txt,images_variant_trainval.txt,...}",
    )
    _read_aircraft_boxes(root, ds, problems)
    return ds, flags


def _read_aircraft_boxes(root: Path, ds: FGDataset, problems: Problems) -> None:
    path = root / "fgvc-aircraft-2013b" / "data" / "images_box.txt"
    rows = _read_table(path, 5, problems, optional=True, at_least=True)
    if not rows:
        return
    boxes = {}
    for row in rows:
        try:
            x1, y1, x2, y2 = (float(v) for v in row[1:5])
        except ValueError:
            problems.add(f"{path}: box of {row[0]} is not numeric")
            continue
        boxes[row[0]] = (x1, y1, x2 - x1 + 1, y2 - y1 + 1)
    ds.samples = [replace(s, box=boxes.get(s.path.stem)) for s in ds.samples]


def _read_torchvision(root, problems, fmt, make, splits, layout):
    samples, flags, classes = [], {}, []
    for tv_split, split_name in splits:
        try:
            tv = make(tv_split)
        except (RuntimeError, FileNotFoundError, OSError, KeyError, ValueError) as exc:
            problems.add(f"{root}: not a {fmt} layout ({' '.join(str(exc).split())});"
                         f" expected {layout}")
            return FGDataset(fmt, root, [], []), {}
        classes = list(tv.classes)
        pairs = getattr(tv, "_samples", None)
        if pairs is None:
            pairs = list(zip(tv._image_files, tv._labels))
        for path, label in pairs:
            image_id = len(samples) + 1
            flags[image_id] = int(split_name == "train")
            samples.append(Sample(image_id, Path(path), int(label), split_name))
    return FGDataset(fmt, root, [str(c) for c in classes], samples), flags


READERS = {"cub": read_cub, "folder": read_folder, "cars": read_cars, "aircraft": read_aircraft}


def read_layout(fmt: str, root: str | Path, problems: Problems, *,
                aircraft_level: str = "variant") -> FGDataset:
    if fmt not in READERS:
        raise UserError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: data root does not exist or is not a folder")
    if fmt == "aircraft":
        ds, _ = read_aircraft(root, problems, aircraft_level)
    else:
        ds, _ = READERS[fmt](root, problems)
    for s in ds.samples:
        if not s.path.is_file():
            problems.add(f"{s.path}: image listed but missing")
    if not ds.samples and not problems.lines:
        problems.add(f"{root}: no images found in the {fmt} layout")
    return ds


def load_dataset(fmt: str, root: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                 aircraft_level: str = "variant") -> FGDataset:
    """Read a dataset and carve a stratified, seeded validation split from its train split.

    Raises UserError naming the first problem; `fgray data check` lists them all.
    """
    problems = Problems(strict=True,
                        hint=f" (run `fgray data check {root} --format {fmt}` for all problems)")
    ds = read_layout(fmt, root, problems, aircraft_level=aircraft_level)
    ds.samples = carve_val(ds.samples, val_fraction, seed)
    return ds
