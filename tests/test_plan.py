"""A study's cost plan (`--plan`): the ASHA arithmetic against Ray's own scheduler, the time
estimate from a benchmark JSON against a hand computation, bad input as one line with exit 2,
and -- the issue's check -- the plan's counts against a study then actually run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from fgray.results.tables import latest_trials, load
from fgray.tune.cli import build_parser, study_from_args, study_main
from fgray.tune.plan import (
    EVAL_FIXED_S,
    EVAL_SHARE,
    FIXED_S,
    TEST_PASSES,
    asha_rungs,
    estimate,
    expected_epochs_per_trial,
    plan_counts,
    read_benchmark,
    throughput,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("epochs, grace, rf", [(100, 10, 3), (20, 2, 2), (2, 1, 2), (4, 4, 2),
                                               (27, 1, 3), (10, 3, 4)])
def test_rungs_are_rays(epochs, grace, rf):
    bracket = _Bracket(min_t=grace, max_t=epochs, reduction_factor=rf, s=0)
    ray_rungs = sorted(m for m, _ in bracket._rungs if m < epochs)
    assert asha_rungs(epochs, grace, rf) == ray_rungs


def test_expected_epochs_match_rays_asha_on_random_scores():
    """Trials one after another with i.i.d. scores through Ray's own bracket: the mean epochs
    a trial runs approaches the plan's expectation (27 epochs, rungs 1, 3, 9: 3.0)."""
    epochs, grace, rf = 27, 1, 3
    bracket = _Bracket(min_t=grace, max_t=epochs, reduction_factor=rf, s=0,
                       stop_last_trials=False)
    rng, ran = random.Random(0), []
    for i in range(3000):
        trial, score = SimpleNamespace(trial_id=str(i)), rng.random()
        epoch = 1
        while epoch < epochs and bracket.on_result(trial, epoch, score) == \
                TrialScheduler.CONTINUE:
            epoch += 1
        ran.append(epoch)
    want = expected_epochs_per_trial(epochs, grace, rf)
    assert want == pytest.approx(1 + 2 / 3 + 6 / 9 + 18 / 27)
    assert sum(ran) / len(ran) == pytest.approx(want, rel=0.05)
    assert expected_epochs_per_trial(4, 4, 2) == 4  # grace = budget: nothing stops


def _args(tmp_path, synth_root, *extra):
    return ["--data-root", str(synth_root), "--preset", "smoke", "--methods", "moco",
            "--trials", "2", "--epochs", "2", "--seeds", "2", "--backbone", "test_resnet",
            "--init", "random", "--image-size", "32", "--set", "queue_size=64",
            "--set", "mlp_hidden=32", "--batch-size", "16", "--val-fraction", "0.5",
            "--protocols", "retrieval", "--storage", str(tmp_path / "studies"),
            "--name", "tiny", *extra]


