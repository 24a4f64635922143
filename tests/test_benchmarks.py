"""The benchmark harness (benchmarks/): it runs and writes its JSON, and the scaling model
computes what its docstring says. No timing assertions: the figures depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import report as bench_report  # noqa: E402
from benchmarks import scaling  # noqa: E402
from benchmarks.common import Case  # noqa: E402


def _tiny_run(tmp_path, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`benchmarks/run.py --preset cpu --only NAME --tiny` from `tmp_path`: its output and
    its JSON, which without --out goes to the current folder, never into the repository."""
    out = tmp_path / "results-cpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--preset", "cpu", "--only",
         name, "--tiny", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    assert not (REPO / "benchmarks" / "results-cpu.json").exists()
    return proc, out


def test_datapath_smoke_run_writes_its_json(tmp_path):
    proc, out = _tiny_run(tmp_path, "datapath")
    assert "full/ceiling" in proc.stdout
    report = json.loads(out.read_text())
    assert report["preset"] == "cpu" and report["tiny"] is True
    assert {"date", "cpu_model", "cpus", "torch"} <= set(report["hardware"])
    assert len(report["load_average_before"]) == 3 and len(report["load_average_after"]) == 3
    assert list(report["benchmarks"]) == ["datapath"]
    (case,) = report["benchmarks"]["datapath"]["cases"]
    assert case["case"]["backbone"] == "test_resnet" and case["precision"] == "fp32"
    for side in ("full", "ceiling", "pil"):
        assert case[side]["steps_per_s"] > 0
        assert len(case[side]["epoch_s"]) == case["measured_epochs"]
    steps = case["steps_per_epoch"]
    ratios = case["ratios"]
    assert ratios["full_over_ceiling"] == pytest.approx(
        case["full"]["steps_per_s"] / case["ceiling"]["steps_per_s"])
    assert ratios["full_over_pil"] == pytest.approx(
        case["full"]["steps_per_s"] / case["pil"]["steps_per_s"])
    # steps/s is the engine's epoch clock turned around: steps over the median epoch.
    assert case["full"]["steps_per_s"] == pytest.approx(steps / case["full"]["epoch_s"][0])
    assert {"cached_images_per_s", "pil_images_per_s"} <= set(case["data_only"])
    # RESULTS.md's tables come from this JSON.
    md = bench_report.render(report)
    assert "### Data path vs ceiling" in md
    row = next(line for line in md.splitlines() if line.startswith("| moco-test_resnet"))
    assert f"{ratios['full_over_ceiling']:.3f}" in row and f"{ratios['full_over_pil']:.2f}" in row


def test_unknown_benchmark_name_is_refused():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--only",
                           "datapath,bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown benchmark bogus" in proc.stderr


def test_moco_collectives_are_the_shuffle_and_queue_gathers():
    case = Case("t", backbone="test_resnet", image_size=32, batch_size=8,
                sets={"queue_size": 64, "mlp_hidden": 32, "dim": 16})
    payload = scaling.step_collectives(case)
    ops = [(c["op"], c["shape"]) for c in payload["collectives"]]
    # Shuffle-BN gathers the key view, broadcasts the permutation of the global batch
    # (world 2), unshuffles the keys; the queue update gathers the keys again.
    assert ops == [("all_gather", [8, 3, 32, 32]), ("broadcast", [16]),
                   ("all_gather", [8, 16]), ("all_gather", [8, 16])]
    assert payload["gather_bytes_per_rank"] == 8 * 3 * 32 * 32 * 4 + 2 * 8 * 16 * 4
    assert payload["broadcast_bytes"] == 16 * 8
    from fgray.methods import build_method

    method = build_method("moco", backbone="test_resnet", image_size=32,
                          overrides={"queue_size": "64", "mlp_hidden": "32", "dim": "16"})
    # Only the query encoder and its projector train; the momentum copies do not.
    expected = sum(p.numel() for n, p in method.named_parameters()
                   if n.startswith(("backbone.", "projector.")))
    assert payload["trainable_params"] == expected
    assert payload["grad_bytes"] == 4 * expected


