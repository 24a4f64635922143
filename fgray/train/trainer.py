"""Ray Train: the engine's pretraining loop in a `TorchTrainer`, one report per epoch -- or,
with `--workers 0`, the same loop inside a Ray Tune trial's own process.

`worker_loop` is the one loop for both. It talks to Ray through a small session object
(`TrainSession` inside a TorchTrainer worker, `TuneSession` inside a Tune trial): rank,
world size, device, the checkpoint to resume from, and the per-epoch report with its
checkpoint folder. Everything else -- the engine's Pretrainer, the per-epoch metrics, the
best-so-far selection metric, the checkpoint's `splits.json` and `metrics.json`, the
per-epoch hooks, TensorBoard visuals, how deterministic failures end a run -- is shared.


Each worker builds the same `Pretrainer` as an in-process run (`fgray.engine.run`), with its
rank and world size from `ray.train.get_context()` and its device from
`ray.train.torch.get_device()`; Ray's TorchConfig has already initialised torch.distributed
(gloo on CPU, nccl on GPU), so the engine wraps the method in DDP itself (SyncBN or shuffle-BN
as the method declares) and `CachedBatches` shards a per-epoch permutation of the cached split
across ranks. `prepare_model` is not used: the engine owns the DDP wrapping.

After every epoch each rank calls `ray.train.report` once: rank 0 with its metrics (val kNN
included: only rank 0 evaluates) and the epoch's checkpoint folder the Pretrainer wrote, the
others with their metrics only; when the run is recorded (a recorder is given), rank 0 also
writes the epoch's spatial maps and image pairs to the trial's TensorBoard run itself. A
`CheckpointConfig` keeps the best k checkpoints by val_knn_top1 plus the latest;
`FailureConfig(max_failures)` restarts the worker group from the latest checkpoint when a
worker dies, and a run of the same (storage, name) resumes.

Per-epoch hooks (`epoch_hooks` of `build_trainer`, `run_in_trial` and `ray_pretrain`): every
rank calls each hook after training an epoch, once the epoch's checkpoint is written and before
the epoch is reported, as `hook(epoch, rank, run_uri, metrics)` (`metrics`: a copy of what the
rank is about to report). A hook is given as a callable (picklable: Ray ships it to the
workers), as a string `package.module:name` that each worker imports, or as a mapping
`{"hook": "package.module:name", "kwargs": {...}}` (JSON, as a stored study holds it), called
with those keyword arguments too. Custom logging and alerts use them, and the tests inject
faults with them (`tests/faults.py`). A hook that raises fails the worker as training would:
the group restarts from the latest checkpoint; one that cannot be imported is a user error.

Deterministic failures (a non-finite loss, a user error such as a batch larger than the
split) are not retried: every rank hits them at the same point, so the workers stop cleanly
and rank 0 leaves `fgray_error.json` in the run folder; `run_trainer` raises it again in the
caller.

Layout of a run folder `STORAGE/NAME/`: Ray's checkpoint-manager state, `epoch-XXXX/`
(checkpoint.pt, splits.json and metrics.json) for the kept epochs, `ranks/epoch-XXXX.json`
(every rank's metrics of the epoch: a straggler or a diverging replica shows there) and, on a
deterministic failure, `fgray_error.json`.

`--workers 0` (`run_in_trial`): no worker group and no TorchTrainer. The Tune trial runs the
loop itself on the trial's CPU (or GPU share) and reports with `ray.tune.report`; its run
folder `STORAGE/NAME/` has the same layout as a Train run's (`epoch-XXXX/` with the same
keep policy, `ranks/`, `fgray_error.json`), and a trial that Tune's `FailureConfig` restarts
after a crash, or a restored study restarts, resumes from its latest kept checkpoint. Each
epoch is recorded (epochs table, TensorBoard) before it is reported, which is where the Train
controller's `RecordEpochs` records it on the other path.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer

from fgray.engine.loop import CHECKPOINT_FILE
from fgray.engine.selection import BEST_METRIC, SELECTION_METRIC, Best, best_of, ranked
from fgray.engine.spec import RunSpec
from fgray.errors import UserError
from fgray.results.records import (
    EPOCH_END,
    NODE_ID,
    RESTORED_KEY,
    SESSION_START,
    EpochRecorder,
    format_epoch,
    trial_history,
    write_visuals,
)
from fgray.storage import (
    absolute,
    delete_file,
    join,
    move_tree,
    read_json,
    resolve,
    scratch_folder,
    write_json,
)
from fgray.train.cluster import ray_storage

ERROR_FILE = "fgray_error.json"
RANKS_DIR = "ranks"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.json"  # the epoch's report, next to its checkpoint
DRIVER_MEMORY = 256 * 2**20  # what a Train-driving trial reserves: it needs no CPU
# Deterministic: every rank raises them at the same step, so retrying cannot help.
_NOT_RETRIED = {"FloatingPointError": FloatingPointError, "UserError": UserError}


@dataclass(frozen=True)
class WorkerResources:
    """What one trial asks for: `workers` Ray Train ranks, each with these CPUs and GPUs, or
    with `workers=0` the trial's own process with one worker's share (no worker group)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: expected 0 (the engine loop in the "
                            "trial's own process) or more Ray Train workers")
        if self.cpus_per_worker <= 0:
            raise UserError(f"--cpus-per-worker {self.cpus_per_worker}: expected more than 0")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker}: expected 0 or more")
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker} with {self.workers} "
                            "workers: NCCL needs a whole GPU per rank; share GPUs between "
                            "single-worker trials instead")

    @property
    def in_trial(self) -> bool:
        """`--workers 0`: the loop runs in the Tune trial itself, no Ray Train."""
        return self.workers == 0

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def cpus(self) -> float:
        return max(self.workers, 1) * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return max(self.workers, 1) * self.gpus_per_worker

    def trial_resources(self) -> dict[str, float]:
        """What the Tune trial itself reserves: one worker's share when it runs the loop
        (`--workers 0`); otherwise nothing but a little memory, as it only drives its
        Train run, whose workers hold the CPUs and GPUs."""
        if self.in_trial:
            out = {"cpu": self.cpus_per_worker}
            if self.use_gpu:
                out["gpu"] = self.gpus_per_worker
            return out
        return {"cpu": 0, "memory": DRIVER_MEMORY}

    def device(self):
        """The trial's device with `--workers 0`: Ray sets CUDA_VISIBLE_DEVICES to the
        trial's GPU share, which is then `cuda:0`."""
        use_cuda = self.use_gpu and torch.cuda.is_available()
        return torch.device("cuda", 0) if use_cuda else torch.device("cpu")

    def scaling_config(self) -> ScalingConfig:
        per_worker = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            per_worker["GPU"] = self.gpus_per_worker
        return ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu,
                             resources_per_worker=per_worker)

    def torch_config(self) -> TorchConfig:
        return TorchConfig(backend="nccl" if self.use_gpu else "gloo")


