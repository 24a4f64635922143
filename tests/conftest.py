"""Small on-disk fixtures in every supported layout, written by the tests themselves."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests
# Tiny models on shared cores: thread hand-offs cost more than they save.
torch.set_num_threads(1)


def make_image(path: Path, seed: int, size=(40, 30), mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "CMYK":
        img = img.convert("CMYK")
    elif mode == "P":
        img = img.convert("P")
    elif mode == "L":
        img = img.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A palette image under a .jpg name is PNG inside, as happens in scraped data sets.
    jpeg = path.suffix == ".jpg" and mode != "P"
    img.save(path, format="JPEG" if jpeg else "PNG")


def write_cub(root: Path, classes: int = 3, per_class: int = 4, *, modes=("RGB",),
              parts: bool = True) -> Path:
    """A CUB-200-2011 layout: half of each class train, boxes, and two named parts."""
    lines = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
    image_id = 0
    for c in range(1, classes + 1):
        class_dir = f"{c:03d}.Class_{c}"
        for j in range(per_class):
            image_id += 1
            rel = f"{class_dir}/img_{image_id}.jpg"
            mode = modes[image_id % len(modes)]
            make_image(root / "images" / rel, image_id, mode=mode)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c}")
            lines["split"].append(f"{image_id} {int(j < per_class // 2)}")
            lines["boxes"].append(f"{image_id} 5.0 4.0 20.0 15.0")
            lines["locs"].append(f"{image_id} 1 10.0 8.0 1")
            lines["locs"].append(f"{image_id} 2 0.0 0.0 0")
    (root / "classes.txt").write_text(
        "".join(f"{c} {c:03d}.Class_{c}\n" for c in range(1, classes + 1)))
    for name, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                      ("train_test_split.txt", "split"), ("bounding_boxes.txt", "boxes")):
        (root / name).write_text("\n".join(lines[key]) + "\n")
    if parts:
        (root / "parts").mkdir(exist_ok=True)
        (root / "parts" / "parts.txt").write_text("1 beak\n2 tail\n")
        (root / "parts" / "part_locs.txt").write_text("\n".join(lines["locs"]) + "\n")
    return root


def write_folder(root: Path, classes=("a", "b"), per_split: int = 3) -> Path:
    for split in ("train", "test"):
        for ci, name in enumerate(classes):
            for j in range(per_split):
                make_image(root / split / name / f"{j}.png", ci * 100 + j)
    return root


def write_cars(root: Path, classes: int = 2, per_split: int = 2) -> Path:
    import scipy.io as sio

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat",
                {"class_names": np.array([f"Car {i}" for i in range(classes)], dtype=object)})
    for split, mat, folder in (("train", base / "devkit" / "cars_train_annos.mat", "cars_train"),
                               ("test", base / "cars_test_annos_withlabels.mat", "cars_test")):
        recs = []
        for c in range(classes):
            for j in range(per_split):
                fname = f"{split}_{c}_{j}.jpg"
                make_image(base / folder / fname, hash((split, c, j)) % 1000)
                recs.append((1, 2, 30, 25, c + 1, fname))
        dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                 ("class", "O"), ("fname", "O")]
        sio.savemat(mat, {"annotations": np.array(recs, dtype=dtype)[None, :]})
    return root


def write_aircraft(root: Path, variants=("A300", "B737"), per_split: int = 2) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "families.txt").write_text("Airbus\nBoeing\n")
    (data / "manufacturers.txt").write_text("Airbus\nBoeing\n")
    boxes = []
    n = 1000000
    for split in ("trainval", "test"):
        v_lines, f_lines, m_lines = [], [], []
        for vi, v in enumerate(variants):
            for _ in range(per_split):
                n += 1
                make_image(data / "images" / f"{n}.jpg", n)
                v_lines.append(f"{n} {v}")
                fam = ("Airbus", "Boeing")[vi % 2]
                f_lines.append(f"{n} {fam}")
                m_lines.append(f"{n} {fam}")
                boxes.append(f"{n} 2 3 20 15")
        (data / f"images_variant_{split}.txt").write_text("\n".join(v_lines) + "\n")
        (data / f"images_family_{split}.txt").write_text("\n".join(f_lines) + "\n")
        (data / f"images_manufacturer_{split}.txt").write_text("\n".join(m_lines) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    return root


# The `--set`s of a tiny SDF run (a 16-px decoder that contrasts from the first epoch).
TINY_SDF = ("queue_size=64", "mlp_hidden=64", "decoder_size=16", "method.warmup_epochs=0",
            "knn_k=10")


def pretrain_argv(method: str, data_root: Path, tmp: Path, *sets: str, name: str | None = None,
                  storage: Path | str | None = None, backbone: str | None = "test_resnet",
                  image_size: int = 32, epochs: int = 1, batch_size: int = 16, workers: int = 0,
                  val_fraction: float | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The `fgray pretrain` argument list of a tiny test run: `method` on the CUB-layout set at
    `data_root`, a tiny timm backbone (None: the method's default), one epoch in this process
    (`workers` 0), runs under `tmp/runs` (or `storage`), the decoded cache under `tmp/cache`,
    each of `sets` one `--set`, then `extra` as it is."""
    argv = ["pretrain", "--method", method, "--dataset", "cub", "--data-root", str(data_root),
            "--image-size", str(image_size), "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--workers", str(workers),
            "--storage", str(storage if storage is not None else tmp / "runs"),
            "--cache-dir", str(tmp / "cache")]
    if backbone is not None:
        argv += ["--backbone", backbone]
    if name is not None:
        argv += ["--name", name]
    if val_fraction is not None:
        argv += ["--val-fraction", str(val_fraction)]
    for kv in sets:
        argv += ["--set", kv]
    return argv + list(extra)


