# Why one file (over ~450 lines): the plan is one computation read top to bottom -- counts,
# data sizes, throughput, the estimate, what is printed -- each section feeding the next
# and used nowhere else; `--plan` and the plan-versus-actual lines both need all of it.
"""A study's cost plan, before anything runs (`studies/*.py ... --plan`), and the plan beside
what the study cost once it has run.

What runs (`plan_counts`), exactly as `fgray.tune.study` runs it:

- search: per method `trials` search trials of `epochs` epochs, ASHA on their val kNN; the
  best of them retrained with `seeds - 1` more seeds, each to its full budget (never stopped);
  `seeds` test evaluation jobs per method (the best search trial and its retrains);
- compare: per method `seeds` runs of `epochs` epochs, no early stopping, each evaluated;
- the init row(s): one test evaluation per distinct initial weights (`init_targets`).

The ASHA worst case is every search trial running all its epochs. The expected case follows
Ray's ASHA rungs (`asha_rungs`, one bracket): rungs at `grace * rf**k` epochs below the budget;
at each rung a trial goes on when its val kNN is in the top `1/rf` of those recorded there, so
in expectation a fraction `rf**-k` of the trials passes the k-th rung and a trial runs

    r_0 + (r_1 - r_0) / rf + (r_2 - r_1) / rf**2 + ... + (epochs - r_K-1) / rf**K

epochs (`expected_epochs_per_trial`). ASHA promotes the first trials to reach a rung whatever
their score (nothing is recorded there yet), so a real study runs somewhat more than this.

Time comes from a measured throughput (`Throughput`): the training step's seconds per image
of a benchmark JSON (`python benchmarks/run.py`, `--plan-from`: its `memory` rows -- a whole
epoch of the trainer at a preset's settings -- and its `scaling` step), or from a probe of a
few steps of the study's first method in this process on this machine's device. A method
whose backbone (or image size) the figure did not measure is scaled by the ratio of the
backbones' forward FLOPs at the two image sizes (counted with torch's FlopCounterMode).
Every other figure is an assumption the plan prints (`ASSUMPTIONS`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fgray.errors import UserError

# A trial's fixed cost (its wall time less its epochs: process or worker-group start, building
# the model, the first checkpoint), measured by benchmarks/run.py's study benchmark on the
# 2-core CPU machine (docs/performance.md); a benchmark JSON's own `study` figures win.
FIXED_S = {"in_trial": 0.9, "ray_train": 39.0}
# A test evaluation job's fixed cost besides its forward passes (loading the checkpoint and
# the caches, fitting the linear probe): an assumption, not a measurement.
EVAL_FIXED_S = 10.0
# A training image costs two views forward and backward through the encoder (about 3 forward
# passes each) and two forward passes of the key encoder: about 8 forward passes; an
# evaluated image is one forward pass (used when the figure measured no evaluation).
EVAL_SHARE = 1 / 8
# A test evaluation embeds train and test once for retrieval / kNN / the linear probe and
# once more for the localisation maps.
TEST_PASSES = 2
PROBE_CPU_BATCH = 16  # the probe's batch on a CPU (on a GPU: the study's batch)
ASSUMPTIONS = (
    f"per-epoch val kNN: one forward pass over train + val; a forward pass costs "
    f"{EVAL_SHARE:.3f} of a training image unless measured",
    f"test evaluation job: {TEST_PASSES} forward passes over train + test + "
    f"{EVAL_FIXED_S:g} s fixed (assumed)",
    "several workers per trial: ideal scaling (communication not modelled)",
    "wall time: the work spread evenly over the concurrent slots (a measured study ran "
    "1.04-1.26x that, docs/performance.md)",
)


# ---------------------------------------------------------------- counts


def asha_rungs(epochs: int, grace: int, rf: int) -> list[int]:
    """The epochs at which Ray's ASHAScheduler (one bracket, `max_t=epochs`) may stop a trial:
    `grace * rf**k` for k < int(log(epochs / grace) / log(rf) + 1), as Ray's `_Bracket`
    computes them, ascending; rungs at the budget itself stop nothing and are left out."""
    count = int(math.log(epochs / grace) / math.log(rf) + 1)
    return [grace * rf ** k for k in range(count) if grace * rf ** k < epochs]


def expected_epochs_per_trial(epochs: int, grace: int, rf: int) -> float:
    """Epochs a search trial runs in expectation under ASHA (the module docstring)."""
    rungs = asha_rungs(epochs, grace, rf)
    if not rungs:
        return float(epochs)
    total, last = 0.0, 0
    for k, rung in enumerate(rungs):
        total += (rung - last) / rf ** k
        last = rung
    return total + (epochs - last) / rf ** len(rungs)


@dataclass(frozen=True)
class MethodCounts:
    method: str
    backbone: str
    trials: int  # search trials (compare: runs)
    retrains: int  # retrains of the best configuration with more seeds
    evaluations: int  # test evaluation jobs
    trial_epochs_worst: int  # Σ epochs of the search trials, none stopped
    trial_epochs_expected: float  # the same under ASHA, in expectation
    retrain_epochs: int
    stopped_expected: float  # search trials ASHA stops early, in expectation


@dataclass(frozen=True)
class PlanCounts:
    mode: str
    epochs: int
    methods: list[MethodCounts]
    init_rows: list[str]
    rungs: list[int]

    @property
    def trials(self) -> int:
        """Trial rows of the study's methods (search trials and retrains; init rows not)."""
        return sum(m.trials + m.retrains for m in self.methods)

    @property
    def evaluations(self) -> int:
        return sum(m.evaluations for m in self.methods) + len(self.init_rows)

    @property
    def epochs_worst(self) -> int:
        return sum(m.trial_epochs_worst + m.retrain_epochs for m in self.methods)

    @property
    def epochs_expected(self) -> float:
        return sum(m.trial_epochs_expected + m.retrain_epochs for m in self.methods)


