"""A study's inputs are checked before any trial runs; a resume never ignores a flag."""

from __future__ import annotations

import pytest

from fgray.errors import UserError
from fgray.tune.cli import build_parser, study_from_args
from fgray.tune.spaces import space_for
from fgray.tune.study import prepare


def _args(synth_root, tmp_path, *extra):
    parser = build_parser("cub_sweep.py", "test", mode="search")
    return parser.parse_args(["--data-root", str(synth_root), "--preset", "smoke",
                              "--storage", str(tmp_path), "--name", "s",
                              "--methods", "moco", "--backbone", "test_resnet",
                              "--image-size", "32", *extra])


def _study(synth_root, tmp_path, *extra):
    return study_from_args(_args(synth_root, tmp_path, *extra), dataset="cub", mode="search",
                           default_name="s")


def test_zero_epochs_or_trials_are_refused_not_replaced(synth_root, tmp_path):
    with pytest.raises(UserError, match="--epochs 0: expected 1 or more"):
        _study(synth_root, tmp_path, "--epochs", "0")
    with pytest.raises(UserError, match="--trials 0: expected 1 or more"):
        _study(synth_root, tmp_path, "--trials", "0")


def test_a_batch_larger_than_the_train_split_fails_before_any_trial(synth_root, tmp_path):
    study = _study(synth_root, tmp_path, "--batch-size", "4096")
    with pytest.raises(UserError, match=r"--batch-size 4096 exceeds the train split .* "
                                        r"expected at most \d+"):
        prepare(study)
    assert not (tmp_path / "s" / "study.json").exists()


def test_resume_with_different_settings_names_them(synth_root, tmp_path):
    prepare(_study(synth_root, tmp_path, "--epochs", "2", "--batch-size", "16"))
    parser = build_parser("cub_sweep.py", "test", mode="search")
    base = ["--storage", str(tmp_path), "--name", "s", "--resume"]
    # Flags repeated with their stored values are fine (a resumed command line may repeat
    # the original one).
    same = study_from_args(parser.parse_args(base + ["--epochs", "2", "--set",
                                                     "queue_size=1024", "--data-root",
                                                     str(synth_root)]),
                           dataset="cub", mode="search", default_name="s")
    assert same.epochs == 2 and same.batch_size == 16
    args = parser.parse_args(base + ["--epochs", "5", "--methods", "moco,lcr",
                                     "--set", "lr=0.1"])
    with pytest.raises(UserError) as err:
        study_from_args(args, dataset="cub", mode="search", default_name="s")
    text = str(err.value)
    assert "\n" not in text
    assert "--epochs 5 (stored 2)" in text and "--methods moco,lcr (stored moco)" in text
    assert "--set lr=0.1" in text


def test_a_fixed_shared_knob_is_a_number_and_not_searched():
    space = space_for("moco", shared=["lr", "weight_decay"], fixed={"lr": "0.01"})
    assert space.config_defaults()["lr"] == 0.01
    assert space.knob_names() == {"weight_decay"}
    # The weight-decay range is built around the recipe's number.
    assert space.defaults() == {"weight_decay": pytest.approx(1e-4)}