def resolve_resources(workers: int, *, cpus_per_worker: float | None = None,
                      gpus_per_worker: float | None = None,
                      cluster_gpus: float | None = None) -> WorkerResources:
    """Fill unset per-worker resources: one CPU each, and one GPU each when the cluster has
    GPUs (`cluster_gpus`, read from the connected cluster when not given)."""
    if gpus_per_worker is None:
        if cluster_gpus is None:
            from fgray.train.cluster import ClusterResources

            cluster_gpus = ClusterResources.current().gpus
        gpus_per_worker = 1.0 if cluster_gpus >= 1 else 0.0
    return WorkerResources(workers=workers, cpus_per_worker=cpus_per_worker or 1.0,
                           gpus_per_worker=gpus_per_worker)



# ---------------------------------------------------------------- epoch hooks

# hook(epoch, rank, run_uri, metrics), called on every rank after each training epoch.
EpochHook = Callable[[int, int, str, Mapping[str, Any]], None]
# A hook as `build_trainer` takes it: the callable, "package.module:name", or
# {"hook": "package.module:name", "kwargs": {...}} (module docstring).
EpochHookSpec = EpochHook | str | Mapping[str, Any]


def _hook_target(spec: EpochHookSpec) -> tuple[str, str, dict[str, Any]] | None:
    """(module, attribute, keyword arguments) of a hook spec given by name; None for a
    callable; a malformed spec is a UserError."""
    if callable(spec):
        return None
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("hook"), str) \
            and set(spec) <= {"hook", "kwargs"} and isinstance(spec.get("kwargs", {}), Mapping):
        name, kwargs = spec["hook"], dict(spec.get("kwargs", {}))
    else:
        raise UserError(f"epoch hook {spec!r}: expected a callable, 'package.module:name' or "
                        "{'hook': 'package.module:name', 'kwargs': {...}}")
    module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not module or not attr:
        raise UserError(f"epoch hook {name!r}: expected 'package.module:name'")
    return module, attr, kwargs


