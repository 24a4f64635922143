"""`fgray pretrain`: resolve the run from flags, then train in this process (`--workers 0`)
or as a Ray Train job (`--workers N`: the cluster at `--address` / RAY_ADDRESS, else a local
Ray started for the run)."""

from __future__ import annotations

import sys

from fgray.allocator import keep_freed_memory
from fgray.config import parse_set_flags
from fgray.engine.spec import DataSpec, RunSpec, build_spec
from fgray.errors import UserError
from fgray.storage import absolute, display, join


def spec_from_args(args) -> RunSpec:
    data = DataSpec(format=args.dataset, root=args.data_root, val_fraction=args.val_fraction,
                    split_seed=args.split_seed, aircraft_level=args.aircraft_level,
                    cache_dir=args.cache_dir)
    train = {"epochs": args.epochs, "batch_size": args.batch_size,
             "image_size": args.image_size, "seed": args.seed}
    return build_spec(args.method, data, backbone=args.backbone, init=args.init, train=train,
                      sets=parse_set_flags(args.set))


def run_name(spec: RunSpec) -> str:
    return f"{spec.method}-{spec.data.format}-{spec.hash()[:8]}"


def diverged(exc: FloatingPointError) -> UserError:
    return UserError(f"training diverged ({exc}); expected a finite loss and weights: lower the "
                     "learning rate (--set optim.lr=...) or a loss weight")


def pretrain_command(args) -> int:
    spec = spec_from_args(args)
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 (in-process) or more")
    name = args.name or run_name(spec)
    if args.workers == 0:
        return _in_process(args, spec, name)
    from fgray.train.trainer import ray_pretrain

    try:
        result = ray_pretrain(spec, name=name, storage=args.storage, workers=args.workers,
                              gpus_per_worker=args.gpus_per_worker,
                              cpus_per_worker=args.cpus_per_worker, address=args.address)
    except FloatingPointError as exc:
        raise diverged(exc) from None
    print(f"run folder: {display(result)}")
    print(f"results: fgray results {args.storage}")
    return 0


def _in_process(args, spec: RunSpec, name: str) -> int:
    import torch

    from fgray.engine.run import resolve_device, run_pretraining
    from fgray.results.records import EpochRecorder, format_epoch, trial_history

    keep_freed_memory()  # the step's memory stays with the process (fgray.allocator)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    recorder = EpochRecorder(str(args.storage), trial_id=name, spec=spec,
                             cpus=1.0 if cuda else float(torch.get_num_threads()),
                             gpus=1.0 if cuda else 0.0)
    run_dir = join(absolute(args.storage), name)

    def on_epoch(metrics, _checkpoint) -> None:
        print(format_epoch(metrics), flush=True)
        recorder(metrics)

    try:
        trainer = run_pretraining(spec, run_dir, device=device, on_epoch=on_epoch,
                                  on_visuals=recorder.visuals, progress=sys.stderr.isatty())
    except BaseException as exc:
        history = trial_history(str(args.storage), spec.method, name)
        if history or not isinstance(exc, UserError):  # a user error before training: no row
            recorder.finish(history, "failed", error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, FloatingPointError):
            raise diverged(exc) from None
        raise
    recorder.finish(trainer.history, status="completed")
    print(f"run folder: {display(run_dir)}")
    print(f"best checkpoint (val kNN): {display(join(run_dir, 'checkpoints', 'best'))}")
    return 0
