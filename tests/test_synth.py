"""The embedded synthetic set: CUB layout, determinism, learnability, colour-blindness, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fgray.data import synth
from fgray.data.birds import FACTORS, MAX_CLASSES, PART_NAMES, Rendered, class_combinations
from fgray.data.formats import load_dataset
from fgray.data.synth import write_synthetic
from fgray.errors import UserError

TEXT_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
              "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt",
              "attributes/attributes.txt", "attributes/class_attribute_labels_continuous.txt",
              "README.txt", "synth.json")

# The learnability set: 8 classes x 80 images at 64 px, half of each class for training.
CLASSES, PER_CLASS, SIZE = 8, 80, 64


def _table(root: Path, name: str) -> list[list[str]]:
    return [line.split() for line in (root / name).read_text().splitlines()]


def _load(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 in id order, 0-based labels, train mask -- read from the
    CUB text files directly, so this test does not depend on fgray's loaders."""
    paths = {int(i): rel for i, rel in _table(root, "images.txt")}
    labels = {int(i): int(c) - 1 for i, c in _table(root, "image_class_labels.txt")}
    train = {int(i): f == "1" for i, f in _table(root, "train_test_split.txt")}
    ids = sorted(paths)
    images = np.stack([np.asarray(Image.open(root / "images" / paths[i]).convert("RGB"))
                       for i in ids])
    return images, np.array([labels[i] for i in ids]), np.array([train[i] for i in ids])


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "birds"
    summary = write_synthetic(root, classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=0,
                              workers=2, progress=False)
    assert summary["images"] == CLASSES * PER_CLASS and not summary["skipped"]
    return root


