"""Ray overhead: a 1-worker Ray Train run (`fgray pretrain --workers 1`, a TorchTrainer)
against the same run in this process (`fgray pretrain --workers 0`).

Both go through the command line a user types, with the same spec, evaluation, checkpoints
and tables. The in-process run is done before and after the Ray run, so drifting load from
other processes falls on both sides. Steady-state step time is the per-epoch
`epoch_time_s` (the engine's own clock inside the worker) read back from the study's epochs
table, first epoch left out; start-up cost is the Ray run's wall time minus the in-process
run's. The Ray run joins a local Ray this harness started just before it (as a run submitted
to a running cluster does), whose start is given apart (`ray_init_s`). The worker is given
every core (`--cpus-per-worker`), as the in-process run has them: Ray limits a worker's
torch threads to its CPUs.

Where the Ray run's time goes (`phases`), from the clocks the tables already hold -- the
trial row's `start_time`/`end_time` (the driver's recorder, once Ray is up and before the run
starts / after it ends), each epoch row's `session_start_time` (the worker entering the loop),
`epoch_end_time` and `epoch_wall_s` -- and this harness's own clock around the process:

    launch     process start to the recorder: imports, joining the Ray, the spec
    start      to the worker's loop: Train's controller, placement group, worker process,
               its imports and the torch process group, each given apart from Ray's own
               task events (`train_start_up`, `benchmarks/ray_timeline.py`)
    build      the loop's set-up: the data stream, the model, the optimiser
    epochs     Σ epoch_wall_s: training, val kNN, visuals, the checkpoint write
    reports    between epochs: each report, the checkpoint persisted, the epoch rows
    finish     the last report to the trial row: Train's controller and worker group ending
    exit       the trial row to the process's exit

The in-process run's rows carry no worker clocks: its `launch` and `exit` are measured the
same way, and the rest is one `run` (the trial row's end minus its start).

Where a steady-state gap goes: each run's steps record the CPU seconds the process used
(`step_cpu_s`, `fgray.engine.stepclock`) and with their time the cores the loop got, and a
sampler gives every other process's cores while the run trained (`benchmarks/cpu_share.py`).
The same CPU seconds per epoch on both sides with fewer cores in the worker means the time
went to other processes (named, with their share), not to the loop.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, Preset, make_spec, median
from benchmarks.cpu_share import CpuSampler, share
from benchmarks.cpu_share import describe as describe_share
from benchmarks.ray_timeline import describe, start_up
from benchmarks.ray_timeline import summary as timeline_summary

TARGET_STEADY_RATIO = 1.05


def missing(module: str) -> str | None:
    """A note when `module` (written by another part of the project) is not there yet."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module} is not available yet: benchmark skipped"


def pretrain_flags(case: Case, data_root: Path, cache_dir: Path, storage: Path, epochs: int,
                   device: torch.device) -> list[str]:
    flags = ["pretrain", "--method", case.method, "--dataset", "cub", "--data-root",
             str(data_root), "--backbone", case.backbone, "--image-size", str(case.image_size),
             "--batch-size", str(case.batch_size), "--epochs", str(epochs), "--storage",
             str(storage), "--cache-dir", str(cache_dir)]
    for key, value in case.sets.items():
        flags += ["--set", f"{key}={value}"]
    return flags


def epoch_times(storage: Path, trial_id: str) -> list[float]:
    from fgray.results.tables import load

    rows = [r for r in load(str(storage), "epochs").to_pylist() if r["trial_id"] == trial_id]
    rows.sort(key=lambda r: r["epoch"])
    return [float(r["epoch_time_s"]) for r in rows]