def check_epoch_hooks(specs: Sequence[EpochHookSpec]) -> tuple[EpochHookSpec, ...]:
    """`specs` checked for their form (not imported: the workers import them)."""
    specs = tuple(specs or ())
    for spec in specs:
        _hook_target(spec)
    return specs


def load_epoch_hook(spec: EpochHookSpec) -> EpochHook:
    """The callable a hook spec names (imported here); a name that does not import or is
    not callable is a UserError."""
    target_of = _hook_target(spec)
    if target_of is None:
        return spec  # type: ignore[return-value]
    module, attr, kwargs = target_of
    name = f"{module}:{attr}"
    try:
        target: Any = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"epoch hook {name!r}: cannot import it ({exc}); expected an "
                        "importable 'package.module:name' on every worker") from None
    if not callable(target):
        raise UserError(f"epoch hook {name!r}: not callable")
    if not kwargs:
        return target

    def hook(epoch: int, rank: int, run_uri: str, metrics: Mapping[str, Any]) -> None:
        target(epoch, rank, run_uri, metrics, **kwargs)

    return hook


# ---------------------------------------------------------------- worker side


def _param_checksum(module: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal on all ranks when DDP keeps them in sync."""
    with torch.no_grad():
        sums = [p.detach().double().sum() for p in module.parameters()]
        return float(torch.stack(sums).sum().item()) if sums else 0.0


class TrainSession:
    """`worker_loop`'s view of Ray inside a TorchTrainer worker (`ray.train`)."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def get_checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        checkpoint = (ray.train.Checkpoint.from_directory(str(checkpoint_dir))
                      if checkpoint_dir is not None else None)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=checkpoint is not None)

    def failed(self, exc: Exception, run_uri: str) -> None:
        """A deterministic failure: every rank stops cleanly (a worker-group restart would
        only fail again) and rank 0 leaves the error for `run_trainer` to raise."""
        if self.rank == 0:
            write_json(join(run_uri, ERROR_FILE), {"type": type(exc).__name__,
                                                   "message": str(exc)})