@pytest.fixture(scope="module")
def small_arrays(small_set: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _load(small_set)


def test_layout(small_set: Path) -> None:
    root, n = small_set, CLASSES * PER_CLASS
    for name in TEXT_FILES:
        assert (root / name).is_file(), name
    images = _table(root, "images.txt")
    assert [int(r[0]) for r in images] == list(range(1, n + 1))
    for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        assert [int(r[0]) for r in _table(root, name)] == list(range(1, n + 1)), name

    classes = _table(root, "classes.txt")
    assert [int(r[0]) for r in classes] == list(range(1, CLASSES + 1))
    assert len({r[1] for r in classes}) == CLASSES
    assert all(r[1].startswith(f"{int(r[0]):03d}.") for r in classes)
    labels = [int(r[1]) for r in _table(root, "image_class_labels.txt")]
    for (_, rel), label in zip(images, labels):
        assert rel.split("/")[0] == classes[label - 1][1]
        assert (root / "images" / rel).is_file() and rel.endswith(".jpg")

    # Stratified split: the same number of train images in every class, at least one each way.
    flags = np.array([int(r[1]) for r in _table(root, "train_test_split.txt")])
    per_class_train = np.bincount(np.array(labels) - 1, weights=flags)
    assert per_class_train.tolist() == [PER_CLASS // 2] * CLASSES

    boxes = np.array([[float(v) for v in r[1:]] for r in _table(root, "bounding_boxes.txt")])
    assert boxes.shape == (n, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > SIZE / 8).all()
    assert (boxes[:, 0] + boxes[:, 2] <= SIZE).all() and (boxes[:, 1] + boxes[:, 3] <= SIZE).all()

    assert [r[1:] for r in _table(root, "parts/parts.txt")][:2] == [["back"], ["beak"]]
    assert len(_table(root, "parts/parts.txt")) == len(PART_NAMES) == 15
    locs = np.array([[float(v) for v in r] for r in _table(root, "parts/part_locs.txt")])
    assert locs.shape == (n * 15, 5)
    assert locs[:, 0].tolist() == [i for i in range(1, n + 1) for _ in range(15)]
    assert locs[:, 1].tolist() == list(range(1, 16)) * n
    visible = locs[:, 4] == 1
    assert set(locs[:, 4].tolist()) <= {0.0, 1.0}
    assert (locs[~visible, 2:4] == 0).all()  # hidden parts are written 0 0 0, as in CUB
    box_of = boxes[locs[visible, 0].astype(int) - 1]
    x, y = locs[visible, 2], locs[visible, 3]
    tol = 1.5
    assert ((x >= box_of[:, 0] - tol) & (x <= box_of[:, 0] + box_of[:, 2] + tol)).all()
    assert ((y >= box_of[:, 1] - tol) & (y <= box_of[:, 1] + box_of[:, 3] + tol)).all()
    # Side view: exactly one eye and one wing are visible at most; the beak nearly always is.
    per_image = locs[:, 4].reshape(n, 15)
    eyes = per_image[:, [PART_NAMES.index("left eye"), PART_NAMES.index("right eye")]]
    assert (eyes.sum(1) <= 1).all() and eyes.sum() >= 0.8 * n
    assert per_image[:, PART_NAMES.index("beak")].mean() > 0.8

    attrs = [r[1] for r in _table(root, "attributes/attributes.txt")]
    assert "has_bill_shape::hooked" in attrs and len(attrs) == sum(len(f.levels) for f in FACTORS)
    table = np.array(_table(root, "attributes/class_attribute_labels_continuous.txt"), float)
    assert table.shape == (CLASSES, len(attrs))
    assert (table.sum(1) == 100.0 * len(FACTORS)).all()  # one level per factor
    assert len({tuple(row) for row in table}) == CLASSES


def test_images_are_rgb_jpegs_with_a_few_grayscale(small_set: Path) -> None:
    modes = []
    for _, rel in _table(small_set, "images.txt"):
        with Image.open(small_set / "images" / rel) as im:
            assert im.format == "JPEG" and im.size == (SIZE, SIZE)
            modes.append(im.mode)
    gray = modes.count("L")
    assert set(modes) == {"RGB", "L"}
    assert gray == len(modes) // synth.GRAY_EVERY + (len(modes) % synth.GRAY_EVERY > 0)


def test_loader_reads_it(small_set: Path) -> None:
    ds = load_dataset("cub", small_set)
    assert ds.num_classes == CLASSES
    assert len(ds.samples) == CLASSES * PER_CLASS
    assert sorted({s.label for s in ds.samples}) == list(range(CLASSES))
    assert all(s.box is not None for s in ds.samples)


def test_deterministic_and_worker_independent(tmp_path: Path) -> None:
    kwargs = dict(classes=4, per_class=17, size=40, progress=False)
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    write_synthetic(a, seed=3, workers=1, **kwargs)
    write_synthetic(b, seed=3, workers=2, **kwargs)
    write_synthetic(c, seed=4, workers=2, **kwargs)
    for name in TEXT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    pix_a, pix_b, pix_c = _load(a)[0], _load(b)[0], _load(c)[0]
    assert np.array_equal(pix_a, pix_b)
    assert not np.array_equal(pix_a, pix_c)
    assert (a / "bounding_boxes.txt").read_bytes() != (c / "bounding_boxes.txt").read_bytes()
    assert (a / "classes.txt").read_bytes() != (c / "classes.txt").read_bytes()


def _small_cnn(classes: int) -> nn.Module:
    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                             nn.ReLU(), nn.MaxPool2d(2))

    # Global max pooling: the parts may sit anywhere in the image.
    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 96),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(96, classes))


def test_learnable_by_a_small_cnn(small_arrays: tuple[np.ndarray, ...]) -> None:
    images, labels, train = small_arrays
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor(labels)
    x_tr, y_tr, x_te, y_te = x[train], y[train], x[~train], y[~train]
    torch.manual_seed(0)
    net = _small_cnn(CLASSES)
    epochs, batch = 14, 32
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 3e-3, total_steps=epochs * -(-len(x_tr) // batch))
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x_tr))
        for k in range(0, len(x_tr), batch):
            idx = perm[k:k + batch]
            xb = x_tr[idx]
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(net(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_te).argmax(1) == y_te).float().mean().item()
    # Generator v2 (shape-coded eye and crown) measured 0.58 here; v1's colour codes 0.86.
    assert accuracy >= 0.45, f"test accuracy {accuracy:.3f}, chance {1 / CLASSES:.3f}"


def _colour_histograms(images: np.ndarray, bins: int = 8) -> np.ndarray:
    q = (images.astype(np.int64) * bins) // 256
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in code]).astype(float)
    return hist / hist.sum(1, keepdims=True)


