"""Evaluating a checkpoint: retrieval, kNN and linear probes on the test (or val) split.

Model selection happens on the validation split during training; this is the one look at
test per final model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fgray.data.augment import augment_preset, eval_transform
from fgray.engine.features import embed_split
from fgray.engine.loop import CHECKPOINT_FILE, autocast_for
from fgray.engine.run import load_splits, resolve_device
from fgray.engine.spec import DataSpec, RunSpec
from fgray.errors import UserError
from fgray.eval.knn import knn_classify
from fgray.eval.linear import linear_probe_fast, linear_probe_paper
from fgray.eval.retrieval import retrieval_metrics
from fgray.methods import Method, build_method

PROTOCOLS = ("retrieval", "knn", "linear", "linear-paper")
# (features (N, D), labels (N,), class names by label) of the evaluated split.
Features = tuple[torch.Tensor, torch.Tensor, list[str]]


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[Method, RunSpec, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        spec = RunSpec.from_dict(state["meta"]["spec"])
    except (KeyError, TypeError, RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path}: not an fgray checkpoint ({type(exc).__name__})") from None
    method = build_method(spec.method, backbone=spec.backbone, init="random",
                          image_size=spec.train.image_size, overrides=spec.method_overrides)
    method.load_state_dict(state["model"])
    return method.to(device).eval(), spec, state


def evaluate_method(method: Method, spec: RunSpec, data: DataSpec, protocols: list[str], *,
                    split: str = "test", device: torch.device, seed: int = 0,
                    progress: bool = True, return_features: bool = False,
                    ) -> dict[str, float] | tuple[dict[str, float], Features]:
    """The metrics of `protocols` on `split`; with `return_features`, also that split's
    features, labels and the dataset's class names (for the embedding projector)."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise UserError(f"unknown protocol {unknown[0]!r}: expected {', '.join(PROTOCOLS)}")
    size = spec.train.image_size
    splits = load_splits(data, spec.train.decoded_size, with_test=split == "test",
                         progress=progress)
    target = splits.test if split == "test" else splits.val
    if target is None:
        raise UserError(f"{data.root}: the {split} split is empty")
    bs = spec.train.eval_batch_size
    with autocast_for(device, spec.train.precision):
        feats, labels = embed_split(method, method.embed, target, size, bs, device)
        need_train = any(p != "retrieval" for p in protocols)
        if need_train:
            bank, bank_labels = embed_split(method, method.embed, splits.train, size, bs, device)
    out: dict[str, float] = {}
    n_cls = splits.dataset.num_classes
    if "retrieval" in protocols:
        r = retrieval_metrics(feats, labels)
        out.update(rank1=r["rank1"], rank5=r["rank5"], map=r["map"])
    if "knn" in protocols:
        k = knn_classify(bank, bank_labels, feats, labels, k=spec.train.knn_k,
                         temperature=spec.train.knn_temperature, num_classes=n_cls)
        out.update(knn_top1=k["top1"], knn_top5=k["top5"])
    if "linear" in protocols:
        lin = linear_probe_fast(bank, bank_labels, feats, labels, num_classes=n_cls, seed=seed)
        out.update(linear_top1=lin["top1"], linear_top5=lin["top5"])
    if "linear-paper" in protocols:
        train_aug = augment_preset("mocov2", size, scale_min=0.08, jitter_p=0.0, gray_p=0.0,
                                   blur_p=(0.0, 0.0))
        from fgray.data.augment import TwoViewAugment

        crop = TwoViewAugment(train_aug, seed=seed)
        with torch.no_grad():
            dim = method.embed(eval_transform(torch.as_tensor(target.images[:1]).to(device),
                                              size)).shape[1]
        lin = linear_probe_paper(
            method.embed, torch.from_numpy(splits.train.images),
            torch.from_numpy(splits.train.labels), torch.from_numpy(target.images),
            torch.from_numpy(target.labels),
            train_transform=lambda x: crop.view(x, 0), eval_transform=lambda x: eval_transform(
                x, size), feature_dim=dim, num_classes=n_cls, seed=seed, device=device)
        out.update(linear_paper_top1=lin["top1"])
    if return_features:
        return out, (feats.float().cpu(), labels.cpu(), list(splits.dataset.classes))
    return out


def eval_command(args) -> int:
    device = resolve_device(args.device)
    method, spec, _ = load_checkpoint(args.checkpoint, device)
    data = DataSpec(format=args.dataset, root=args.data_root, val_fraction=args.val_fraction,
                    split_seed=args.split_seed, aircraft_level=args.aircraft_level,
                    cache_dir=args.cache_dir)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    metrics = evaluate_method(method, spec, data, protocols, split=args.split, device=device)
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / (
        f"eval-{args.split}.json")
    record: dict[str, Any] = {"checkpoint": str(ckpt), "split": args.split,
                              "method": spec.method, "metrics": metrics}
    out.write_text(json.dumps(record, indent=1))
    for name, value in metrics.items():
        print(f"{args.split} {name}: {value:.2f}")
    print(f"wrote {out}")
    return 0