class TuneSession:
    """`worker_loop`'s view of Ray inside a Tune trial (`--workers 0`, `ray.tune`): one rank.

    `report` records the epoch (epochs table, TensorBoard, `ranks/`: what the Train
    controller's `RecordEpochs` does on the other path), keeps its checkpoint in the run
    folder as a Train run does (`epoch-XXXX/`, the best `keep_best` by val kNN top-1 plus the
    latest), then reports the metrics to Tune. The checkpoints stay out of Tune's hands: a
    restored experiment's snapshot may name a checkpoint Tune has since deleted, and Tune then
    fails the trial before it runs; the trial instead resumes from the latest checkpoint its
    folder holds (`get_checkpoint`), after a crash or a restore alike."""

    rank, world = 0, 1

    def __init__(self, device: torch.device, run_uri: str, recorder: EpochRecorder | None = None,
                 keep_best: int = 2, echo: bool = False) -> None:
        self.device = device
        self.run_uri = run_uri
        self.recorder = recorder
        self.keep_best = keep_best
        self.echo = echo

    def get_checkpoint(self):
        kept = kept_checkpoints(self.run_uri)
        if not kept:
            return None
        latest = max(kept, key=lambda k: k[1].get("epoch", 0))
        fs, path = resolve(join(self.run_uri, latest[0]))
        return ray.train.Checkpoint(path, filesystem=fs)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str) -> None:
        record_epoch(self.run_uri, [metrics], self.recorder, self.echo)
        if checkpoint_dir is not None:
            # Whole or not at all for a reader; metrics.json, which marks a kept
            # checkpoint, goes last on an object store.
            move_tree(checkpoint_dir, join(self.run_uri, name), last=METRICS_FILE)
            self._prune(name)
        ray.tune.report(metrics)

    def _prune(self, latest: str) -> None:
        kept = _by_epoch(kept_checkpoints(self.run_uri))
        best = ranked(kept, row=lambda k: k[1])[:self.keep_best]  # the earlier of a tie
        keep = {name for name, _ in best} | {latest}
        fs, root = resolve(self.run_uri)
        for name, _ in kept:
            if name not in keep:
                fs.delete_dir(f"{root}/{name}")

    def failed(self, exc: Exception, run_uri: str) -> None:
        """A deterministic failure fails the trial; the error file makes a retry by Tune's
        FailureConfig fail again at once instead of training up to the same point."""
        write_json(join(run_uri, ERROR_FILE), {"type": type(exc).__name__,
                                               "message": str(exc)})
        raise exc


