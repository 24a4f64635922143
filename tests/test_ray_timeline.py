"""`benchmarks/ray_timeline.py` reads Train's start-up from Ray's task events: on a real local
Ray, one 1-worker TorchTrainer run, so a Ray upgrade that renames what it reads shows here."""

from __future__ import annotations

import time

import pytest

from benchmarks.ray_timeline import CHAIN, HELPERS, describe, start_up, summary


@pytest.mark.slow
def test_train_start_up_steps_are_read_once_each_and_fit_inside_the_run(local_ray, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        # A worker sends its task events about once a second (RAY_task_events_report_interval_ms)
        # and dies with the run: a loop that ends at once can take the process group's events
        # with it (CI saw that step missing). A real run's epochs last far longer.
        time.sleep(3)
        ray.train.report({"x": 1.0})

    trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="timeline", storage_path=str(tmp_path)))
    began = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - began
    steps = [step for step, _, _ in CHAIN]
    deadline = time.time() + 30  # workers send their task events about once a second
    found = start_up()
    while time.time() < deadline and not all(s in found for s in steps):
        time.sleep(1)
        found = start_up()
    for step in steps:  # one run: each step of the chain once
        assert len(found.get(step, [])) == 1 and found[step][0] >= 0, (step, found)
    assert len(found["placement group"]) == 1
    assert {h for h in HELPERS if f"{h} __init__" in found}, found  # Train's helper actors
    got = summary(found)
    assert got["chain"] == steps and got["runs"] == 1
    # The chain's steps happen one after another inside fit(): their sum is within its wall.
    assert 0 < got["chain_s"] < wall
    line = describe(got)
    assert line.startswith("controller process ") and f"(sum {got['chain_s']:.1f} s)" in line
