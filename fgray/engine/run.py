"""A whole pretraining run in this process: data, caches, method, the loop, the run folder.

Ray Train workers call `run_pretraining` with their rank and a reporting hook; `fgray pretrain
--workers 0` calls it directly. The run folder holds config.json (the RunSpec), splits.json
(image ids per split, so the validation split can be reproduced), metrics.jsonl (one line per
epoch) and checkpoints/ (the last k epochs plus best/, selected by val kNN top-1).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fgray.data.cache import CachedSplit, build_cache
from fgray.data.formats import FGDataset, load_dataset
from fgray.data.splits import split_record
from fgray.engine.loop import CHECKPOINT_FILE, Pretrainer, VisualsHook
from fgray.engine.selection import Best
from fgray.engine.spec import DataSpec, RunSpec
from fgray.errors import UserError
from fgray.methods import build_method
from fgray.storage import (
    Mirror,
    absolute,
    atomic_path,
    check_writable,
    is_local,
    resolve,
    scratch_folder,
)

METRICS_FILE = "metrics.jsonl"  # one line per epoch, in the run folder


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: CUDA is not available on this machine")
    return device


@dataclass
class Splits:
    dataset: FGDataset
    train: CachedSplit
    val: CachedSplit | None
    test: CachedSplit | None


def load_splits(data: DataSpec, size: int, *, with_test: bool = False,
                progress: bool = True) -> Splits:
    ds = load_dataset(data.format, data.root, val_fraction=data.val_fraction,
                      seed=data.split_seed, aircraft_level=data.aircraft_level)

    def cache(split: str) -> CachedSplit | None:
        if not ds.split(split):
            return None
        return build_cache(ds, split, size, cache_dir=data.cache_dir, progress=progress)

    train = cache("train")
    if train is None:
        raise UserError(f"{data.root}: the train split is empty")
    return Splits(ds, train, cache("val"), cache("test") if with_test else None)


def build_pretrainer(spec: RunSpec, *, device: torch.device, rank: int = 0, world_size: int = 1,
                     run_dir: str | Path | None = None,
                     on_epoch: Callable[[dict[str, Any], Path | None], None] | None = None,
                     on_visuals: VisualsHook | None = None,
                     progress: bool = True) -> Pretrainer:
    splits = load_splits(spec.data, spec.train.decoded_size, progress=progress and rank == 0)
    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    method = build_method(spec.method, backbone=spec.backbone, init=spec.init,
                          image_size=spec.train.image_size, config=spec.method_config)
    run_dir = Path(run_dir) if run_dir else None
    meta = {"spec": spec.to_dict(), "num_classes": splits.dataset.num_classes,
            "classes": splits.dataset.classes}
    # Built (and so validated: batch size against the split, ...) before anything is written:
    # a user error found here leaves no run folder behind.
    trainer = Pretrainer(method, splits.train, splits.val, spec.train, spec.optim, spec.augment,
                         device=device, rank=rank, world_size=world_size,
                         checkpoint_dir=run_dir / "checkpoints" if run_dir else None, meta=meta,
                         on_epoch=on_epoch, on_visuals=on_visuals)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(spec.to_dict(), indent=1))
        (run_dir / "splits.json").write_text(json.dumps(split_record(splits.dataset.samples)))
    return trainer


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted(p for p in (Path(run_dir) / "checkpoints").glob(f"epoch-*/{CHECKPOINT_FILE}")
                   if not p.parent.name.endswith(".tmp"))  # an older version's temporaries
    return found[-1] if found else None


class BestKeeper:
    """Epoch hook that keeps a copy of the best checkpoint (by val kNN top-1) as best/ and
    appends each epoch's metrics to metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.best = Best(rows=self._lines())

    def _lines(self) -> list[dict]:
        path = self.run_dir / METRICS_FILE
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.best.update(metrics) and checkpoint is not None:
            with atomic_path(self.run_dir / "checkpoints" / "best") as tmp:
                shutil.copytree(checkpoint, tmp)


def run_pretraining(spec: RunSpec, run_dir: str | Path, *, device: torch.device | None = None,
                    resume: bool = True, on_epoch=None, on_visuals: VisualsHook | None = None,
                    progress: bool = True) -> Pretrainer:
    """Train `spec` in this process under `run_dir` (a local folder or a storage URI),
    continuing from its last checkpoint. `on_visuals(epoch, images, maps, pairs)` gets the
    TensorBoard visuals (see Pretrainer).

    A run folder in object storage is written through a local scratch folder that mirrors it
    (`fgray.storage.Mirror`): what the location holds is downloaded first (a resume), and
    after every epoch the new files (the checkpoint, best/, metrics.jsonl last) are uploaded
    whole and pruned checkpoints deleted, so the location always holds a run that resumes."""
    location = absolute(run_dir)
    check_writable(location, "run folder")
    fs, path = resolve(location)
    scratch = None if is_local(fs) else scratch_folder("run")
    try:
        mirror = None if scratch is None else Mirror(scratch, location)
        if mirror is not None and resume:
            mirror.pull()
        return _train(spec, Path(path) if scratch is None else scratch, mirror, device=device,
                      resume=resume, on_epoch=on_epoch, on_visuals=on_visuals,
                      progress=progress)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _train(spec: RunSpec, run_dir: Path, mirror: Mirror | None, *, device, resume: bool,
           on_epoch, on_visuals, progress: bool) -> Pretrainer:
    keepers: list[BestKeeper] = []

    def hook(metrics, checkpoint):
        keepers[0](metrics, checkpoint)
        if mirror is not None:
            mirror.sync(last=METRICS_FILE)
        if on_epoch is not None:
            on_epoch(metrics, checkpoint)

    # The run folder is created once the run is known to be valid (build_pretrainer).
    trainer = build_pretrainer(spec, device=device or resolve_device(None), run_dir=run_dir,
                               on_epoch=hook, on_visuals=on_visuals, progress=progress)
    if not resume:  # a fresh start: stale checkpoints and metrics would mix with the new run
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    if mirror is not None:
        mirror.sync(last=METRICS_FILE)  # config.json and splits.json before the first epoch
    keepers.append(BestKeeper(run_dir))
    last = latest_checkpoint(run_dir) if resume else None
    if last is not None:
        trainer.resume(last)
    trainer.run()
    return trainer