def inside(storage: Path, trial_id: str) -> dict[str, Any]:
    """What the run's epochs recorded about its process (threads, CPUs, niceness: the last
    epoch's) and where its step time went (`fgray.engine.stepclock`, FGRAY_STEP_CLOCK=1):
    each phase's median seconds per epoch over the epochs after the first."""
    from fgray.engine.stepclock import PHASES as STEP_PHASES
    from fgray.results.tables import load

    rows = sorted((r for r in load(str(storage), "epochs").to_pylist()
                   if r["trial_id"] == trial_id), key=lambda r: r["epoch"])
    facts = {k: rows[-1].get(k) for k in ("torch_threads", "torch_interop_threads",
                                          "cpus_visible", "niceness")}
    steady = rows[1:] or rows
    split = {p: median([float(r[f"step_{p}_s"]) for r in steady])
             for p in STEP_PHASES if steady[0].get(f"step_{p}_s") is not None}
    out: dict[str, Any] = {"process": facts, "step_s": split}
    if steady[0].get("step_cpu_s") is not None:
        # The CPU the loop used per epoch, and over its step time the cores it got.
        out["step_cpu_s"] = median([float(r["step_cpu_s"]) for r in steady])
        out["cores"] = median([float(r["step_cpu_s"]) / sum(float(r[f"step_{p}_s"])
                                                           for p in STEP_PHASES)
                               for r in steady])
    return out


PHASES = ("launch", "start", "build", "epochs", "reports", "finish", "exit")  # a Ray run's


def phases(storage: Path, trial_id: str, launched: float, exited: float) -> dict[str, float]:
    """Seconds of each phase of one run (module docstring), from its rows and the harness's
    wall clock around its process (`launched`, `exited`: `time.time()`); they add up to the
    process's wall time."""
    from fgray.results.tables import latest_trials, load

    (trial,) = [r for r in latest_trials(load(str(storage), "trials").to_pylist())
                if r["trial_id"] == trial_id]
    rows = sorted((r for r in load(str(storage), "epochs").to_pylist()
                   if r["trial_id"] == trial_id), key=lambda r: r["epoch"])
    # The trials table stores its clocks as timestamps (datetimes here), the epochs table as
    # Unix seconds.
    began, ended = (trial[k].timestamp() for k in ("start_time", "end_time"))
    ends = {"launch": began - launched, "exit": exited - ended}
    if rows[0].get("session_start_time") is None:  # in-process: no worker clocks
        return {**ends, "run": ended - began}
    return {"launch": ends["launch"], **loop_phases(began, ended, rows), "exit": ends["exit"]}


def loop_phases(began: float, ended: float, rows: list[dict[str, Any]]) -> dict[str, float]:
    """A trial's time from its start to its end (Unix seconds) split by its epoch rows (in
    epoch order, with the worker's clocks): start (to the worker's loop), build, epochs,
    reports (between epochs) and finish (after the last epoch)."""
    starts = [r["epoch_end_time"] - r["epoch_wall_s"] for r in rows]
    loop = rows[0]["session_start_time"]
    return {
        "start": loop - began,
        "build": starts[0] - loop,
        "epochs": sum(r["epoch_wall_s"] for r in rows),
        "reports": sum(b - a["epoch_end_time"] for a, b in zip(rows, starts[1:])),
        "finish": ended - rows[-1]["epoch_end_time"],
    }


def spare_core(name: str, cores: int, fgray_pretrain, local_flags: list[str], temp: str
               ) -> dict[str, Any]:
    """The same comparison with one core left to everything else on the host: both sides
    run `cores - 1` torch threads (the in-process run through OMP_NUM_THREADS, the worker
    through its CPUs). On a 2-core host the saturated comparison charges Ray's daemons to
    the worker (they take about 4.5 % of the cores); on a GPU node they have cores of their
    own, which this measures."""
    from fgray.train.cluster import ray_session

    threads = cores - 1
    runs = ("spare-in-process-a", "spare-ray-1-worker", "spare-in-process-b")
    saved = os.environ.get("OMP_NUM_THREADS")
    print(f"[ray] {name}: the same three runs at {threads} torch thread(s) ...", flush=True)
    try:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        fgray_pretrain(runs[0], local_flags)
        with ray_session(num_cpus=cores, temp_dir=temp):
            fgray_pretrain(runs[1], ["--workers", "1", "--cpus-per-worker", str(threads)])
        fgray_pretrain(runs[2], local_flags)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return {"threads": threads, "runs": list(runs)}