def plan_counts(study) -> PlanCounts:
    """What `run_study(study)` runs (the module docstring), per method."""
    from fgray.train.resources import WorkerResources
    from fgray.tune.study import TrialSetup, init_targets, recipe

    setup = TrialSetup(study, WorkerResources())
    rows = []
    search = study.mode == "search"
    rungs = asha_rungs(study.epochs, study.grace_period, study.reduction_factor) if search \
        else []
    per_trial = (expected_epochs_per_trial(study.epochs, study.grace_period,
                                           study.reduction_factor) if search
                 else float(study.epochs))
    for method in study.methods:
        spec = setup.spec_for(recipe(method))
        trials = study.trials if search else study.seeds
        retrains = study.seeds - 1 if search else 0
        rows.append(MethodCounts(
            method=method, backbone=spec.backbone_name, trials=trials, retrains=retrains,
            evaluations=study.seeds, trial_epochs_worst=trials * study.epochs,
            trial_epochs_expected=trials * per_trial, retrain_epochs=retrains * study.epochs,
            stopped_expected=trials * (1 - study.reduction_factor ** -len(rungs))))
    return PlanCounts(mode=study.mode, epochs=study.epochs, methods=rows,
                      init_rows=list(init_targets(study)), rungs=rungs)


# ---------------------------------------------------------------- data sizes


@dataclass(frozen=True)
class Sizes:
    train: int
    val: int
    test: int
    source: str


def data_sizes(study, synthetic: dict[str, Any] | None = None) -> Sizes | None:
    """The split sizes the trials see: read from the dataset when it is on this machine
    (nothing written), else computed for an embedded set not generated yet (`synthetic`: its
    `write_synthetic` arguments); None when neither (e.g. data staged on a cluster only)."""
    from fgray.data.formats import load_dataset

    data = study.data_spec
    if "://" not in data.root and Path(data.root).exists():
        ds = load_dataset(data.format, data.root, val_fraction=data.val_fraction,
                          seed=data.split_seed, aircraft_level=data.aircraft_level)
        return Sizes(len(ds.split("train")), len(ds.split("val")), len(ds.split("test")),
                     f"read from {data.root}")
    if synthetic is None:
        return None
    from fgray.data.splits import val_count
    from fgray.data.synth import train_per_class

    classes, per_class = synthetic["classes"], synthetic["per_class"]
    train = train_per_class(per_class, synthetic.get("train_fraction", 0.5))
    val = val_count(train, data.val_fraction)
    return Sizes(classes * (train - val), classes * val, classes * (per_class - train),
                 f"the embedded set's {classes} classes x {per_class} images (not generated "
                 "yet)")


# ---------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Figure:
    """A measured training throughput: seconds per training image (and per evaluated image
    when measured) of `backbone` at `image_size`, on `device`."""

    backbone: str
    image_size: int
    batch_size: int
    train_s_per_image: float
    device: str
    source: str
    eval_s_per_image: float | None = None


