"""A Tune trial's Ray Train run ends when Tune stops the trial (`fgray.train.run_stop`), so Tune
can hand the trial's process to the next trial: on a real local Ray, trials whose runs would go
on for a minute are stopped after two reports, the next trial reuses the process, and no trial
is aborted."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fgray.train.run_stop import PublishController, TrainRunStopper

REPORTS = 300  # what a run would report if nothing stopped it: 0.2 s apart, a minute
# Ray's workers cannot import this module by name: its functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _loop(config) -> None:
    import ray.train

    for step in range(REPORTS):
        time.sleep(0.2)
        with open(config["steps"], "a") as f:  # how far the run got before it ended
            f.write(f"{step}\n")
        ray.train.report({"step": step})


def _trial(config) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    with TrainRunStopper() as stopper:
        steps = Path(config["storage"]) / f"steps-{config['i']}"
        steps.parent.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            _loop, train_loop_config={"steps": str(steps)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"run-{config['i']}", storage_path=config["storage"],
                                 callbacks=[TuneReportCallback(), stopper.callback]))
        try:
            trainer.fit()
        except Exception as exc:
            if not stopper.ends_quietly(exc):
                raise


@pytest.mark.slow
def test_stopped_trials_end_their_runs_and_the_next_trial_reuses_the_process(local_ray,
                                                                              tmp_path):
    from ray import tune

    grid = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 0, "memory": 1}),
        param_space={"i": tune.grid_search([0, 1, 2]), "storage": str(tmp_path / "train")},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="stop", storage_path=str(tmp_path / "tune"),
                                  stop={"training_iteration": 2}, verbose=0),
    ).fit()
    assert not grid.errors, grid.errors  # without the stopper the 2nd trial is aborted
    assert [r.metrics["training_iteration"] for r in grid] == [2, 2, 2]
    pids = set()
    for trial_dir in (tmp_path / "tune" / "stop").iterdir():
        if trial_dir.is_dir():
            rows = [json.loads(line) for line in (trial_dir / "result.json").open()]
            pids |= {row["pid"] for row in rows}
    assert len(pids) == 1  # one trial process ran all three
    # Each run was ended by its trial's stop, a few reports after the second, not by running
    # out (REPORTS reports, a minute each).
    for i in range(3):
        done = (tmp_path / "train" / f"steps-{i}").read_text().split()
        assert 2 <= len(done) < REPORTS - 1, (i, len(done))
    # The last run is ended as Tune lets the process go; its workers' CPUs come back.
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_the_controllers_handle_is_published_once_and_kills_it(local_ray, tmp_path):
    path = tmp_path / "controller.pkl"

    @ray.remote(num_cpus=0)
    class Controller:
        def __init__(self, callback: PublishController) -> None:
            self.callback = callback

        def report(self) -> bool:
            self.callback.after_report(None, [{}], None)
            return self.callback.published

        def ping(self) -> str:
            return "alive"

    controller = Controller.remote(PublishController(str(path)))
    assert not path.exists()  # nothing before the first report
    assert ray.get(controller.report.remote())
    first = path.stat().st_mtime_ns
    assert ray.get(controller.report.remote()) and path.stat().st_mtime_ns == first
    ray.kill(ray.cloudpickle.loads(path.read_bytes()), no_restart=True)
    deadline = time.monotonic() + 30  # the kill goes through the GCS: a call may come first
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(controller.ping.remote(), timeout=30)
            time.sleep(0.1)


def test_the_callback_unpickles_without_torch(tmp_path):
    """Train's controller unpickles the callback before every run: no torch there."""
    (tmp_path / "callback.pkl").write_bytes(pickle.dumps(PublishController("/x")))
    code = ("import pickle, sys\n"
            f"pickle.loads(open({str(tmp_path / 'callback.pkl')!r}, 'rb').read())\n"
            "print(','.join(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)"
            " or 'none')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"


def test_the_stopper_needs_a_tune_trial():
    with pytest.raises(RuntimeError, match="inside a Tune trial"):
        TrainRunStopper()