def _by_epoch(kept: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return sorted(kept, key=lambda k: int(k[1].get("epoch", 0)))


def kept_checkpoints(run_uri: str) -> list[tuple[str, dict[str, Any]]]:
    """The complete checkpoints of a run folder: (folder name, the epoch's metrics) of each
    sub-folder holding `checkpoint.pt` and `metrics.json`."""
    import pyarrow.fs as pafs

    fs, root = resolve(run_uri)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or info.base_name.endswith(".tmp"):
            continue
        metrics = read_json(join(run_uri, info.base_name, METRICS_FILE))
        if metrics is not None and fs.get_file_info(
                f"{info.path}/{CHECKPOINT_FILE}").type == pafs.FileType.File:
            out.append((info.base_name, metrics))
    return out


def worker_loop(config: dict[str, Any], session: TrainSession | TuneSession | None = None
                ) -> None:
    """The engine loop of one rank: the function every Ray Train worker runs
    (`train_loop_per_worker`, session None: `TrainSession`), and with `--workers 0` what a
    Tune trial runs itself (`TuneSession`)."""
    from fgray.engine.run import build_pretrainer

    session = session or TrainSession()
    spec = RunSpec.from_dict(config["spec"])
    rank, world, device = session.rank, session.world, session.device
    # Worker-local scratch for the Pretrainer's files; what must last is reported to storage.
    scratch = scratch_folder("worker")
    best = Best()  # the best val kNN top-1 so far, restored history included
    clock = {"last": time.perf_counter()}
    started = time.time()  # this process's running segment (`fgray.results.records.running_time`)
    restored_history: list[list[dict[str, Any]]] = []  # rank 0's, sent with its next report
    hooks: list[EpochHook] = []
    node_id = ray.get_runtime_context().get_node_id()

    def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        epoch = int(metrics["epoch"])
        report = dict(metrics)  # the Pretrainer keeps `metrics` in its history
        now = time.perf_counter()
        # Everything of the epoch: training, val kNN, visuals, the checkpoint (a trial's
        # time outside its epochs is its fixed cost: start-up, data, model, reporting).
        report["epoch_wall_s"] = now - clock["last"]
        report[SESSION_START], report[EPOCH_END] = started, time.time()
        report["param_checksum"] = _param_checksum(trainer.method)
        report[NODE_ID] = node_id  # where the epoch ran: the trials table shows the placement
        best.update(report)
        if best.value is not None:
            report[BEST_METRIC] = best.value
        if checkpoint_dir is not None:
            splits = scratch / SPLITS_FILE
            if splits.is_file():  # which images were train / val, next to the weights
                shutil.copy2(splits, checkpoint_dir / SPLITS_FILE)
            # The epoch's metrics next to its weights: which kept checkpoint is the best can
            # be read without loading any (`best_checkpoint_dir`).
            (checkpoint_dir / METRICS_FILE).write_text(json.dumps(report, default=str))
        for hook in hooks:
            hook(epoch, rank, config["run_uri"], dict(report))
        if restored_history:  # the first report after a resume: the recorder fills any gap
            report[RESTORED_KEY] = restored_history.pop()
        session.report(report, checkpoint_dir, f"epoch-{epoch:04d}")
        clock["last"] = time.perf_counter()  # reporting is the trial's overhead, not the epoch's

    # Rank 0 writes the epoch's images itself (tensors are too big for a Ray report) into
    # the trial's TensorBoard run, as an event file of its own next to the controller's.
    board = config.get("tensorboard")
    writers: list[Any] = []

    def on_visuals(epoch: int, images, maps, pairs) -> None:
        from fgray.results.tensorboard import TrialWriter

        if not maps and not pairs:
            return
        if not writers:
            writers.append(TrialWriter(board["study_dir"], board["run"]))
        write_visuals(writers[0], epoch, images, maps, pairs)

    try:
        hooks.extend(load_epoch_hook(h) for h in config.get("epoch_hooks") or ())
        trainer = build_pretrainer(spec, device=device, rank=rank, world_size=world,
                                   run_dir=scratch, on_epoch=on_epoch,
                                   on_visuals=on_visuals if board else None, progress=False)
        restored = session.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as folder:
                trainer.resume(Path(folder) / CHECKPOINT_FILE)
                saved = Path(folder) / METRICS_FILE
                last = json.loads(saved.read_text()) if saved.is_file() else None
            if rank == 0 and trainer.history:
                restored_history.append(_restored(trainer.history, last))
        for row in trainer.history:
            best.update(row)
        clock["last"] = time.perf_counter()
        if restored is not None and trainer.history and trainer.epoch >= spec.train.epochs:
            # Resumed at its end: nothing left to train, but the last epoch's row may be the one
            # a crash lost after its checkpoint. Every rank reports that epoch again (no
            # checkpoint); the recorder writes only what the tables lack.
            replay = dict(trainer.history[-1])
            if restored_history:
                replay = dict(restored_history[0][-1])
                replay[RESTORED_KEY] = restored_history.pop()
            session.report(replay, None, f"epoch-{trainer.epoch:04d}")
        trainer.run()
    except tuple(_NOT_RETRIED.values()) as exc:
        session.failed(exc, config["run_uri"])
    finally:
        for writer in writers:
            writer.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _restored(history: list[dict[str, Any]], last: dict[str, Any] | None
              ) -> list[dict[str, Any]]:
    """A resumed run's history as its reports had it: the checkpoint's own epoch (the one a
    crash between checkpoint and row can lose) from its `metrics.json`, with the worker's
    per-epoch extras (epoch_wall_s, the clocks, ...)."""
    rows = [dict(row) for row in history]
    if last is not None and rows and int(last.get("epoch", -1)) == int(rows[-1]["epoch"]):
        rows[-1] = {**rows[-1], **last}
        rows[-1].pop(RESTORED_KEY, None)
    return rows


def run_in_trial(spec: RunSpec, *, run_uri: str, resources: WorkerResources,
                 recorder: EpochRecorder | None = None, keep_best: int = 2,
                 echo: bool = False, epoch_hooks: Sequence[EpochHookSpec] = ()) -> None:
    """`--workers 0`: the engine loop in this Tune trial's process, reporting to Tune, with
    `run_uri` (STORAGE/NAME, as a Train run's folder) for `ranks/` and the error file, and
    `epoch_hooks` after each epoch (module docstring).

    A retry of a trial that failed deterministically (Tune's FailureConfig cannot tell it from
    a crash) raises the recorded error again at once."""
    epoch_hooks = check_epoch_hooks(epoch_hooks)
    failure = read_json(join(run_uri, ERROR_FILE))
    if failure is not None:
        raise _NOT_RETRIED.get(failure.get("type"), RuntimeError)(failure.get("message", ""))
    # The trial's CPU share as torch threads (a reused actor keeps whatever was set before).
    torch.set_num_threads(max(1, int(resources.cpus_per_worker)))
    session = TuneSession(resources.device(), run_uri, recorder, keep_best, echo)
    board = None if recorder is None else {"study_dir": recorder.study_dir,
                                           "run": recorder.run_name}
    try:
        worker_loop({"spec": spec.to_dict(), "run_uri": run_uri, "tensorboard": board,
                     "epoch_hooks": list(epoch_hooks)}, session)
    finally:
        if recorder is not None:
            recorder.close()


# ---------------------------------------------------------------- controller side


class RecordEpochs(UserCallback):
    """Runs on the Train controller after every consolidated report (all ranks reported, the
    checkpoint registered): records rank 0's metrics once per epoch, however often workers
    restart, and keeps every rank's metrics under `ranks/`."""

    def __init__(self, run_uri: str, recorder: EpochRecorder | None = None,
                 echo: bool = False) -> None:
        self.run_uri = run_uri
        self.recorder = recorder
        self.echo = echo

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        record_epoch(self.run_uri, metrics, self.recorder, self.echo)


def record_epoch(run_uri: str | None, metrics: list[dict[str, Any]],
                 recorder: EpochRecorder | None = None, echo: bool = False) -> None:
    """Record one epoch, reported by every rank (`metrics[r]` is rank r's): every rank's
    metrics under `run_uri/ranks/`, rank 0's in the tables and TensorBoard (`recorder`).

    The first report after a resume carries the restored history (`RESTORED_KEY`, removed
    from the reports here, so later callbacks and Tune never see it): its epochs missing from
    the epochs table are recorded first, once. A report of an epoch that history holds (a run
    resumed at its end reports its last epoch again) records nothing else."""
    lead = metrics[0]
    restored = lead.pop(RESTORED_KEY, None)
    for report in metrics[1:]:
        report.pop(RESTORED_KEY, None)
    epoch = int(lead["epoch"])
    replay = bool(restored) and epoch <= max(int(r["epoch"]) for r in restored)
    if run_uri is not None and not replay:
        write_json(join(run_uri, RANKS_DIR, f"epoch-{epoch:04d}.json"), metrics)
    if recorder is not None and restored:
        recorder.record_missing(restored)
    if recorder is not None and not replay:
        recorder(lead)
    if echo:
        print(format_epoch(lead), flush=True)


def build_trainer(spec: RunSpec, *, name: str, storage: str, resources: WorkerResources,
                  recorder: EpochRecorder | None = None,
                  callbacks: Sequence[UserCallback] = (), max_failures: int = 2,
                  keep_best: int = 2, echo: bool = False,
                  epoch_hooks: Sequence[EpochHookSpec] = ()) -> TorchTrainer:
    """A TorchTrainer for `spec` whose run lives at `storage/name` (same name, same run: a
    rerun resumes from its latest checkpoint). `callbacks` run after fgray's own recorder,
    so they see an epoch only once it is in the tables; `epoch_hooks` run in the workers
    after each epoch (module docstring)."""
    epoch_hooks = check_epoch_hooks(epoch_hooks)
    storage = absolute(storage)
    run_uri = join(storage, name)
    run_config = RunConfig(
        name=name, **ray_storage(storage),
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep_best,
                                           checkpoint_score_attribute=SELECTION_METRIC,
                                           checkpoint_score_order="max"),
        callbacks=[RecordEpochs(run_uri, recorder, echo), *callbacks],
        logging_config=LoggingConfig(log_level="WARNING"))
    board = None if recorder is None else {"study_dir": recorder.study_dir,
                                           "run": recorder.run_name}
    return TorchTrainer(worker_loop, train_loop_config={"spec": spec.to_dict(),
                                                        "run_uri": run_uri,
                                                        "tensorboard": board,
                                                        "epoch_hooks": list(epoch_hooks)},
                        torch_config=resources.torch_config(),
                        scaling_config=resources.scaling_config(), run_config=run_config)


