"""Study overhead: a small study's wall time against the sum of its trials' wall times over
the number of trials run at once (`fgray.tune.study.run_study` and its `StudySummary`), and
each trial's fixed cost, for the two ways a trial runs, side by side in one run:

- `--workers 0` (`in_trial`): the engine loop in the Tune trial's own process (the smoke and
  laptop presets' path);
- `--workers 1` (`ray_train`): a 1-worker Ray Train run (TorchTrainer) per trial.

A trial's fixed cost is its wall time minus the time of its epochs (`epoch_wall_s`, the
worker's clock of each epoch: training, val kNN, visuals and the checkpoint write): what it
spends building its run (Train's controller and worker group on the one path; the data, the
model and its weights on both), reporting (checkpoint persisting, tables) and ending. The
trial's clock starts when Tune starts it (`on_trial_start`), once its actor is up: an actor's
own start shows in the study ratio and in `first_trial_start_s`.

Each side runs the same search study on a fresh local Ray cluster -- on the cpu preset the
smoke preset's study, the README's main job (its five methods, network, size, embedded set,
validation split, per-method settings and test protocols; two trials per method, the best of
each retrained over two more seeds, every final model and the initial weights tested; TPE
over each method's space, ASHA on val kNN top-1 with a grace period of one epoch) -- with one
CPU per trial (on a GPU, half a GPU per trial) and as many trials at once as there are cores
(GPU: twice the GPUs). The ideal is the study's work spread over those slots: Σ trial wall
time (the trials table's `wall_time_s`, the recorder's clock from a trial's start to its end)
plus Σ test evaluation time (each evaluation job's own clock), over the concurrency. The
ratio wall / ideal counts everything a study does besides that work: Tune's start-up, the
trial processes' imports, Optuna, the gaps between one trial's end and the next one's start,
and slots left idle while the last trials finish (a trial's own TorchTrainer start-up,
per-epoch tables and TensorBoard fall inside its wall time). It leaves out starting the
local Ray itself (`ray_init_s`), which a study submitted to a running cluster does not pay.
Each trial's start and end in seconds from the study's start (`per_trial` in the JSON; a
tested model's end is its test evaluation's) show where the rest goes.

The study runs in a child process with a time limit, so a Ray that stops making progress
cannot hang the harness. One such case was seen on a host running other Ray clusters: the
trials' placement groups outlived them (most likely ASHA stopped each trial at its last
epoch, Tune ended the trial's actor and with it the Train controller, and Ray Train's
detached PlacementGroupCleaner, which looks its cluster up without an address, died with
"Found multiple active Ray instances"), and the final evaluation waited forever for a CPU
they held. So the local cluster gets spare logical CPUs (one per trial, plus one) while the
concurrency stays fixed at the physical slots: leaked groups cannot starve the study, and the
measurement is the same as on a clean host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, Preset, median
from benchmarks.ray_overhead import loop_phases, missing, warm_cache
from benchmarks.ray_timeline import describe
from benchmarks.ray_timeline import start_up as ray_start_up
from benchmarks.ray_timeline import summary as timeline_summary

TARGET_RATIO = 1.10  # study wall / (Σ trial time / concurrency)
# A trial's fixed cost on CPU, per side: a trial in its own process, and a 1-worker Ray
# Train run (#26: Ray Train's controller, worker group and process group start per trial).
TARGET_FIXED_S = {"in_trial": 3.0, "ray_train": 10.0}
PATHS = {"in_trial": 0, "ray_train": 1}  # --workers of each side
RUN_PY = Path(__file__).resolve().parent / "run.py"


def trial_figures(rows: list[dict[str, Any]], epochs: list[dict[str, Any]],
                  start: float) -> list[dict[str, Any]]:
    """Per trial: its status, wall time, epochs, time in its epochs, fixed cost (wall minus
    epochs) and its first terminal row's start and end (seconds from `start`). `rows` is the
    whole trials table (every state of every trial), `epochs` the epochs table."""
    from fgray.results.tables import latest_trials

    # A trial's first terminal row marks the end of its training; the final evaluation
    # appends a later row (with test metrics) to the best trial.
    timeline: dict[str, tuple[float, float]] = {}
    for row in rows:
        if row.get("status") == "running" or not row.get("end_time"):
            continue
        t0, t1 = row["start_time"].timestamp() - start, row["end_time"].timestamp() - start
        if row["trial_id"] not in timeline or t1 < timeline[row["trial_id"]][1]:
            timeline[row["trial_id"]] = (t0, t1)
    in_epochs: dict[str, float] = {}
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for e in epochs:
        in_epochs[e["trial_id"]] = in_epochs.get(e["trial_id"], 0.0) + float(
            e.get("epoch_wall_s") or 0.0)
        by_trial.setdefault(e["trial_id"], []).append(e)
    out = []
    for t in latest_trials(rows):
        if t.get("epochs_run") in (None, 0) and t["trial_id"] not in in_epochs:
            continue  # no training: the init row, or a trial that failed before an epoch
        wall = float(t.get("wall_time_s") or 0.0)
        spent = in_epochs.get(t["trial_id"], 0.0)
        begin, end = timeline.get(t["trial_id"], (None, None))
        figures = {"trial_id": t["trial_id"], "status": t["status"], "wall_time_s": wall,
                   "epochs_run": t.get("epochs_run"), "epochs_s": spent,
                   "fixed_s": wall - spent, "start_s": begin, "end_s": end}
        ran = sorted(by_trial.get(t["trial_id"], []), key=lambda e: e["epoch"])
        if begin is not None and ran and ran[0].get("session_start_time") is not None:
            # Where the fixed cost goes (start + build + reports + finish), over the trial's
            # own wall time (a tested trial's later rows end with its test evaluation).
            split = loop_phases(begin + start, begin + start + wall, ran)
            figures["phases"] = {k: v for k, v in split.items() if k != "epochs"}
        out.append(figures)
    return out


def fixed_cost_split(per_trial: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each part of the trials' fixed cost (`trial_figures`' phases)."""
    split = [t["phases"] for t in per_trial if "phases" in t]
    return {k: median([s[k] for s in split]) for k in (split[0] if split else ())}


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh process: the study on a local Ray, then its figures."""
    from fgray.results.tables import load
    from fgray.train.cluster import ray_session
    from fgray.tune.study import StudyConfig, run_study

    case = Case(**job["case"])
    cores = len(os.sched_getaffinity(0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # Two trials share each GPU, so a single-GPU machine still runs trials side by side.
    concurrency = 2 * gpus if gpus else cores
    methods = job.get("methods") or [case.method]
    study = StudyConfig(
        name=f"bench-study-w{job['workers']}", storage=job["storage"],
        data={"format": "cub", "root": job["data_root"],
              "val_fraction": job.get("val_fraction", 0.1),
              "cache_dir": job["cache_dir"]},
        methods=methods, mode="search", trials=job["trials"], epochs=job["epochs"],
        seeds=job.get("seeds", 1), grace_period=1, batch_size=case.batch_size,
        image_size=case.image_size, backbones=dict.fromkeys(methods, case.backbone),
        fixed=job["fixed"] or {m: dict(case.sets) for m in methods},
        workers=job["workers"], cpus_per_worker=1.0, gpus_per_worker=0.5 if gpus else 0.0,
        concurrency=concurrency, protocols=job["protocols"], init=job["init"])
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    begin = time.time()
    try:
        with ray_session(num_cpus=max(cores, concurrency) + job["trials"] + 1, temp_dir=temp):
            start = time.time()  # run_study's own clock starts here too
            summary = run_study(study)
            start_up = timeline_summary(ray_start_up())  # per trial, from Ray's task events
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    per_trial = trial_figures(load(summary.study_dir, "trials").to_pylist(),
                              load(summary.study_dir, "epochs").to_pylist(), start)
    fixed = sorted(t["fixed_s"] for t in per_trial)
    ideal = summary.ideal_s
    return {
        "case": case.describe(), "mode": "search", "epochs": job["epochs"],
        "workers": job["workers"],
        "trials": summary.trials, "concurrency": summary.concurrency,
        "ray_init_s": start - begin,
        "wall_time_s": summary.wall_time_s, "trial_time_s": summary.trial_time_s,
        "evaluation_time_s": summary.evaluation_time_s, "ideal_s": ideal,
        "overhead_ratio": summary.overhead_ratio,
        # Fixed cost of this study over its ideal: ratio = 1 + overhead_s / ideal_s, so a
        # study of longer trials amortises it.
        "overhead_s": summary.wall_time_s - ideal,
        "stopped": summary.stopped, "failed": summary.failed,
        "first_trial_start_s": min((t["start_s"] for t in per_trial
                                    if t["start_s"] is not None), default=float("nan")),
        "fixed_s_median": fixed[len(fixed) // 2] if fixed else float("nan"),
        "fixed_s_max": fixed[-1] if fixed else float("nan"),
        "per_trial": per_trial,
        "fixed_split_s": fixed_cost_split(per_trial),
        "start_up": start_up,
        "target_ratio": TARGET_RATIO, "target_fixed_s": TARGET_FIXED_S,
    }


def run(preset: Preset, workdir: Path, data_root: Path, device: torch.device, *,
        timeout_s: float = 1800.0) -> dict[str, Any]:
    note = missing("fgray.tune.study")
    if note:
        print(f"[study] {note}", flush=True)
        return {"skipped": note}
    case = preset.study
    if preset.study_data is not None:
        from benchmarks.common import make_data

        data_root = make_data(workdir, preset.study_data)
    warm_cache(case, data_root, workdir / "cache", val_fraction=preset.study_val_fraction)
    out: dict[str, Any] = {"case": case.describe(), "target_ratio": TARGET_RATIO,
                           "target_fixed_s": TARGET_FIXED_S}
    for side, workers in PATHS.items():
        job = {"case": case.describe(), "trials": preset.study_trials,
               "epochs": preset.study_epochs, "workers": workers,
               "methods": list(preset.study_methods), "seeds": preset.study_seeds,
               "fixed": preset.study_fixed, "protocols": list(preset.study_protocols),
               "init": preset.study_init,
               "val_fraction": preset.study_val_fraction,
               "storage": str(workdir / "study-bench"), "data_root": str(data_root),
               "cache_dir": str(workdir / "cache")}
        print(f"[study] --workers {workers}: {', '.join(preset.study_methods)} x"
              f" {preset.study_trials} trials of {case.name} (best retrained over"
              f" {preset.study_seeds} seeds), {preset.study_epochs} epochs each, in a fresh"
              " process ...", flush=True)
        out[side] = _child(job, timeout_s)
    for side, workers in PATHS.items():
        r = out[side]
        if "error" in r:
            print(f"[study] --workers {workers}: {r['error']}", flush=True)
            continue
        print(f"[study] --workers {workers}: wall {r['wall_time_s']:.1f} s vs (Σ trial time +"
              f" Σ test evaluation time) / concurrency {r['ideal_s']:.1f} s ({r['trials']}"
              f" trials, {r['concurrency']} at"
              f" a time): ratio {r['overhead_ratio']:.2f} (target <= {TARGET_RATIO});"
              f" per-trial fixed cost median"
              f" {r['fixed_s_median']:.2f} s, max {r['fixed_s_max']:.2f} s (target <="
              f" {TARGET_FIXED_S[side]:g} s); first trial started after"
              f" {r['first_trial_start_s']:.1f} s", flush=True)
        print(f"[study] --workers {workers}, where a trial's fixed cost goes (median"
              " seconds): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["fixed_split_s"].items())
              + " (start: from Tune starting the trial to the worker's loop; build: the"
              " loop's data and model; reports: between epochs; finish: after the last"
              " epoch)", flush=True)
        print(f"[study] --workers {workers}, Ray's start-up per trial: "
              f"{describe(r['start_up'])}", flush=True)
    return out


def _child(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        proc = subprocess.run([sys.executable, str(RUN_PY), "--child", "study", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the study did not finish within {timeout_s:.0f} s (Ray made no"
                         " progress); no figure"}
    if proc.returncode != 0:
        raise RuntimeError(f"study child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
