"""Checkpoints load as weights only: a file that pickles code is refused and nothing runs."""

from __future__ import annotations

import os

import pytest
import torch

from fgray.cli import main
from fgray.engine.loop import read_checkpoint
from fgray.engine.run import run_pretraining
from fgray.engine.spec import DataSpec, build_spec
from fgray.errors import UserError


class _WritesAFile:
    """What an attacker would put in a shared bucket: unpickling it runs `os.system`-like
    code (here it only touches a file, so the test can see whether it ran)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker) -> None:
    torch.save({"format": 1, "epoch": 1, "meta": {}, "model": {},
                "payload": _WritesAFile(str(marker))}, path)


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    _malicious(ckpt, marker)
    # The payload is real: an unsafe load runs it.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match="refused: not a plain fgray checkpoint"):
        read_checkpoint(ckpt)
    assert not marker.exists()


def test_fgray_eval_on_a_malicious_or_foreign_file_is_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil" / "checkpoint.pt"
    ckpt.parent.mkdir()
    _malicious(ckpt, marker)
    assert main(["eval", str(ckpt.parent), "--dataset", "cub", "--data-root",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and not marker.exists()
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all\n")
    assert main(["eval", str(text), "--dataset", "cub", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an fgray checkpoint" in err


def test_resume_refuses_a_poisoned_checkpoint(synth_root, tmp_path):
    spec = build_spec("moco", DataSpec(root=str(synth_root), cache_dir=str(tmp_path / "c"),
                                       val_fraction=0.25),
                      backbone="test_resnet",
                      train={"epochs": 1, "batch_size": 16, "image_size": 32, "knn_k": 5},
                      sets={"queue_size": "64", "mlp_hidden": "64"})
    run_dir = tmp_path / "run"
    run_pretraining(spec, run_dir, device=torch.device("cpu"), progress=False)
    # A real checkpoint loads as weights only.
    real = next((run_dir / "checkpoints").glob("epoch-*/checkpoint.pt"))
    assert read_checkpoint(real)["epoch"] == 1
    marker = tmp_path / "pwned"
    _malicious(real, marker)
    spec2 = build_spec("moco", spec.data, backbone="test_resnet",
                       train={"epochs": 2, "batch_size": 16, "image_size": 32, "knn_k": 5},
                       sets={"queue_size": "64", "mlp_hidden": "64"})
    with pytest.raises(UserError, match="refused"):
        run_pretraining(spec2, run_dir, device=torch.device("cpu"), progress=False)
    assert not marker.exists() and not os.path.exists(str(marker))