def run_trainer(trainer: TorchTrainer):
    """`trainer.fit()`, re-raising a deterministic failure the workers left behind (a
    non-finite loss as FloatingPointError, a user error as UserError)."""
    run_uri = trainer.train_loop_config["run_uri"]
    delete_file(join(run_uri, ERROR_FILE))  # from an earlier attempt of this run
    result = trainer.fit()
    failure = read_json(join(run_uri, ERROR_FILE))
    if failure is not None:
        raise _NOT_RETRIED.get(failure.get("type"), RuntimeError)(failure.get("message", ""))
    return result


def best_checkpoint_dir(run_uri: str) -> str | None:
    """The kept checkpoint with the highest val kNN top-1 (the earliest on ties) of a
    finished (or interrupted) run, as a path or URI; None when it kept no checkpoint.

    The kept checkpoints are the run folder's sub-folders holding `checkpoint.pt` and the
    epoch's `metrics.json` (`kept_checkpoints`), for a Train run and a `--workers 0` trial
    alike. A Train run written before checkpoints carried their metrics is read through
    Ray's own record of it."""
    kept = _by_epoch(kept_checkpoints(run_uri))
    if kept:
        best, _ = best_of(kept, row=lambda k: k[1])
        return join(run_uri, (best or kept[0])[0])
    try:
        fs, path = resolve(run_uri)
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:
        return None
    best, _ = best_of(result.best_checkpoints or [], row=lambda cm: cm[1])
    if best is not None:
        return _checkpoint_uri(run_uri, best[0])
    return _checkpoint_uri(run_uri, result.checkpoint) if result.checkpoint else None