def _arch(backbone: str) -> str:
    return backbone.split(".")[0]


def read_benchmark(path: str) -> tuple[list[Figure], dict[str, float], str]:
    """The throughput figures of a `benchmarks/run.py` JSON (its `memory` rows and its
    `scaling` step), its measured per-trial fixed costs by path (`in_trial`, `ray_train`)
    and the machine it ran on. A file that is not such a JSON is a user error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--plan-from {path}: cannot read a JSON file ({exc})") from None
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benches, dict):
        raise UserError(f"--plan-from {path}: not a benchmarks/run.py result (no "
                        "'benchmarks' object)")
    hw = data.get("hardware") or {}
    machine = hw.get("gpu") or hw.get("cpu_model") or "unknown machine"
    figures = []
    for row in (benches.get("memory") or {}).get("presets") or []:
        case = row.get("case") or {}
        if row.get("images_per_s"):
            figures.append(Figure(
                case["backbone"], int(case["image_size"]), int(case["batch_size"]),
                1.0 / float(row["images_per_s"]), str(row.get("device", "?")),
                f"{path}: memory '{case.get('name')}' (a whole epoch of the trainer, "
                f"{case['method']} {case['backbone']} {case['image_size']} px batch "
                f"{case['batch_size']}, {row.get('precision', '?')}: "
                f"{float(row['images_per_s']):.0f} img/s on {machine})"))
    scaling = benches.get("scaling") or {}
    if isinstance(scaling.get("step"), dict) and scaling.get("case"):
        case, step = scaling["case"], scaling["step"]
        figures.append(Figure(
            case["backbone"], int(case["image_size"]), int(case["batch_size"]),
            float(step["step"]) / int(case["batch_size"]), str(scaling.get("device", "?")),
            f"{path}: scaling step ({case['method']} {case['backbone']} "
            f"{case['image_size']} px batch {case['batch_size']}, {step.get('precision', '?')}"
            f": {1000 * float(step['step']):.1f} ms/step, forward + backward + optimiser "
            f"without augmentation, on {machine})"))
    fixed = {}
    for side in (benches.get("study") or {}).values():
        if isinstance(side, dict) and math.isfinite(float(side.get("fixed_s_median", "nan"))):
            fixed["in_trial" if side.get("workers") == 0 else "ray_train"] = float(
                side["fixed_s_median"])
    if not figures:
        raise UserError(f"--plan-from {path}: no training throughput in it (expected its "
                        "'memory' or 'scaling' benchmark: python benchmarks/run.py --only "
                        "memory,scaling)")
    return figures, fixed, machine


_FLOPS: dict[tuple[str, int], float] = {}


def forward_flops(backbone: str, image_size: int) -> float:
    """Forward FLOPs of one image through `backbone` (random weights) at `image_size`."""
    key = (_arch(backbone), image_size)
    if key not in _FLOPS:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from fgray.models.backbone import create_backbone

        net = create_backbone(key[0], init="random", img_size=image_size).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(torch.zeros(1, 3, image_size, image_size))
        _FLOPS[key] = float(counter.get_total_flops())
    return _FLOPS[key]


@dataclass(frozen=True)
class Throughput:
    """Per method: seconds per training image and per evaluated image, and how each was
    obtained."""

    train_s: dict[str, float]
    eval_s: dict[str, float]
    how: dict[str, str]
    figures: dict[str, Figure]  # per method, the figure used


def throughput(counts: PlanCounts, figures: list[Figure], image_size: int) -> Throughput:
    """Each method's figure: the slowest of those that measured its backbone at its image
    size (a benchmark's whole-epoch figure includes augmentation and the first steps; its
    step figure neither), else the first figure scaled by the forward FLOPs ratio."""
    train, evals, how = {}, {}, {}
    used: dict[str, Figure] = {}
    for m in counts.methods:
        same = [f for f in figures if _arch(f.backbone) == _arch(m.backbone)
                and f.image_size == image_size]
        if same:
            fig = max(same, key=lambda f: f.train_s_per_image)
            scale, note = 1.0, "measured"
        else:  # the nearest figure: the same backbone at another size, else the same size
            fig = min(figures, key=lambda f: (_arch(f.backbone) != _arch(m.backbone),
                                              f.image_size != image_size))
            scale = forward_flops(m.backbone, image_size) / forward_flops(fig.backbone,
                                                                          fig.image_size)
            note = (f"scaled x{scale:.2f} from {_arch(fig.backbone)} at {fig.image_size} px "
                    f"by forward FLOPs")
        train[m.method] = fig.train_s_per_image * scale
        evals[m.method] = (fig.eval_s_per_image * scale if fig.eval_s_per_image is not None
                           else train[m.method] * EVAL_SHARE)
        how[m.method] = note
        used[m.method] = fig
    return Throughput(train, evals, how, used)


def probe(study, method: str, device) -> Figure:
    """A few training steps and val kNN evaluations of `method` with the study's settings,
    here on `device`, on random images (random weights: only the speed is measured). On a
    CPU at batch min(batch, 16) and with a trial's torch threads
    (`WorkerResources.torch_threads`; this process's own count is put back after); the best
    of two timed steps after a warm-up."""
    import numpy as np
    import torch

    from fgray.data.cache import CachedSplit
    from fgray.engine.loop import Pretrainer
    from fgray.methods import build_method
    from fgray.train.resources import WorkerResources
    from fgray.tune.study import TrialSetup, recipe

    spec = TrialSetup(study, WorkerResources()).spec_for(recipe(method))
    batch = spec.train.batch_size if device.type == "cuda" else min(spec.train.batch_size,
                                                                    PROBE_CPU_BATCH)
    cfg = replace(spec.train, batch_size=batch, epochs=3, knn_k=min(spec.train.knn_k, batch))
    rng = np.random.default_rng(0)
    size = cfg.decoded_size

    def split(n: int) -> CachedSplit:
        return CachedSplit(images=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
                           labels=np.arange(n) % 2, image_ids=np.arange(n),
                           boxes=np.full((n, 4), np.nan, np.float32), parts=None,
                           num_classes=2, path=Path("probe"))

    # A trial on CPUs trains with one torch thread per CPU it holds, not with this process's
    # count (all cores): on the 2-core CPU host, lite0 at 96 px took 571 ms a step at 2
    # threads and 790 ms at a trial's 1.
    own_threads = torch.get_num_threads()
    trial = WorkerResources(cpus_per_worker=study.cpus_per_worker or 1.0)
    threads = trial.torch_threads if device.type == "cpu" else own_threads
    torch.manual_seed(0)
    net = build_method(spec.method, backbone=spec.backbone, init="random",
                       image_size=cfg.image_size, config=spec.method_config)
    trainer = Pretrainer(net, split(batch), split(batch), cfg, spec.optim, spec.augment,
                         device=device)
    steps, evals = [], []
    torch.set_num_threads(threads)
    try:
        for _ in range(3):  # one step per epoch; the first warms up kernels and allocators
            steps.append(trainer.train_epoch()["epoch_time_s"])
            trainer.epoch += 1
            began = time.perf_counter()
            trainer.evaluate()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            evals.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(own_threads)
    step, evaluation = min(steps[1:]), min(evals[1:])
    on = f"{threads} thread(s) of " if device.type == "cpu" else ""
    return Figure(spec.backbone_name, cfg.image_size, batch, step / batch, str(device),
                  f"probe: {method} {spec.backbone_name} {cfg.image_size} px batch {batch} "
                  f"on {on}this machine's {device} ({1000 * step:.0f} ms/step, "
                  f"{batch / step:.1f} img/s; random weights and images)",
                  eval_s_per_image=evaluation / (2 * batch))


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    trial_s_worst: float  # Σ search trials + retrains, compute + fixed cost
    trial_s_expected: float
    evaluation_s: float  # Σ test evaluation jobs
    fixed_s: float  # the per-trial fixed cost used
    fixed_source: str
    concurrency: int
    concurrency_source: str
    devices_per_trial: float  # GPUs (or CPUs) a trial holds
    unit: str  # "GPU" or "CPU"

    def wall_s(self, worst: bool) -> float:
        work = (self.trial_s_worst if worst else self.trial_s_expected) + self.evaluation_s
        return work / self.concurrency

    def device_hours(self, worst: bool) -> float:
        work = (self.trial_s_worst if worst else self.trial_s_expected) + self.evaluation_s
        return work * self.devices_per_trial / 3600


def uses_gpu(study, gpu_machine: bool) -> bool:
    """Whether the study's trials hold GPUs: `--gpus-per-worker` when given, else (as
    `resolve_resources` decides) whether the machine has them."""
    if study.gpus_per_worker is not None:
        return study.gpus_per_worker > 0
    return gpu_machine


def estimate(study, counts: PlanCounts, sizes: Sizes, speed: Throughput, *, gpu: bool,
             fixed: dict[str, float], local_slots: int) -> Estimate:
    """Seconds of trials (worst and expected) and of test evaluations, from `speed`."""
    workers = max(study.workers, 1)
    path = "in_trial" if study.workers == 0 else "ray_train"
    fixed_s = fixed.get(path, FIXED_S[path])
    fixed_source = ("measured by the benchmark JSON's study benchmark" if path in fixed
                    else f"assumed: the {'--workers 0' if path == 'in_trial' else 'Ray Train'}"
                         f" trial's fixed cost measured on CPU (docs/performance.md)")
    steps = sizes.train // study.batch_size  # the loader drops the last partial batch
    worst = expected = evaluation = 0.0
    for m in counts.methods:
        # The workers share the steps; rank 0 alone runs the val kNN.
        epoch_s = (steps * study.batch_size * speed.train_s[m.method] / workers
                   + (sizes.train + sizes.val) * speed.eval_s[m.method])
        n = m.trials + m.retrains
        worst += (m.trial_epochs_worst + m.retrain_epochs) * epoch_s + n * fixed_s
        expected += (m.trial_epochs_expected + m.retrain_epochs) * epoch_s + n * fixed_s
        evaluation += m.evaluations * (
            TEST_PASSES * (sizes.train + sizes.test) * speed.eval_s[m.method] + EVAL_FIXED_S)
    first = counts.methods[0].method
    evaluation += len(counts.init_rows) * (
        TEST_PASSES * (sizes.train + sizes.test) * speed.eval_s[first] + EVAL_FIXED_S)
    share = (study.gpus_per_worker if study.gpus_per_worker is not None else 1.0) if gpu \
        else (study.cpus_per_worker or 1.0)
    if study.concurrency is not None:
        slots, slots_source = study.concurrency, "--concurrency"
    else:
        slots = max(int(local_slots / (share * workers)), 1)
        slots_source = (f"what this machine fits: {local_slots} {'GPU' if gpu else 'CPU'}(s) "
                        f"/ {share * workers:g} per trial (pass --concurrency for a cluster)")
    return Estimate(worst, expected, evaluation, fixed_s, fixed_source, slots, slots_source,
                    share * workers, "GPU" if gpu else "CPU")


# ---------------------------------------------------------------- what is printed


def _hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(study, counts: PlanCounts, sizes: Sizes | None, speed: Throughput | None,
               est: Estimate | None) -> list[str]:
    search = counts.mode == "search"
    how = ("--workers 0 (in the trial process)" if study.workers == 0
           else f"{study.workers} Ray Train worker(s) per trial")
    out = [f"plan of study {study.name} ({counts.mode}): {len(counts.methods)} method(s) x "
           f"{counts.methods[0].trials} {'trials' if search else 'seeds'} x {counts.epochs} "
           f"epochs, batch {study.batch_size}, {study.image_size} px, {how}"]
    for m in counts.methods:
        line = (f"  {m.method:<8} {m.backbone}: {m.trials} {'search trials' if search else 'runs'}"
                f" ({m.trial_epochs_worst} epochs worst")
        if search:
            line += (f", {m.trial_epochs_expected:.0f} expected, ~{m.stopped_expected:.1f} "
                     f"stopped early")
        line += f"), {m.retrains} retrain(s) ({m.retrain_epochs} epochs), " \
                f"{m.evaluations} test evaluation(s)"
        if speed is not None:
            line += f"; {1 / speed.train_s[m.method]:.1f} img/s ({speed.how[m.method]})"
        out.append(line)
    out.append(f"  init row(s): {', '.join(counts.init_rows)} ({len(counts.init_rows)} test "
               "evaluation(s))")
    if search:
        rungs = ", ".join(map(str, counts.rungs)) or "none below the budget"
        out.append(f"  ASHA (grace {study.grace_period}, reduction factor "
                   f"{study.reduction_factor}): rungs at epoch {rungs}")
    out.append(f"  total: {counts.trials} trials, {counts.evaluations} test evaluation jobs; "
               f"epochs {counts.epochs_worst} worst case (every trial runs all epochs), "
               f"{counts.epochs_expected:.0f} expected")
    if sizes is None:
        out.append("  time: no estimate (the dataset is not on this machine to count its "
                   "images)")
        return out
    steps = sizes.train // study.batch_size
    out.append(f"  data: {sizes.train} train / {sizes.val} val / {sizes.test} test images "
               f"({sizes.source}); {steps} steps per epoch")
    if speed is None or est is None:
        return out
    for fig in dict.fromkeys(speed.figures.values()):
        users = ", ".join(m for m, f in speed.figures.items() if f == fig)
        out.append(f"  throughput ({users}): {fig.source}")
    out.append(f"  per-trial fixed cost: {est.fixed_s:g} s ({est.fixed_source})")
    out.append(f"  concurrency: {est.concurrency} trial(s) at a time ({est.concurrency_source})")
    for label, worst in (("worst case", True), ("expected", False)):
        out.append(f"  {label}: wall {_hours(est.wall_s(worst))}, "
                   f"{est.device_hours(worst):.1f} {est.unit}-hours "
                   f"(trials {_hours(est.trial_s_worst if worst else est.trial_s_expected)} "
                   f"+ test evaluations {_hours(est.evaluation_s)} of work)")
    out += [f"  assumed: {a}" for a in ASSUMPTIONS]
    return out


def actual_epochs(study_dir: str, methods: list[str]) -> int:
    """Epochs the study's trials of `methods` recorded (one per trial and epoch)."""
    from fgray.results.tables import load

    rows = load(study_dir, "epochs").to_pylist()
    return len({(r["trial_id"], r["epoch"]) for r in rows if r.get("method") in methods})