def ratios(storage: Path, runs: list[str]) -> dict[str, Any]:
    """Steady-state epoch time of the Ray run (`runs[1]`) over the in-process runs around
    it, median and best epochs, with each side's recorded threads."""
    local = epoch_times(storage, runs[0])[1:] + epoch_times(storage, runs[2])[1:]
    remote = epoch_times(storage, runs[1])[1:]
    return {"steady_state_ratio": median(remote) / median(local),
            # Other processes only ever add time: the shortest epochs are the undisturbed cost.
            "steady_state_ratio_best": min(remote) / min(local),
            "epoch_s_after_first": {"in_process": local, "ray": remote},
            "torch_threads": {r: inside(storage, r)["process"]["torch_threads"] for r in runs}}


def import_seconds(module: str, env: dict[str, str]) -> float:
    """Seconds a fresh process takes to import `module` (what each Ray Train worker pays)."""
    code = (f"import time; t = time.perf_counter(); import {module}; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def warm_cache(case: Case, data_root: Path, cache_dir: Path, val_fraction: float = 0.1) -> None:
    """Decode the caches first, so what is measured never pays for it."""
    from fgray.engine.run import load_splits

    spec = make_spec(case, data_root, cache_dir, val_fraction=val_fraction)
    load_splits(spec.data, spec.train.decoded_size, progress=False)


def run(preset: Preset, workdir: Path, data_root: Path, device: torch.device) -> dict[str, Any]:
    note = missing("fgray.train.trainer")
    if note:
        print(f"[ray] {note}", flush=True)
        return {"skipped": note}
    from fgray.engine.stepclock import STEP_CLOCK_ENV
    from fgray.train.cluster import NUM_CPUS_ENV, TEMP_DIR_ENV, ray_session

    case, epochs = preset.ray, preset.ray_epochs
    cache_dir, storage = workdir / "cache", workdir / "ray-bench"
    warm_cache(case, data_root, cache_dir)
    cores = len(os.sched_getaffinity(0))
    flags = pretrain_flags(case, data_root, cache_dir, storage, epochs, device)
    # A short temp root: Ray's socket paths must stay under ~107 characters.
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    # Both runs time their steps' phases (a CPU-only cost of 4 clock reads per step, the same
    # on both sides); the Ray workers inherit it from the local Ray this process starts.
    saved = os.environ.get(STEP_CLOCK_ENV)
    os.environ[STEP_CLOCK_ENV] = "1"

    clocks: dict[str, tuple[float, float]] = {}
    shares: dict[str, dict[str, Any] | None] = {}  # who had the CPU while each run trained

    def fgray_pretrain(name: str, extra: list[str]) -> float:
        """`fgray pretrain ...` in a fresh process, as a user runs it; its wall time. It
        joins the local Ray this process holds, if any (RAY_ADDRESS), as a run submitted to
        a running cluster does."""
        env = {**os.environ, NUM_CPUS_ENV: str(cores), TEMP_DIR_ENV: temp}
        launched, start = time.time(), time.perf_counter()
        with CpuSampler() as sampler:
            proc = subprocess.run([sys.executable, "-m", "fgray.cli", *flags, "--name", name,
                                   *extra], env=env, capture_output=True, text=True)
        shares[name] = share(sampler.samples, sampler.threads)
        if proc.returncode != 0:
            raise RuntimeError(f"fgray pretrain ({name}) exited {proc.returncode}:\n"
                               f"{proc.stderr[-3000:]}")
        clocks[name] = (launched, time.time())
        return time.perf_counter() - start

    local_flags = ["--workers", "0", "--device", str(device)]
    ray_flags = ["--workers", "1", "--cpus-per-worker", str(cores)]
    if device.type == "cuda":
        ray_flags += ["--gpus-per-worker", "1"]
    spare: dict[str, Any] | None = None
    try:
        print(f"[ray] {case.name}: in-process run, {epochs} epochs ...", flush=True)
        wall_a = fgray_pretrain("in-process-a", local_flags)
        print(f"[ray] {case.name}: 1-worker TorchTrainer run on a fresh local Ray ...",
              flush=True)
        # The Ray is started here and the run joins it, so its task events (where Train's
        # start-up goes) can be read after the run's process has ended.
        start = time.perf_counter()
        with ray_session(num_cpus=cores, temp_dir=temp):
            ray_init_s = time.perf_counter() - start
            ray_wall = fgray_pretrain("ray-1-worker", ray_flags)
            train_start = timeline_summary(start_up())
        print(f"[ray] {case.name}: in-process run again ...", flush=True)
        wall_b = fgray_pretrain("in-process-b", local_flags)
        if cores > 1 and device.type == "cpu":
            spare = spare_core(case.name, cores, fgray_pretrain, local_flags, temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop(STEP_CLOCK_ENV, None)
        else:
            os.environ[STEP_CLOCK_ENV] = saved
    print(f"[ray] Train's start-up, step by step: {describe(train_start)}", flush=True)

    worker_imports = import_seconds("fgray.train.trainer", dict(os.environ))
    by_run = {name: phases(storage, name, *clocks[name]) for name in clocks}
    ray_phases = by_run["ray-1-worker"]
    # In-process: the mean of the runs before and after the Ray run.
    local_phases = {k: (by_run["in-process-a"][k] + by_run["in-process-b"][k]) / 2
                    for k in by_run["in-process-a"]}
    print("[ray] where the Ray run's time goes: "
          + ", ".join(f"{k} {ray_phases[k]:.1f} s" for k in PHASES)
          + f" (in-process: launch {local_phases['launch']:.1f} s, run"
          f" {local_phases['run']:.1f} s, exit {local_phases['exit']:.1f} s); a fresh"
          f" process imports fgray.train.trainer in {worker_imports:.1f} s", flush=True)

    seen = {name: inside(storage, name) for name in clocks}
    for name, found in seen.items():
        split = ", ".join(f"{p} {v:.2f}" for p, v in found["step_s"].items())
        facts = ", ".join(f"{k} {v}" for k, v in found["process"].items())
        print(f"[ray] inside {name}: {facts}; seconds per epoch: {split}", flush=True)
        if found.get("cores") is not None:
            print(f"[ray] {name}'s steps: {found['step_cpu_s']:.2f} CPU s per epoch on"
                  f" {found['cores']:.2f} cores; while it trained: {describe_share(shares[name])}",
                  flush=True)

    main = ratios(storage, ["in-process-a", "ray-1-worker", "in-process-b"])
    local, remote = (main["epoch_s_after_first"][k] for k in ("in_process", "ray"))
    local_wall = (wall_a + wall_b) / 2
    ratio, ratio_best = main["steady_state_ratio"], main["steady_state_ratio_best"]
    startup = ray_wall - local_wall
    print(f"[ray] steady-state epoch time Ray / in-process {ratio:.3f} (best epochs"
          f" {ratio_best:.3f}; target <= {TARGET_STEADY_RATIO}); start-up {startup:.1f} s"
          f" over the in-process run (starting the local Ray, {ray_init_s:.1f} s, not"
          " included)", flush=True)
    if spare is not None:
        spare.update(ratios(storage, spare["runs"]))
        print(f"[ray] with a core left to the rest of the host ({spare['threads']} torch"
              f" thread(s) on both sides, as on a GPU node whose spare cores run Ray's"
              f" daemons): steady-state epoch time Ray / in-process"
              f" {spare['steady_state_ratio']:.3f} (best epochs"
              f" {spare['steady_state_ratio_best']:.3f})", flush=True)
    return {
        "case": case.describe(), "epochs": epochs, "cpus_per_worker": cores,
        "in_process": {"wall_s": [wall_a, wall_b], "epoch_s_after_first": local},
        "ray": {"wall_s": ray_wall, "epoch_s_after_first": remote},
        "ray_init_s": ray_init_s,
        "phases": {"in_process": local_phases, "ray": ray_phases, "runs": by_run},
        "worker_imports_s": worker_imports,
        "train_start_up": train_start,
        "inside": seen,
        "cpu_share": shares,
        "steady_state_ratio": ratio, "steady_state_ratio_best": ratio_best,
        "spare_core": spare,
        "startup_s": startup,
        "target_steady_state_ratio": TARGET_STEADY_RATIO,
        "note": "wall times are whole `fgray pretrain` processes (imports, caches warm,"
                " evaluation and checkpoints included); startup_s = Ray wall - in-process wall, the"
                " Ray run joining a local Ray started before it (ray_init_s)",
    }
