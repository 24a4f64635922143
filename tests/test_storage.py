"""`fgray.storage` (locations, whole-file writes) and `fgray.engine.selection` (the best of a
history, the best so far)."""

from __future__ import annotations

import math
import os

import pytest

from fgray.engine.selection import BEST_METRIC, SELECTION_METRIC, Best, best_of, ranked, score
from fgray.errors import UserError
from fgray.storage import (
    absolute,
    as_location,
    atomic_path,
    delete_file,
    join,
    read_json,
    read_text,
    resolve,
    write_json,
    write_text,
)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_locations():
    assert join("s3://bucket/study/", "train", "t1") == "s3://bucket/study/train/t1"
    assert join("/runs", "a") == "/runs/a"
    assert absolute("gs://bucket/x/") == "gs://bucket/x"
    assert absolute("runs") == os.path.abspath("runs")
    assert as_location("s3://bucket/study", "bucket/study/plots/a.png") == \
        "s3://bucket/study/plots/a.png"
    assert as_location("/study", "/study/plots/a.png") == "/study/plots/a.png"
    fs, path = resolve("~/x")
    assert path == os.path.expanduser("~/x")
    with pytest.raises(UserError, match="cannot open this storage location"):
        resolve("nosuchscheme://bucket/x")


def test_whole_file_reads_and_writes(tmp_path):
    target = str(tmp_path / "deep" / "er" / "study.json")
    assert read_json(target) is None and read_text(target) is None
    write_json(target, {"a": 1, "when": tmp_path})  # not JSON: written with str
    assert read_json(target) == {"a": 1, "when": str(tmp_path)}
    write_text(target, "replaced")
    assert read_text(target) == "replaced"
    assert _leftovers(tmp_path / "deep" / "er") == []
    delete_file(target)
    delete_file(target)  # gone already: nothing to do
    assert read_text(target) is None


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "weights.pth"
    final.write_text("old")
    with atomic_path(final) as tmp:
        assert not tmp.exists() and tmp.parent == tmp_path
        assert tmp.name.startswith(".weights.pth.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert final.read_text() == "old"  # not before the block ends
    assert final.read_text() == "new" and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert final.read_text() == "new" and _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(final):
        pass


def test_atomic_folder_replaces_or_keeps_the_existing_one(tmp_path):
    final = tmp_path / "epoch-0001"
    for content in ("first", "second"):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "checkpoint.pt").write_text(content)
        assert (final / "checkpoint.pt").read_text() == content
    assert sorted(p.name for p in final.iterdir()) == ["checkpoint.pt"]
    # Another process finished the same cache first: theirs is kept, ours discarded.
    with atomic_path(final, keep_existing=True) as tmp:
        tmp.mkdir()
        (tmp / "checkpoint.pt").write_text("third")
    assert (final / "checkpoint.pt").read_text() == "second"
    assert _leftovers(tmp_path) == []


def test_selection_best_of_a_history_and_so_far():
    assert BEST_METRIC == f"best_{SELECTION_METRIC}"
    history = [{"epoch": 1, SELECTION_METRIC: 10.0}, {"epoch": 2},
               {"epoch": 3, SELECTION_METRIC: 30.0}, {"epoch": 4, SELECTION_METRIC: 30.0},
               {"epoch": 5, SELECTION_METRIC: math.nan}, {"epoch": 6, SELECTION_METRIC: True}]
    row, value = best_of(history)
    assert (row["epoch"], value) == (3, 30.0)  # the first of a tie
    assert best_of([{"epoch": 1}]) == (None, None)
    assert [r["epoch"] for r in ranked(history)] == [3, 4, 1, 2, 5, 6]
    assert score({SELECTION_METRIC: 5}) == 5.0 and score(None) is None
    best = Best()
    assert [best.update(r) for r in history] == [True, False, True, False, False, False]
    assert best.value == 30.0
    pairs = [("a", {"x": 1.0}), ("b", {"x": 2.0})]
    assert best_of(pairs, "x", row=lambda p: p[1]) == (("b", {"x": 2.0}), 2.0)


def test_a_location_is_resolved_once_and_joins_to_locations(tmp_path, monkeypatch):
    from fgray.storage import Location

    monkeypatch.chdir(tmp_path)
    here = Location("studies")
    assert here == str(tmp_path / "studies") and isinstance(here, str)
    assert Location(here) is here  # already resolved: passed as it is
    child = here.child("s", "tables")
    assert isinstance(child, Location) and child == str(tmp_path / "studies" / "s" / "tables")
    remote = Location("s3://bucket/x/?endpoint_override=h:9000")
    assert remote.child("s") == "s3://bucket/x/s?endpoint_override=h:9000"
    assert remote.shown == "s3://bucket/x"


def test_move_tree_puts_a_local_folder_in_place_whole(tmp_path):
    from fgray.storage import move_tree

    src = tmp_path / "scratch" / "epoch-0001"
    (src / "sub").mkdir(parents=True)
    (src / "metrics.json").write_text("{}")
    (src / "sub" / "checkpoint.pt").write_bytes(b"x")
    target = tmp_path / "run" / "epoch-0001"
    target.mkdir(parents=True)
    (target / "stale").write_text("old")  # an older copy is replaced, not merged
    move_tree(src, str(target), last="metrics.json")
    assert not src.exists()
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "metrics.json", "sub", "sub/checkpoint.pt"]
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_kept_folder_put_in_place_during_the_check_is_not_removed(tmp_path, monkeypatch):
    """Two ranks build the same cache folder: the one whose `final.exists()` ran just before
    the other's rename must keep the other's folder, never remove it while it is read."""
    from pathlib import Path

    from fgray.storage.files import atomic_path

    final = tmp_path / "cache"
    real_exists = Path.exists
    seen = []

    def exists(self, *args, **kwargs):
        if self == final and not seen:  # the check runs, then the other process finishes
            seen.append(True)
            final.mkdir()
            (final / "theirs.npy").write_text("theirs")
            return False
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    with atomic_path(final, keep_existing=True) as tmp:
        tmp.mkdir()
        (tmp / "mine.npy").write_text("mine")
    assert seen and sorted(p.name for p in final.iterdir()) == ["theirs.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # our temporary removed