def _checkpoint_uri(run_uri: str, checkpoint) -> str:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return join(run_uri, name)


def ray_pretrain(spec: RunSpec, *, name: str, storage: str, workers: int,
                 gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                 address: str | None = None, max_failures: int = 2, keep_best: int = 2,
                 callbacks: Sequence[UserCallback] = (), echo: bool = True,
                 epoch_hooks: Sequence[EpochHookSpec] = ()) -> str:
    """`fgray pretrain --workers N`: one Train run at `storage/name`, recorded in the study
    tables under `storage` like an in-process run, with `epoch_hooks` after each epoch in the
    workers (module docstring). Returns the run folder (path or URI)."""
    from fgray.train.cluster import ray_session

    storage = absolute(storage)
    with ray_session(address):
        resources = resolve_resources(workers, cpus_per_worker=cpus_per_worker,
                                      gpus_per_worker=gpus_per_worker)
        recorder = EpochRecorder(storage, trial_id=name, spec=spec, cpus=resources.cpus,
                                 gpus=resources.gpus)
        trainer = build_trainer(spec, name=name, storage=storage, resources=resources,
                                recorder=recorder, callbacks=callbacks,
                                max_failures=max_failures, keep_best=keep_best, echo=echo,
                                epoch_hooks=epoch_hooks)
        try:
            run_trainer(trainer)
        except BaseException as exc:
            history = trial_history(storage, spec.method, name)
            recorder.finish(history, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        recorder.finish(trial_history(storage, spec.method, name), "completed")
    return join(storage, name)

