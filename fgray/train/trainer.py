"""Ray Train: the engine's pretraining loop in a `TorchTrainer`, one report per epoch.

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

Deterministic failures (a non-finite loss, a user error such as a batch larger than the
split) are not retried: every rank hits them at the same point, so the workers stop cleanly
and rank 0 leaves `fgray_error.json` in the run folder; `run_trainer` raises it again in the
caller.

Layout of a run folder `STORAGE/NAME/`: Ray's checkpoint-manager state, `epoch-XXXX/`
(checkpoint.pt and splits.json) for the kept epochs, `ranks/epoch-XXXX.json` (every rank's
metrics of the epoch: a straggler or a diverging replica shows there) and, on a
deterministic failure, `fgray_error.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
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
from fgray.engine.spec import RunSpec
from fgray.errors import UserError
from fgray.results.tables import resolve
from fgray.train.records import SELECTION_METRIC, EpochRecorder, format_epoch, write_visuals

ERROR_FILE = "fgray_error.json"
RANKS_DIR = "ranks"
SPLITS_FILE = "splits.json"
# Test hook: rank FGRAY_TEST_FAIL_RANK exits hard once, after training epoch
# FGRAY_TEST_FAIL_AT_EPOCH, before reporting it; the marker file makes it happen only once.
FAIL_AT_ENV, FAIL_RANK_ENV, FAIL_MARKER_ENV = (
    "FGRAY_TEST_FAIL_AT_EPOCH", "FGRAY_TEST_FAIL_RANK", "FGRAY_TEST_FAIL_MARKER")
# Deterministic: every rank raises them at the same step, so retrying cannot help.
_NOT_RETRIED = {"FloatingPointError": FloatingPointError, "UserError": UserError}


@dataclass(frozen=True)
class WorkerResources:
    """What one Train run asks for: `workers` ranks, each with these CPUs and GPUs."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: expected 1 or more Ray Train workers")
        if self.cpus_per_worker <= 0:
            raise UserError(f"--cpus-per-worker {self.cpus_per_worker}: expected more than 0")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker}: expected 0 or more")
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker} with {self.workers} "
                            "workers: NCCL needs a whole GPU per rank; share GPUs between "
                            "single-worker trials instead")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

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


def absolute_storage(storage: str | os.PathLike) -> str:
    """A local storage path made absolute (Ray needs that); URIs unchanged."""
    text = str(storage)
    return text.rstrip("/") if "://" in text else os.path.abspath(os.path.expanduser(text))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


# ---------------------------------------------------------------- worker side


def _fail_once_for_test(epoch: int, rank: int) -> None:
    at = os.environ.get(FAIL_AT_ENV)
    if not at or int(at) != epoch or int(os.environ.get(FAIL_RANK_ENV, "0")) != rank:
        return
    marker = Path(os.environ.get(FAIL_MARKER_ENV)
                  or Path(tempfile.gettempdir()) / f"fgray-test-fail-{epoch}-{rank}")
    if marker.exists():
        return
    marker.write_text(f"rank {rank} exited after epoch {epoch}\n")
    os._exit(1)


def _param_checksum(module: torch.nn.Module) -> float:
    """Sum of every parameter in float64: equal on all ranks when DDP keeps them in sync."""
    with torch.no_grad():
        sums = [p.detach().double().sum() for p in module.parameters()]
        return float(torch.stack(sums).sum().item()) if sums else 0.0


def _write_json(uri: str, payload: Any) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(payload, default=str).encode())


def _read_json(uri: str) -> Any | None:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        return json.loads(src.read().decode())


