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

Per-epoch hooks (`epoch_hooks` of `build_trainer`, `run_in_trial` and `ray_pretrain`; see
`fgray.train.hooks`) run on every rank after each epoch's checkpoint is written and before it
is reported; one that raises fails the worker as training would. The tests inject faults
with them (`tests/faults.py`).

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

import json
import shutil
import time
from collections.abc import Sequence
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
    UserCallback,
)
from ray.train.torch import TorchTrainer

from fgray.allocator import keep_freed_memory
from fgray.engine.loop import CHECKPOINT_FILE
from fgray.engine.selection import BEST_METRIC, SELECTION_METRIC, Best, ranked
from fgray.engine.spec import RunSpec
from fgray.errors import UserError
from fgray.results.records import (
    EPOCH_END,
    NODE_ID,
    RESTORED_KEY,
    SESSION_START,
    EpochRecorder,
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
from fgray.train.checkpoints import METRICS_FILE, by_epoch, kept_checkpoints
from fgray.train.cluster import ray_storage
from fgray.train.hooks import EpochHook, EpochHookSpec, check_epoch_hooks, load_epoch_hook
from fgray.train.recording import RecordEpochs, record_epoch
from fgray.train.resources import WorkerResources, resolve_resources

ERROR_FILE = "fgray_error.json"
SPLITS_FILE = "splits.json"
# Deterministic: every rank raises them at the same step, so retrying cannot help.
_NOT_RETRIED = {"FloatingPointError": FloatingPointError, "UserError": UserError}


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
        kept = by_epoch(kept_checkpoints(self.run_uri))
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


def worker_loop(config: dict[str, Any], session: TrainSession | TuneSession | None = None
                ) -> None:
    """The engine loop of one rank: the function every Ray Train worker runs
    (`train_loop_per_worker`, session None: `TrainSession`), and with `--workers 0` what a
    Tune trial runs itself (`TuneSession`)."""
    from fgray.engine.run import build_pretrainer

    keep_freed_memory()  # where the worker did not start with fgray.allocator.ENV
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
    torch.set_num_threads(resources.torch_threads)
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

