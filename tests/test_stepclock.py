"""What an epoch row says about its process and, with FGRAY_STEP_CLOCK=1, where its steps'
time went (`fgray.engine.stepclock`): the figures the Ray benchmark compares side by side."""

from __future__ import annotations

import os

import pytest
import torch

from fgray.engine.run import build_pretrainer
from fgray.engine.spec import DataSpec, build_spec
from fgray.engine.stepclock import PHASES, STEP_CLOCK_ENV, StepClock


def _pretrainer(synth_root, tmp_path):
    spec = build_spec("moco", DataSpec(root=str(synth_root), cache_dir=str(tmp_path / "cache")),
                      backbone="test_resnet", init="random",
                      train={"epochs": 2, "batch_size": 16, "image_size": 32},
                      sets={"queue_size": 64, "mlp_hidden": 32})
    return build_pretrainer(spec, device=torch.device("cpu"), progress=False)


def test_an_epoch_row_splits_its_step_time_and_names_its_process(synth_root, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv(STEP_CLOCK_ENV, "1")
    trainer = _pretrainer(synth_root, tmp_path)
    assert trainer.step_clock.enabled
    row = trainer.train_epoch()
    split = [row[f"step_{p}_s"] for p in PHASES]
    assert all(s > 0 for s in split), split
    # The phases tile the epoch's step loop: together they are its time, less only the loop's
    # own set-up and the epoch's final reduction.
    assert 0.9 * row["epoch_time_s"] <= sum(split) <= row["epoch_time_s"]
    assert row["torch_threads"] == torch.get_num_threads()
    assert row["torch_interop_threads"] == torch.get_num_interop_threads()
    assert row["cpus_visible"] == len(os.sched_getaffinity(0))
    assert row["niceness"] == os.nice(0)
    # The CPU the process used over the steps: at least the main thread's share of them, at
    # most every visible core for the whole epoch.
    assert 0.5 * sum(split) < row["step_cpu_s"] <= row["cpus_visible"] * row["epoch_time_s"] * 1.05
    # The next epoch starts from zero: its totals are its own.
    again = trainer.train_epoch()
    assert sum(again[f"step_{p}_s"] for p in PHASES) <= again["epoch_time_s"]


def test_the_step_clock_is_off_by_default(synth_root, tmp_path, monkeypatch):
    monkeypatch.delenv(STEP_CLOCK_ENV, raising=False)
    trainer = _pretrainer(synth_root, tmp_path)
    row = trainer.train_epoch()
    assert not [k for k in row if k.startswith("step_")]
    assert row["niceness"] == os.nice(0)  # the process facts are always recorded


def test_a_lap_counts_the_time_since_the_previous_one(monkeypatch):
    ticks = iter([10.0, 10.5, 12.0, 12.25])
    cpu = iter([100.0, 103.5])
    monkeypatch.setattr("fgray.engine.stepclock.time.perf_counter", lambda: next(ticks))
    monkeypatch.setattr("fgray.engine.stepclock.time.process_time", lambda: next(cpu))
    clock = StepClock(torch.device("cpu"), enabled=True)
    clock.start()
    clock.lap("data")
    clock.lap("compute")
    clock.lap("data")
    assert clock.report() == {"step_data_s": pytest.approx(0.75), "step_augment_s": 0.0,
                              "step_compute_s": pytest.approx(1.5), "step_optimizer_s": 0.0,
                              "step_cpu_s": pytest.approx(3.5)}