def assert_momentum_step(model, progress: float, momentum: float) -> None:
    """`model.momentum_update(progress)` moves every key-backbone weight k to momentum * k +
    (1 - momentum) * q, q its query weight (shifted by 1 first, so that the step shows)."""
    before = [p.clone() for p in model.backbone_k.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.momentum_update(progress)
    for b, k, q in zip(before, model.backbone_k.parameters(), model.backbone.parameters()):
        torch.testing.assert_close(k, momentum * b + (1 - momentum) * q)


def short_training(method: str, data_root: Path, tmp: Path, *, backbone: str, image_size: int,
                   sets: dict) -> list[dict]:
    """The per-epoch history of a 12-epoch in-process run of `method` on the set at
    `data_root` (val 30 %, batch 16, seed 0, on the CPU): what "training lowers the loss"
    tests read."""
    from fgray.engine.run import run_pretraining
    from fgray.engine.spec import DataSpec, build_spec

    data = DataSpec(format="cub", root=str(data_root), val_fraction=0.3,
                    cache_dir=str(tmp / "cache"))
    spec = build_spec(method, data, backbone=backbone,
                      train={"epochs": 12, "batch_size": 16, "image_size": image_size,
                             "seed": 0},
                      sets=sets)
    return run_pretraining(spec, tmp / "run", device=torch.device("cpu"), resume=False,
                           progress=False).history


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    return write_cub(tmp_path / "cub", modes=("RGB", "L", "CMYK", "P"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The embedded dataset at test size, generated once per session."""
    from fgray.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth") / "fg"
    write_synthetic(out, classes=8, per_class=24, size=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for one test module's Ray Train runs, shut down after the
    module. Its temp dir is short (/tmp/rXXXX): Ray's unix socket paths must stay under ~107
    characters."""
    from fgray.train.cluster import ray_session

    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    try:
        with ray_session(num_cpus=2, temp_dir=temp_dir):
            yield
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def exit_once(tmp_path_factory):
    """Make the fault of a worker-restart test: `make(at_epoch, on_rank)` returns the epoch
    hook (`epoch_hooks=[hook]`) under which rank `on_rank` exits hard once after training
    epoch `at_epoch`, before reporting it (`tests/faults.py`), and the marker file that the
    fault writes when it fires."""
    from faults import EXIT_ONCE

    def make(at_epoch: int, on_rank: int) -> tuple[dict, Path]:
        marker = tmp_path_factory.mktemp("fault") / "exited-once"
        hook = {"hook": EXIT_ONCE,
                "kwargs": {"at_epoch": at_epoch, "on_rank": on_rank, "marker": str(marker)}}
        return hook, marker

    return make


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto's server) on 127.0.0.1 for the whole session (tests/s3server.py)."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server, with the standard AWS_* variables that reach
    it set for this test (and every process it starts): yields (server, bucket name)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server, s3_server.bucket()


@pytest.fixture
def two_nodes():
    """Two Ray nodes of 1 CPU each on 127.0.0.1 (the head and one worker node), this process
    their driver, all stopped after the test: a `twonode.LocalCluster` (tests/twonode.py).
    The nodes inherit the environment as it is when they start, so list a fixture that sets
    variables for them (`s3`) before this one among the test's arguments."""
    from twonode import ray_cluster

    with ray_cluster(nodes=2, cpus=1) as cluster:
        yield cluster


@pytest.fixture(autouse=True, scope="module")
def _no_ray_connection_outlives_its_module():
    """A test module that leaves this process connected to a Ray (a run whose session it
    reused, a fixture of its own) must not hand that connection to the next module: the
    multi-node tests start their own cluster, and some tests assert that Ray never started."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
