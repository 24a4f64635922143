"""`fgray pretrain`: resolve the run from flags, then train in this process (`--workers 0`)
or as a Ray Train job (`--workers N`)."""

from __future__ import annotations

import sys
from pathlib import Path

from fgray.config import parse_set_flags
from fgray.engine.spec import DataSpec, RunSpec, build_spec


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


def print_epoch(metrics: dict) -> None:
    parts = [f"epoch {metrics['epoch']}", f"loss {metrics['loss']:.4f}"]
    if "val_knn_top1" in metrics:
        parts.append(f"val kNN top-1 {metrics['val_knn_top1']:.2f}")
    parts.append(f"{metrics['images_per_s']:.1f} img/s")
    print("  ".join(parts), flush=True)


def pretrain_command(args) -> int:
    from fgray.errors import UserError

    spec = spec_from_args(args)
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: expected 0 (in-process) or more")
    name = args.name or run_name(spec)
    if args.workers == 0:
        from fgray.engine.run import resolve_device, run_pretraining
        from fgray.train.records import EpochRecorder

        run_dir = Path(args.storage) / name
        recorder = EpochRecorder(str(args.storage), trial_id=name, spec=spec)
        trainer = run_pretraining(
            spec, run_dir, device=resolve_device(args.device),
            on_epoch=lambda m, _ckpt: (print_epoch(m), recorder(m)),
            progress=sys.stderr.isatty())
        recorder.finish(trainer.history, status="completed")
        print(f"run folder: {run_dir}")
        print(f"best checkpoint (val kNN): {run_dir / 'checkpoints' / 'best'}")
        return 0
    from fgray.train.trainer import ray_pretrain

    result = ray_pretrain(spec, name=name, storage=args.storage, workers=args.workers,
                          gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, address=args.address)
    print(f"run folder: {result}")
    return 0
