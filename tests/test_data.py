"""Dataset layouts, the validation split, `fgray data check`, and RGB decoding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image, write_aircraft, write_cars, write_cub, write_folder
from PIL import Image

from fgray.cli import main
from fgray.data.formats import load_dataset
from fgray.data.images import load_rgb
from fgray.data.splits import carve_val, split_record
from fgray.errors import UserError


def test_cub_reads_labels_splits_boxes_and_parts(cub_root):
    ds = load_dataset("cub", cub_root, val_fraction=0.0)
    assert ds.num_classes == 3 and len(ds.samples) == 12
    assert ds.classes[0] == "001.Class_1"
    assert [s.label for s in ds.samples[:4]] == [0, 0, 0, 0]
    assert ds.counts() == {"train": 6, "val": 0, "test": 6}
    assert ds.samples[0].box == (5.0, 4.0, 20.0, 15.0)
    assert ds.part_names == ["beak", "tail"]
    np.testing.assert_array_equal(ds.part_locs[1], [[10, 8, 1], [0, 0, 0]])


def test_images_load_as_rgb_whatever_their_mode(cub_root, tmp_path):
    modes = set()
    for s in load_dataset("cub", cub_root).samples:
        with Image.open(s.path) as raw:
            modes.add(raw.mode)
        assert load_rgb(s.path).mode == "RGB"
    assert {"L", "CMYK"} <= modes
    png = tmp_path / "pal.png"
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.save(png, transparency=0)  # every pixel fully transparent
    img = load_rgb(png)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_val_split_is_stratified_seeded_and_keeps_a_train_image():
    from fgray.data.sample import Sample

    samples = [Sample(i, None, i % 4, "train") for i in range(1, 81)]
    samples += [Sample(100, None, 3, "test"), Sample(101, None, 9, "train")]
    a = carve_val(samples, 0.25, seed=7)
    b = carve_val(list(reversed(samples)), 0.25, seed=7)
    c = carve_val(samples, 0.25, seed=8)
    rec = split_record(a)
    assert rec == {k: sorted(v) for k, v in split_record(b).items()}
    assert rec["val"] != split_record(c)["val"]
    per_class = {lab: sum(s.split == "val" and s.label == lab for s in a) for lab in range(4)}
    assert per_class == {0: 5, 1: 5, 2: 5, 3: 5}
    assert next(s for s in a if s.image_id == 101).split == "train"  # lone image stays train
    assert next(s for s in a if s.image_id == 100).split == "test"
    with pytest.raises(UserError, match="val_fraction"):
        carve_val(samples, 1.0)


def test_folder_cars_and_aircraft_layouts(tmp_path):
    folder = load_dataset("folder", write_folder(tmp_path / "f"), val_fraction=0.0)
    assert folder.classes == ["a", "b"] and folder.counts()["test"] == 6
    cars = load_dataset("cars", write_cars(tmp_path / "c"), val_fraction=0.0)
    assert cars.classes == ["Car 0", "Car 1"]
    assert cars.counts() == {"train": 4, "val": 0, "test": 4}
    assert [s.label for s in cars.split("train")] == [0, 0, 1, 1]
    assert cars.samples[0].box == (1.0, 2.0, 30.0, 24.0)
    air = load_dataset("aircraft", write_aircraft(tmp_path / "a"), val_fraction=0.0)
    assert air.classes == ["A300", "B737"] and air.counts()["train"] == 4
    assert air.samples[0].box == (2.0, 3.0, 19.0, 13.0)
    fam = load_dataset("aircraft", tmp_path / "a", aircraft_level="family")
    assert fam.classes == ["Airbus", "Boeing"]


@pytest.mark.parametrize("fmt", ["cars", "aircraft", "folder", "cub"])
def test_wrong_layout_is_a_one_line_user_error(tmp_path, fmt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_dataset(fmt, tmp_path / "empty")
    assert "\n" not in str(err.value) and str(tmp_path / "empty") in str(err.value)


def test_data_check_summary(cub_root, capsys):
    assert main(["data", "check", str(cub_root), "--format", "cub", "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "images: 12" in out and "classes: 3" in out
    assert "train/val/test: 3/3/6" in out  # one of each class's two train images held out
    assert "size range: 40x30 .. 40x30" in out and "boxes: yes" in out and "parts: yes" in out


def test_data_check_lists_every_problem_and_exits_2(tmp_path, capsys):
    root = write_cub(tmp_path / "bad")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    (root / "images" / "001.Class_1" / "img_1.jpg").unlink()  # missing image
    corrupt = root / "images" / "001.Class_1" / "img_2.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated JPEG
    labels = (root / "image_class_labels.txt").read_text().splitlines()
    labels[2] = "3 9"  # label out of range
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    split = (root / "train_test_split.txt").read_text().splitlines()
    (root / "train_test_split.txt").write_text("\n".join(split[:-1]) + "\n")  # a line short
    code = main(["data", "check", str(root), "--format", "cub"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any("img_1.jpg: image listed but missing" in line for line in err)
    assert any("img_2.jpg: unreadable image" in line for line in err)
    assert any("image_class_labels.txt: image 3 has label 9, expected 1..3" in line
               for line in err)
    assert any("train_test_split.txt: 11 lines but images.txt has 12" in line for line in err)
    after = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert set(after) <= set(before)  # nothing was written


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["data", "check", str(tmp_path), "--format", "zip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'zip'" in err


def test_folder_test_class_unknown_to_train(tmp_path):
    root = write_folder(tmp_path / "f")
    make_image(root / "test" / "zebra" / "0.png", 1)
    with pytest.raises(UserError, match="class 'zebra' is not among the train classes"):
        load_dataset("folder", root)