def test_scaling_model_follows_the_ring_formulas():
    step = {"step": 0.1, "backward": 0.04}
    payload = {"grad_bytes": 100e6, "gather_bytes_per_rank": 10e6, "broadcast_bytes": 0}
    rows = scaling.model_table(step, payload, 32, nvlink_gbps=800.0, inter_gbps=[80.0],
                               gpus_per_node=8)
    by_n = {r["gpus"]: r for r in rows}
    assert set(by_n) == set(scaling.GPU_COUNTS)
    assert by_n[1]["efficiency_no_overlap"] == 1.0 and by_n[1]["allreduce_s"] == 0.0
    # 4 GPUs on NVLink at 100 GB/s: all-reduce 2*3/4*100 MB / 100 GB/s = 1.5 ms,
    # gathers 3 * 10 MB / 100 GB/s = 0.3 ms.
    assert by_n[4]["link"] == "nvlink"
    assert by_n[4]["allreduce_s"] == pytest.approx(1.5e-3)
    assert by_n[4]["gather_s"] == pytest.approx(0.3e-3)
    assert by_n[4]["efficiency_no_overlap"] == pytest.approx(0.1 / (0.1 + 1.8e-3))
    # 16 GPUs cross nodes at 10 GB/s: all-reduce 2*15/16*100 MB / 10 GB/s = 18.75 ms, fully
    # hidden behind the 40 ms backward; gathers 15 * 10 MB / 10 GB/s = 15 ms are not.
    r16 = by_n[16]
    assert r16["link"] == "inter-node" and r16["nodes"] == 2
    assert r16["allreduce_s"] == pytest.approx(18.75e-3)
    assert r16["gather_s"] == pytest.approx(15e-3)
    assert r16["step_s_overlap"] == pytest.approx(0.1 + 15e-3)
    assert r16["step_s_no_overlap"] == pytest.approx(0.1 + 18.75e-3 + 15e-3)
    assert r16["images_per_s_overlap"] == pytest.approx(16 * 32 / 0.115)
    assert r16["step_s_for_90pct_no_overlap"] == pytest.approx(9 * (18.75e-3 + 15e-3))
    # Without image gathers the all-to-all what-if changes nothing; with them, a shuffle by
    # all-to-all moves 15/16 of a batch per rank instead of 15 batches.
    assert r16["gather_s_all_to_all_shuffle"] == pytest.approx(r16["gather_s"])
    images = scaling.comm_seconds(16, {**payload, "image_gather_bytes_per_rank": 10e6}, 10e9)
    assert images["gather_s_all_to_all_shuffle"] == pytest.approx(15 / 16 * 10e6 / 10e9)
    md = scaling.markdown(rows, "t")
    assert md.count("\n| 16 |") == 1  # one row per GPU count


def test_study_benchmark_splits_trial_time_into_epochs_and_fixed_cost():
    import datetime as dt

    from benchmarks.study_overhead import fixed_cost_split, trial_figures

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def at(seconds: float) -> dt.datetime:
        return t0 + dt.timedelta(seconds=seconds)

    rows = [
        {"method": "moco", "trial_id": "a", "status": "running", "start_time": at(1),
         "end_time": at(1), "wall_time_s": 0.0, "epochs_run": 0},
        {"method": "moco", "trial_id": "a", "status": "completed", "start_time": at(1),
         "end_time": at(11), "wall_time_s": 10.0, "epochs_run": 2},
        # The final test evaluation appends a later row: the training ended at 11 s.
        {"method": "moco", "trial_id": "a", "status": "completed", "start_time": at(1),
         "end_time": at(40), "wall_time_s": 10.0, "epochs_run": 2, "test_knn_top1": 50.0},
        {"method": "moco", "trial_id": "b", "status": "stopped", "start_time": at(2),
         "end_time": at(6), "wall_time_s": 4.0, "epochs_run": 1},
        {"method": "init", "trial_id": "init", "status": "completed", "start_time": at(41),
         "end_time": at(43), "wall_time_s": 2.0, "epochs_run": 0},
    ]
    # Trial a's worker clocks (Unix seconds): its loop starts 0.5 s after the trial, builds
    # for 0.25 s, reports for 0.5 s between its epochs and ends 0.25 s before the trial.
    u = t0.timestamp()
    epochs = [{"trial_id": "a", "epoch": 2, "epoch_wall_s": 4.0, "session_start_time": u + 1.5,
               "epoch_end_time": u + 10.75},
              {"trial_id": "a", "epoch": 1, "epoch_wall_s": 4.5, "session_start_time": u + 1.5,
               "epoch_end_time": u + 6.25},
              {"trial_id": "b", "epoch": 1, "epoch_wall_s": 3.25}]
    figures = {f["trial_id"]: f for f in trial_figures(rows, epochs, t0.timestamp())}
    assert sorted(figures) == ["a", "b"]  # the init row trains nothing
    assert figures["a"]["epochs_s"] == pytest.approx(8.5)
    assert figures["a"]["fixed_s"] == pytest.approx(1.5)
    assert (figures["a"]["start_s"], figures["a"]["end_s"]) == (1.0, 11.0)
    assert figures["a"]["phases"] == pytest.approx({"start": 0.5, "build": 0.25,
                                                    "reports": 0.5, "finish": 0.25})
    assert sum(figures["a"]["phases"].values()) == pytest.approx(figures["a"]["fixed_s"])
    assert figures["b"]["fixed_s"] == pytest.approx(0.75) and figures["b"]["status"] == "stopped"
    assert "phases" not in figures["b"]  # no worker clocks
    assert fixed_cost_split(list(figures.values())) == pytest.approx(figures["a"]["phases"])