def test_estimate_from_a_benchmark_json(tmp_path, synth_root):
    """Seconds per image from the JSON's memory row, steps per epoch from the data: the
    estimate equals the same arithmetic done here by hand."""
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"hardware": {"cuda": False, "cpus": 4}, "benchmarks": {
        "memory": {"presets": [{"case": {"name": "x", "method": "moco",
                                         "backbone": "test_resnet", "image_size": 32,
                                         "batch_size": 16}, "images_per_s": 200.0}]}}}))
    args = build_parser("cub_sweep.py", "x", mode="search").parse_args(
        _args(tmp_path, synth_root, "--grace-period", "1", "--workers", "0"))
    study = study_from_args(args, dataset="cub", mode="search", default_name="x")
    counts = plan_counts(study)
    figures, fixed, _ = read_benchmark(str(bench))
    speed = throughput(counts, figures, 32)
    from fgray.data.formats import load_dataset

    ds = load_dataset("cub", synth_root, val_fraction=0.5)
    from fgray.tune.plan import Sizes

    n_train, n_val, n_test = (len(ds.split(s)) for s in ("train", "val", "test"))
    est = estimate(study, counts, Sizes(n_train, n_val, n_test, "x"), speed, gpu=False,
                   fixed=fixed, local_slots=4)
    per_image = 1 / 200
    epoch = (n_train // 16) * 16 * per_image + (n_train + n_val) * per_image * EVAL_SHARE
    # 2 trials x 2 epochs + 1 retrain x 2 epochs; ASHA rung at epoch 1 halves epoch 2.
    assert est.trial_s_worst == pytest.approx(6 * epoch + 3 * FIXED_S["in_trial"])
    assert est.trial_s_expected == pytest.approx((2 * 1.5 + 2) * epoch
                                                 + 3 * FIXED_S["in_trial"])
    one_eval = TEST_PASSES * (n_train + n_test) * per_image * EVAL_SHARE + EVAL_FIXED_S
    assert est.evaluation_s == pytest.approx(3 * one_eval)  # 2 seeds + the init row
    assert est.concurrency == 4 and est.device_hours(True) == pytest.approx(
        (est.trial_s_worst + est.evaluation_s) / 3600)


@pytest.mark.parametrize("cpus, threads", [(None, 1), (2, 2)])
def test_the_probe_trains_with_a_trials_threads(tmp_path, synth_root, monkeypatch, cpus,
                                                threads):
    """On a CPU the probe's steps run with the torch threads a trial gets (one per CPU it
    holds: `--cpus-per-worker`, default 1), not with this process's; its count is put back."""
    import torch

    from fgray.engine.loop import Pretrainer
    from fgray.tune.plan import probe

    extra = ["--workers", "0"] + ([] if cpus is None else ["--cpus-per-worker", str(cpus)])
    args = build_parser("cub_sweep.py", "x", mode="search").parse_args(
        _args(tmp_path, synth_root, *extra))
    study = study_from_args(args, dataset="cub", mode="search", default_name="x")
    seen, train_epoch = [], Pretrainer.train_epoch

    def counted(self):
        seen.append(torch.get_num_threads())
        return train_epoch(self)

    monkeypatch.setattr(Pretrainer, "train_epoch", counted)
    own = torch.get_num_threads()
    torch.set_num_threads(3)  # neither count: the probe must set its own
    try:
        figure = probe(study, "moco", torch.device("cpu"))
        assert seen == [threads] * 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(own)
    assert f"on {threads} thread(s) of this machine's cpu" in figure.source


@pytest.mark.parametrize("extra, message", [
    (["--plan-from", "/no/such.json"], "--plan-from /no/such.json: cannot read a JSON file"),
    (["--plan-from", "EMPTY"], "no training throughput in it"),
    (["--plan-from", "NOTBENCH"], "not a benchmarks/run.py result"),
    (["--resume"], "--plan plans a new study: drop --resume"),
])
def test_plan_bad_input_is_one_line(tmp_path, synth_root, capsys, extra, message):
    (tmp_path / "empty.json").write_text(json.dumps({"benchmarks": {"memory": {}}}))
    (tmp_path / "notbench.json").write_text("[1, 2]")
    extra = [{"EMPTY": str(tmp_path / "empty.json"),
              "NOTBENCH": str(tmp_path / "notbench.json")}.get(e, e) for e in extra]
    code = study_main(_args(tmp_path, synth_root, "--plan", *extra), prog="cub_sweep.py",
                      description="x", dataset="cub")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "studies").exists()


def _number(lines: list[str], prefix: str, word: str) -> int:
    line = next(ln for ln in lines if ln.strip().startswith(prefix))
    tokens = line.replace(",", " ").replace(";", " ").split()
    return int(tokens[tokens.index(word) - 1])


@pytest.mark.slow
def test_plan_counts_equal_the_study_it_plans(tmp_path, synth_root, capsys):
    """`--plan` of a tiny study (grace = epochs: ASHA stops nothing, so the worst case is what
    runs), then the study itself: its trials, retrains, evaluation jobs (init row included)
    and epochs are the plan's; the plan wrote nothing and started no Ray."""
    import ray

    args = _args(tmp_path, synth_root, "--grace-period", "2", "--workers", "0",
                 "--concurrency", "1")
    assert study_main([*args, "--plan"], prog="cub_sweep.py", description="x",
                      dataset="cub") == 0
    lines = capsys.readouterr().out.splitlines()
    assert not (tmp_path / "studies").exists() and not ray.is_initialized()
    planned = {"trials": _number(lines, "total:", "trials"),
               "evaluations": _number(lines, "total:", "test"),
               "epochs": _number(lines, "total:", "worst"),
               "retrains": _number(lines, "moco", "retrain(s)"),
               "search": _number(lines, "moco", "search")}
    assert any(ln.strip().startswith("throughput (moco): probe:") for ln in lines), lines
    assert any("wall" in ln and "CPU-hours" in ln for ln in lines), lines

    # The study in its own process, as a user runs it (Ray pickles the console's stream).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, str(REPO / "studies" / "cub_sweep.py"), *args],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    study = str(tmp_path / "studies" / "tiny")
    rows = [r for r in latest_trials(load(study, "trials").to_pylist())]
    trials = [r for r in rows if r["method"] == "moco"]
    assert all(r["status"] == "completed" for r in trials)
    tested = {e["trial_id"] for e in load(study, "evals").to_pylist() if e["split"] == "test"}
    epochs = {(e["trial_id"], e["epoch"]) for e in load(study, "epochs").to_pylist()
              if e["method"] == "moco"}
    assert planned == {
        "trials": len(trials),
        "search": sum(r.get("param.seed") is None for r in trials),
        "retrains": sum(r.get("param.seed") is not None for r in trials),
        "evaluations": len(tested), "epochs": len(epochs)}
    assert planned == {"trials": 3, "search": 2, "retrains": 1, "evaluations": 3,
                       "epochs": 6}
    assert "init" in tested
    assert f"plan vs actual: trials 3 planned / {len(trials)} run" in out
    assert f"epochs 6 worst / 6 expected / {len(epochs)} run" in out