def test_colour_statistics_do_not_separate_classes(small_arrays: tuple[np.ndarray, ...]) -> None:
    images, labels, train = small_arrays
    hist = _colour_histograms(images)
    chance = 1 / CLASSES

    centroids = np.stack([hist[train & (labels == c)].mean(0) for c in range(CLASSES)])
    dist = ((hist[~train, None, :] - centroids[None]) ** 2).sum(-1)
    nearest_centroid = (dist.argmin(1) == labels[~train]).mean()
    assert nearest_centroid <= 2 * chance, f"nearest-centroid accuracy {nearest_centroid:.3f}"

    # Logistic regression on the same histograms (an L2-regularised linear probe).
    torch.manual_seed(0)
    h = torch.tensor(hist * 100, dtype=torch.float32)
    y = torch.tensor(labels)
    tr = torch.tensor(train)
    probe = nn.Linear(h.shape[1], CLASSES)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(probe(h[tr]), y[tr]) + 1e-3 * probe.weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        linear = (probe(h[~tr]).argmax(1) == y[~tr]).float().mean().item()
    assert linear <= 2 * chance, f"logistic-regression accuracy {linear:.3f}"


def test_class_combinations_unique_and_spread() -> None:
    for classes in (2, 8, 50, MAX_CLASSES):
        combos = np.array(class_combinations(classes, seed=1))
        assert len({tuple(c) for c in combos}) == classes
        hamming = (combos[:, None] != combos[None]).sum(-1)
        np.fill_diagonal(hamming, len(FACTORS))
        # Farthest-point sampling keeps small sets far apart; 4^5 combinations allow it.
        expected = {2: 5, 8: 3, 50: 2}.get(classes, 1)
        assert hamming.min() >= expected, classes
    assert class_combinations(8, seed=1) == class_combinations(8, seed=1)
    assert class_combinations(8, seed=1) != class_combinations(8, seed=2)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(classes=1), "classes=1 is out of range: expected [2, 1024]"),
    (dict(classes=1025), "classes=1025 is out of range"),
    (dict(classes=2.5), "classes=2.5 must be an integer"),
    (dict(per_class=1), "per_class=1 is out of range: expected [2, inf]"),
    (dict(size=31), "size=31 is out of range: expected [32, 1024]"),
    (dict(size=2048), "size=2048 is out of range: expected [32, 1024]"),
    (dict(seed=-1), "seed=-1 is out of range"),
    (dict(train_fraction=1.0), "train_fraction=1.0 is out of range: expected (0, 1)"),
    (dict(workers=0), "workers=0 is out of range"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        write_synthetic(tmp_path / "out", progress=False, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_existing_output(tmp_path: Path) -> None:
    kwargs = dict(classes=2, per_class=3, size=32, progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="non-empty directory that is not a synthetic set"):
        write_synthetic(taken, **kwargs)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        write_synthetic(a_file, **kwargs)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert not write_synthetic(empty, **kwargs)["skipped"]
    before = {p: p.stat().st_mtime_ns for p in empty.rglob("*")}
    again = write_synthetic(empty, **kwargs)
    assert again["skipped"] and again["images"] == 6 and again["train"] + again["test"] == 6
    assert {p: p.stat().st_mtime_ns for p in empty.rglob("*")} == before
    with pytest.raises(UserError, match=r"other parameters \(classes=2, per_class=3, size=32"):
        write_synthetic(empty, **{**kwargs, "seed": 1})

    nested = tmp_path / "new" / "deeper" / "set"
    assert write_synthetic(nested, **kwargs)["images"] == 6
    assert (nested / "synth.json").is_file()
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["set"]


def test_failure_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synth.render_image
    calls = itertools.count()

    def failing(*args: object, **kwargs: object) -> Rendered:
        if next(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "render_image", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic(tmp_path / "out", classes=2, per_class=8, size=32, workers=1,
                        progress=False)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary directory


def test_progress_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_synthetic(tmp_path / "out", classes=2, per_class=5, size=32, workers=1)
    err = capsys.readouterr().err
    assert "synth: 10/10 images (100.0%)" in err
    write_synthetic(tmp_path / "quiet", classes=2, per_class=5, size=32, progress=False)
    assert capsys.readouterr().err == ""