def test_ray_benchmark_splits_a_run_into_phases_that_add_up_to_its_wall_time(tmp_path):
    """`ray_overhead.phases` and `inside` on tables written with known clocks: each phase is
    the difference its docstring names, and together they are the process's wall time."""
    import datetime as dt

    from benchmarks.ray_overhead import PHASES, inside, phases
    from fgray.results import append

    study = str(tmp_path)
    t0 = 1_800_000_000.0

    def at(seconds: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(t0 + seconds, dt.timezone.utc)

    # The Ray run: launched at 0, recorder at 5, worker loop at 12, epochs of 3 s starting at
    # 13, 17 and 21 (reports of 1 s between), the trial row at 25, the process gone at 27.
    append(study, "trials", [{"method": "moco", "trial_id": "ray", "status": "completed",
                              "start_time": at(5), "end_time": at(25)}])
    facts = {"torch_threads": 2, "torch_interop_threads": 2, "cpus_visible": 2, "niceness": 0}
    append(study, "epochs", [
        {"method": "moco", "trial_id": "ray", "epoch": e, "session_start_time": t0 + 12,
         "epoch_end_time": t0 + end, "epoch_wall_s": 3.0, "epoch_time_s": 2.5,
         "step_data_s": 0.1 * e, "step_augment_s": 0.5, "step_compute_s": 1.5,
         "step_optimizer_s": 0.25, "step_cpu_s": 2 * (0.1 * e + 2.25), **facts}
        for e, end in ((1, 16.0), (2, 20.0), (3, 24.0))])
    got = phases(tmp_path, "ray", t0, t0 + 27)
    assert list(got) == list(PHASES)
    assert got == pytest.approx({"launch": 5.0, "start": 7.0, "build": 1.0, "epochs": 9.0,
                                 "reports": 2.0, "finish": 1.0, "exit": 2.0})
    assert sum(got.values()) == pytest.approx(27.0)
    seen = inside(tmp_path, "ray")
    assert seen["process"] == facts
    assert seen["step_s"] == pytest.approx({"data": 0.25, "augment": 0.5, "compute": 1.5,
                                            "optimizer": 0.25})  # epochs 2-3: median of .2, .3
    # CPU seconds per epoch (median of 4.9 and 5.1) and the cores the steps got (2 in each).
    assert seen["step_cpu_s"] == pytest.approx(5.0) and seen["cores"] == pytest.approx(2.0)
    # In-process rows carry no worker clocks: launch, run, exit.
    append(study, "trials", [{"method": "moco", "trial_id": "local", "status": "completed",
                              "start_time": at(2), "end_time": at(10)}])
    append(study, "epochs", [{"method": "moco", "trial_id": "local", "epoch": 1,
                              "epoch_time_s": 2.0, "epoch_wall_s": 3.0}])
    assert phases(tmp_path, "local", t0, t0 + 11) == pytest.approx(
        {"launch": 2.0, "exit": 1.0, "run": 8.0})
    assert inside(tmp_path, "local")["step_s"] == {}
    assert "cores" not in inside(tmp_path, "local")  # no step clock, no CPU split


def test_ray_section_shows_where_the_steady_state_gap_goes():
    """The RESULTS.md ray section: per run, CPU seconds per epoch, the cores the loop got and
    the other processes' cores while it trained."""
    r = {"steady_state_ratio": 1.1, "steady_state_ratio_best": 1.15, "startup_s": 12.0,
         "in_process": {"wall_s": [20.0, 21.0]}, "ray": {"wall_s": 33.0}, "ray_init_s": 4.0,
         "epochs": 6, "case": {"name": "lite0"}, "cpus_per_worker": 2,
         "inside": {"in-process-a": {"step_cpu_s": 3.9, "cores": 1.98},
                    "ray-1-worker": {"step_cpu_s": 4.13, "cores": 1.89}},
         "cpu_share": {"in-process-a": {"others": 0.009, "by_label": {"run.py": 0.008}},
                       "ray-1-worker": {"others": 0.091,
                                        "by_label": {"ray::TrainController.run": 0.014,
                                                     "dashboard.py": 0.007}}}}
    md = bench_report.ray(r)
    assert "| in-process-a | 3.90 | 1.98 | 0.009 (run.py 0.008) |" in md
    assert ("| ray-1-worker | 4.13 | 1.89 | 0.091 (ray::TrainController.run 0.014,"
            " dashboard.py 0.007) |") in md
    assert "a core left to Ray's daemons" not in md  # not measured in this result
    r["spare_core"] = {"threads": 1, "steady_state_ratio": 1.012, "steady_state_ratio_best": 0.99}
    assert ("| same, 1 torch thread(s) on both sides, a core left to Ray's daemons (median;"
            " best) | 1.012; 0.990 |") in bench_report.ray(r)
    del r["cpu_share"], r["inside"]  # results from before the split: no such table
    assert "cores the loop got" not in bench_report.ray(r)


def test_study_section_shows_both_paths_side_by_side():
    side = {"wall_time_s": 50.0, "trial_time_s": 80.0, "evaluation_time_s": 10.0,
            "concurrency": 2, "ideal_s": 45.0,
            "overhead_ratio": 50 / 45, "overhead_s": 5.0,
            "fixed_s_median": 0.8, "fixed_s_max": 1.2, "first_trial_start_s": 3.0,
            "ray_init_s": 4.0, "trials": 4, "mode": "search", "epochs": 2, "stopped": 1,
            "failed": 0}
    slow = {**side, "fixed_s_median": 25.5, "fixed_s_max": 30.0, "overhead_ratio": 1.3,
            "fixed_split_s": {"start": 20.0, "build": 1.5, "reports": 1.0, "finish": 3.0}}
    md = bench_report.study({"case": {"name": "moco-test_resnet-64px"}, "target_ratio": 1.1,
                             "target_fixed_s": 3.0, "in_trial": side, "ray_train": slow})
    assert "`--workers 0` (in the trial) | `--workers 1` (Ray Train)" in md
    row = next(line for line in md.splitlines() if line.startswith("| per-trial fixed cost"))
    assert row.endswith("| 0.80 / 1.20 s | 25.50 / 30.00 s |")
    assert "| ratio (target <= 1.1) | 1.11 | 1.30 |" in md
    assert ("| (Σ trial + Σ test evaluation wall time) / concurrency | (80.0 + 10.0) s / 2 ="
            " 45.0 s |") in md
    assert "| per-trial fixed cost, median / max (target <= 3.0 s) |" in md
    assert ("Where a trial's fixed cost goes, `--workers 1` (Ray Train) (median seconds): start"
            " 20.00, build 1.50, reports 1.00, finish 3.00.") in md
    per_side = bench_report.study({"case": {"name": "moco-test_resnet-64px"},
                                   "target_ratio": 1.1, "in_trial": side, "ray_train": slow,
                                   "target_fixed_s": {"in_trial": 3.0, "ray_train": 10.0}})
    assert "| per-trial fixed cost, median / max (target <= 3 / 10 s) |" in per_side


def test_driver_benchmark_runs_the_study_machinery_at_tiny_sizes(tmp_path):
    """`--only driver --tiny`: studies of 4 and 8 search trials through the real searcher,
    scheduler, recorder and console; every trial recorded, its JSON and its RESULTS.md
    table written, nothing into the repository."""
    _, out = _tiny_run(tmp_path, "driver")
    result = json.loads(out.read_text())["benchmarks"]["driver"]
    assert [s["size"] for s in result["sizes"]] == [4, 8]
    for size in result["sizes"]:
        # Every search trial ran to its end (2 methods x size / 2), plus the evaluations.
        assert size["trials"] == size["size"] and size["jobs"] > size["trials"]
        assert 0 < size["searcher_ms_per_trial"] < size["driver_ms_per_trial"]
        assert set(size["seconds"]) == {"searcher", "scheduler", "recorder", "console", "trial"}
    study = tmp_path / "work" / "size-8" / "driver-8"
    from fgray.results.tables import latest_trials, load

    rows = latest_trials(load(str(study), "trials").to_pylist())
    assert len([r for r in rows if r["status"] in ("completed", "stopped")]) == 8
    md = bench_report.render(json.loads(out.read_text()))
    assert "### The study driver's cost per trial" in md and "\n| 8 | " in md


def test_cpu_share_counts_each_process_over_the_training_window():
    """`cpu_share.share`: the process with the most CPU is the trainer; the window is where it
    ran above one core; every other process's cores over that window, a process that started
    inside it counted from zero."""
    from benchmarks.cpu_share import CpuSampler, _thread_cpu, describe, share

    def at(t, trainer, raylet, extra=None):
        seen = {10: ("ray::RayTrainWorker", trainer), 20: ("raylet", raylet),
                21: ("gcs_server", 1.0)}
        if extra is not None:
            seen[30] = ("ray::PreemptionWatcher", extra)
        return (t, seen)

    samples = [at(0.0, 0.0, 0.0), at(1.0, 0.5, 0.0),     # start-up: under one core
               at(2.0, 2.4, 0.1), at(3.0, 4.3, 0.2, 0.05), at(4.0, 6.2, 0.3, 0.1),
               at(5.0, 6.4, 0.3, 0.1),                   # the end: under one core again
               (6.0, {20: ("raylet", 0.3), 21: ("gcs_server", 1.0)})]  # the trainer exited
    result = share(samples)
    # The window runs from t=1 (the sample before the first busy step) to t=4.
    assert result["window_s"] == 3.0
    assert result["training"] == {"label": "ray::RayTrainWorker", "cores": round(5.7 / 3, 3)}
    assert result["by_label"] == {"raylet": 0.1, "ray::PreemptionWatcher": round(0.1 / 3, 4)}
    assert result["others"] == round(0.1 + 0.1 / 3, 3)
    assert describe(result).startswith("ray::RayTrainWorker 1.90 cores, every other process")
    # The trainer's threads, from thread samples inside the window (one at t=5 is outside).
    threads = [(1.0, {10: {"python": 0.5, "ray_core_worker": 0.0}}),
               (4.0, {10: {"python": 6.0, "ray_core_worker": 0.15}}),
               (5.0, {10: {"python": 9.0, "ray_core_worker": 0.2}})]
    assert share(samples, threads)["threads"] == {"python": round(5.5 / 3, 3),
                                                  "ray_core_worker": 0.05}
    assert "(its threads: python 1.833, ray_core_worker 0.050)" in describe(
        share(samples, threads))
    assert share(samples[:2]) is None and describe(None).startswith("no CPU samples")
    with CpuSampler(every=0.05) as sampler:  # the real sampler sees this process
        sum(i * i for i in range(300_000))
    if sampler.available:
        import os

        assert any(os.getpid() in seen for _, seen in sampler.samples)
        mine = _thread_cpu(os.getpid())  # this process's threads by name, from /proc
        assert mine and all(v >= 0 for v in mine.values()) and sum(mine.values()) > 0


def test_report_runs_as_the_script_its_docstring_shows(tmp_path):
    """`python benchmarks/report.py results.json` from any folder, on a ray section with
    Train's start-up (which imports `benchmarks.ray_timeline`): the markdown, exit 0."""
    ray = {"steady_state_ratio": 1.1, "steady_state_ratio_best": 1.15, "startup_s": 12.0,
           "in_process": {"wall_s": [20.0, 21.0]}, "ray": {"wall_s": 33.0}, "ray_init_s": 4.0,
           "epochs": 6, "case": {"name": "lite0"}, "cpus_per_worker": 2,
           "train_start_up": {"median_s": {"controller process": 0.6}, "runs": 1,
                              "chain": ["controller process"], "chain_s": 0.6}}
    results = tmp_path / "results-cpu.json"
    results.write_text(json.dumps({
        "preset": "cpu", "tiny": False, "load_average_before": [0.1, 0.1, 0.1],
        "hardware": {"date": "2026-12-06", "cpus": 2, "cpu_model": "x", "torch": "2",
                     "torch_threads": 2, "python": "3.11"},
        "benchmarks": {"ray": ray}}))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(results)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Train's start-up: controller process 0.60 (sum 0.6 s)" in proc.stdout