def _delete(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (`train_loop_per_worker`)."""
    from fgray.engine.run import build_pretrainer

    spec = RunSpec.from_dict(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Worker-local scratch for the Pretrainer's files; what must last is reported to storage.
    scratch = Path(tempfile.mkdtemp(prefix="fgray-worker-"))
    best = {"value": float("-inf")}

    def on_epoch(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        epoch = int(metrics["epoch"])
        _fail_once_for_test(epoch, rank)
        report = dict(metrics)  # the Pretrainer keeps `metrics` in its history
        report["param_checksum"] = _param_checksum(trainer.method)
        if SELECTION_METRIC in report:
            best["value"] = max(best["value"], float(report[SELECTION_METRIC]))
        if best["value"] > float("-inf"):
            report[f"best_{SELECTION_METRIC}"] = best["value"]
        checkpoint = None
        if checkpoint_dir is not None:
            splits = scratch / SPLITS_FILE
            if splits.is_file():  # which images were train / val, next to the weights
                shutil.copy2(splits, checkpoint_dir / SPLITS_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}",
                         delete_local_checkpoint_after_upload=checkpoint is not None)

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
        trainer = build_pretrainer(spec, device=device, rank=rank, world_size=world,
                                   run_dir=scratch, on_epoch=on_epoch,
                                   on_visuals=on_visuals if board else None, progress=False)
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as folder:
                trainer.resume(Path(folder) / CHECKPOINT_FILE)
        for row in trainer.history:
            if row.get(SELECTION_METRIC) is not None:
                best["value"] = max(best["value"], float(row[SELECTION_METRIC]))
        trainer.run()
    except tuple(_NOT_RETRIED.values()) as exc:
        if rank == 0:
            _write_json(join(config["run_uri"], ERROR_FILE),
                        {"type": type(exc).__name__, "message": str(exc)})
    finally:
        for writer in writers:
            writer.close()
        shutil.rmtree(scratch, ignore_errors=True)


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
        lead = metrics[0]
        epoch = int(lead["epoch"])
        _write_json(join(self.run_uri, RANKS_DIR, f"epoch-{epoch:04d}.json"), metrics)
        if self.recorder is not None:
            self.recorder(lead)
        if self.echo:
            print(format_epoch(lead), flush=True)


def build_trainer(spec: RunSpec, *, name: str, storage: str, resources: WorkerResources,
                  recorder: EpochRecorder | None = None,
                  callbacks: Sequence[UserCallback] = (), max_failures: int = 2,
                  keep_best: int = 2, echo: bool = False) -> TorchTrainer:
    """A TorchTrainer for `spec` whose run lives at `storage/name` (same name, same run: a
    rerun resumes from its latest checkpoint). `callbacks` run after fgray's own recorder,
    so they see an epoch only once it is in the tables."""
    storage = absolute_storage(storage)
    run_uri = join(storage, name)
    env = {k: v for k, v in os.environ.items() if k.startswith("FGRAY_TEST_")}
    run_config = RunConfig(
        name=name, storage_path=storage,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep_best,
                                           checkpoint_score_attribute=SELECTION_METRIC,
                                           checkpoint_score_order="max"),
        callbacks=[RecordEpochs(run_uri, recorder, echo), *callbacks],
        worker_runtime_env={"env_vars": env} if env else None,
        logging_config=LoggingConfig(log_level="WARNING"))
    board = None if recorder is None else {"study_dir": recorder.study_dir,
                                           "run": recorder.run_name}
    return TorchTrainer(worker_loop, train_loop_config={"spec": spec.to_dict(),
                                                        "run_uri": run_uri,
                                                        "tensorboard": board},
                        torch_config=resources.torch_config(),
                        scaling_config=resources.scaling_config(), run_config=run_config)


def run_trainer(trainer: TorchTrainer):
    """`trainer.fit()`, re-raising a deterministic failure the workers left behind (a
    non-finite loss as FloatingPointError, a user error as UserError)."""
    run_uri = join(trainer.run_config.storage_path, trainer.run_config.name)
    _delete(join(run_uri, ERROR_FILE))  # from an earlier attempt of this run
    result = trainer.fit()
    failure = _read_json(join(run_uri, ERROR_FILE))
    if failure is not None:
        raise _NOT_RETRIED.get(failure.get("type"), RuntimeError)(failure.get("message", ""))
    return result


def best_checkpoint_dir(run_uri: str) -> str | None:
    """The kept checkpoint with the highest val kNN top-1 of a finished (or interrupted)
    Train run, as a path or URI; None when the run reported no checkpoint."""
    try:
        result = ray.train.Result.from_path(run_uri)
    except RuntimeError:
        return None
    scored = [(m.get(SELECTION_METRIC), c) for c, m in result.best_checkpoints or []
              if m.get(SELECTION_METRIC) is not None]
    if scored:
        return _checkpoint_uri(run_uri, max(scored, key=lambda t: t[0])[1])
    return _checkpoint_uri(run_uri, result.checkpoint) if result.checkpoint else None


def _checkpoint_uri(run_uri: str, checkpoint) -> str:
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return join(run_uri, name)


def ray_pretrain(spec: RunSpec, *, name: str, storage: str, workers: int,
                 gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                 address: str | None = None, max_failures: int = 2, keep_best: int = 2,
                 callbacks: Sequence[UserCallback] = (), echo: bool = True) -> str:
    """`fgray pretrain --workers N`: one Train run at `storage/name`, recorded in the study
    tables under `storage` like an in-process run. Returns the run folder (path or URI)."""
    from fgray.train.cluster import ray_session
    from fgray.train.records import trial_history

    storage = absolute_storage(storage)
    with ray_session(address):
        resources = resolve_resources(workers, cpus_per_worker=cpus_per_worker,
                                      gpus_per_worker=gpus_per_worker)
        recorder = EpochRecorder(storage, trial_id=name, spec=spec, cpus=resources.cpus,
                                 gpus=resources.gpus)
        trainer = build_trainer(spec, name=name, storage=storage, resources=resources,
                                recorder=recorder, callbacks=callbacks,
                                max_failures=max_failures, keep_best=keep_best, echo=echo)
        try:
            run_trainer(trainer)
        except BaseException as exc:
            history = trial_history(storage, spec.method, name)
            recorder.finish(history, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        recorder.finish(trial_history(storage, spec.method, name), "completed")
    return join(storage, name)