def versus_lines(counts: PlanCounts, est: Estimate | None, summary, epochs: int) -> list[str]:
    """The plan beside what the study cost (`StudySummary`, the epochs it recorded)."""
    out = [f"plan vs actual: trials {counts.trials} planned / {summary.trials} run "
           f"({summary.stopped} stopped early, {summary.failed} failed); epochs "
           f"{counts.epochs_worst} worst / {counts.epochs_expected:.0f} expected / {epochs} "
           f"run"]
    if est is not None:
        out.append(f"plan vs actual: wall {_hours(est.wall_s(True))} worst / "
                   f"{_hours(est.wall_s(False))} expected at {est.concurrency} at a time / "
                   f"{_hours(summary.wall_time_s)} run at {summary.concurrency} at a time; "
                   f"trial time {_hours(est.trial_s_expected)} expected / "
                   f"{_hours(summary.trial_time_s)} run")
    return out


@dataclass(frozen=True)
class Plan:
    counts: PlanCounts
    estimate: Estimate | None
    lines: list[str]


def make_plan(study, *, plan_from: str | None = None, synthetic: dict[str, Any] | None = None,
              probe_mismatch: bool = True) -> Plan:
    """The plan of `study`: counts always; time from `plan_from` (a benchmark JSON), else from
    a probe of its first method on this machine's device. `probe_mismatch=False` skips the
    probe when the trials hold a device this machine lacks (a cluster's driver). Starts no
    Ray and writes nothing."""
    import os

    import torch

    counts = plan_counts(study)
    sizes = data_sizes(study, synthetic)
    speed = est = None
    notes: list[str] = []
    if plan_from:
        figures, fixed, _ = read_benchmark(plan_from)
        data = json.loads(Path(plan_from).read_text())
        hw = data.get("hardware") or {}
        gpu_machine = bool(hw.get("cuda"))
        local = int(hw.get("gpu_count") or 1) if gpu_machine else int(hw.get("cpus") or 1)
    else:
        fixed = {}
        gpu_machine = torch.cuda.is_available()
        local = torch.cuda.device_count() if gpu_machine else (os.cpu_count() or 1)
        figures = []
    gpu = uses_gpu(study, gpu_machine)
    if sizes is not None and not plan_from:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if gpu != (device.type == "cuda"):
            notes.append(f"  note: the probe ran on this machine's {device}, the trials run on "
                         f"{'GPUs' if gpu else 'CPUs'}: pass --plan-from a benchmark JSON "
                         "measured there")
        if probe_mismatch or gpu == (device.type == "cuda"):
            figures = [probe(study, counts.methods[0].method, device)]
    if sizes is not None and figures:
        speed = throughput(counts, figures, study.image_size)
        est = estimate(study, counts, sizes, speed, gpu=gpu, fixed=fixed, local_slots=local)
    return Plan(counts, est, plan_lines(study, counts, sizes, speed, est) + notes)
