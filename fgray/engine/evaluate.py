"""Evaluating a checkpoint: retrieval, kNN and linear probes on the test (or val) split.

Model selection happens on the validation split during training; this is the one look at
test per final model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fgray.data.augment import augment_preset, eval_transform, eval_view_boxes, eval_view_points
from fgray.data.cache import CachedSplit
from fgray.engine.features import embed_split
from fgray.engine.loop import autocast_for, read_checkpoint, to_channels_last
from fgray.engine.run import load_splits
from fgray.engine.spec import DataSpec, RunSpec
from fgray.errors import UserError
from fgray.eval.knn import knn_classify
from fgray.eval.linear import linear_probe_fast, linear_probe_paper
from fgray.eval.localisation import box_scores, part_hit_rate
from fgray.eval.retrieval import retrieval_metrics
from fgray.eval_mode import eval_mode
from fgray.methods import Method, build_method

PROTOCOLS = ("retrieval", "knn", "linear", "linear-paper", "localisation")
# Localisation: a map cell counts as a part hit when it is in the top 20 % of its map.
PART_TOP_FRACTION = 0.2
# (features (N, D), labels (N,), class names by label) of the evaluated split.
Features = tuple[torch.Tensor, torch.Tensor, list[str]]


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[Method, RunSpec, dict]:
    state = read_checkpoint(path, device)
    try:
        spec = RunSpec.from_dict(state["meta"]["spec"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an fgray checkpoint ({type(exc).__name__})") from None
    method = build_method(spec.method, backbone=spec.backbone, init="random",
                          image_size=spec.train.image_size, config=spec.method_config)
    method.load_state_dict(state["model"])
    return method.to(device).eval(), spec, state


def evaluate_method(method: Method, spec: RunSpec, data: DataSpec, protocols: list[str], *,
                    split: str = "test", device: torch.device, seed: int = 0,
                    progress: bool = True, return_features: bool = False,
                    outcomes: dict[str, np.ndarray] | None = None,
                    ) -> dict[str, float] | tuple[dict[str, float], Features]:
    """The metrics of `protocols` on `split`; with `return_features`, also that split's
    features, labels and the dataset's class names (for the embedding projector). A CNN
    `method` is left in channels-last when `spec.train.channels_last` (`to_channels_last`).

    `outcomes`, when given, is filled with the per-image outcomes behind every metric, one
    float64 array (N,) per key, aligned with the split's images: `image_id`, `label`, and
    for each metric its per-image value (the same name: `knn_top1` 100/0, `map` 100 x AP,
    `loc_box_mass`, ...; NaN where an image does not count) -- the metric is the mean over
    images, except `loc_part_hits`, which is sum(value x `loc_parts_visible`) /
    sum(`loc_parts_visible`). They let a comparison resample test images (`fgray.results.
    stats`)."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise UserError(f"unknown protocol {unknown[0]!r}: expected {', '.join(PROTOCOLS)}")
    size = spec.train.image_size
    splits = load_splits(data, spec.train.decoded_size, with_test=split == "test",
                         progress=progress)
    target = splits.test if split == "test" else splits.val
    if target is None:
        raise UserError(f"{data.root}: the {split} split is empty")
    bs = spec.train.eval_batch_for(device)
    norm = {"mean": spec.augment.mean, "std": spec.augment.std}
    layout = {"channels_last": to_channels_last(method, spec.train), **norm}
    with autocast_for(device, spec.train.precision):
        feats, labels = embed_split(method, method.embed, target, size, bs, device, **layout)
        need_train = any(p not in ("retrieval", "localisation") for p in protocols)
        if need_train:
            bank, bank_labels = embed_split(method, method.embed, splits.train, size, bs, device,
                                            **layout)
    out: dict[str, float] = {}
    n_cls = splits.dataset.num_classes
    per = outcomes is not None
    if per:
        outcomes.update(image_id=np.asarray(target.image_ids, np.float64),
                        label=np.asarray(target.labels, np.float64))
    if "retrieval" in protocols:
        r = retrieval_metrics(feats, labels, per_query=per)
        out.update(rank1=r["rank1"], rank5=r["rank5"], map=r["map"])
        if per:
            outcomes.update({k: v.numpy() for k, v in r["per_query"].items()})
    if "knn" in protocols:
        k = knn_classify(bank, bank_labels, feats, labels, k=spec.train.knn_k,
                         temperature=spec.train.knn_temperature, num_classes=n_cls,
                         per_query=per)
        out.update(knn_top1=k["top1"], knn_top5=k["top5"])
        if per:
            outcomes.update({f"knn_{k_}": v.numpy() for k_, v in k["per_query"].items()})
    if "linear" in protocols:
        lin = linear_probe_fast(bank, bank_labels, feats, labels, num_classes=n_cls, seed=seed,
                                per_query=per)
        out.update(linear_top1=lin["top1"], linear_top5=lin["top5"])
        if per:
            outcomes.update({f"linear_{k_}": v.numpy() for k_, v in lin["per_query"].items()})
    if "linear-paper" in protocols:
        train_aug = augment_preset("mocov2", size, scale_min=0.08, jitter_p=0.0, gray_p=0.0,
                                   blur_p=(0.0, 0.0), mean=spec.augment.mean,
                                   std=spec.augment.std)
        from fgray.data.augment import TwoViewAugment

        crop = TwoViewAugment(train_aug, seed=seed)
        with torch.no_grad():
            dim = method.embed(eval_transform(torch.as_tensor(target.images[:1]).to(device),
                                              size, **norm, regions=target.regions[:1])).shape[1]
        lin = linear_probe_paper(
            method.embed, torch.from_numpy(splits.train.images),
            torch.from_numpy(splits.train.labels), torch.from_numpy(target.images),
            torch.from_numpy(target.labels),
            train_transform=lambda x, rows: crop.view(x, 0, splits.train.regions[rows.numpy()]),
            eval_transform=lambda x, rows: eval_transform(
                x, size, **norm, regions=target.regions[rows.numpy()]),
            feature_dim=dim, num_classes=n_cls, seed=seed, device=device)
        out.update(linear_paper_top1=lin["top1"])
    if "localisation" in protocols:
        out.update(localisation_scores(method, target, size, bs, device, **norm,
                                       outcomes=outcomes))
    if return_features:
        return out, (feats.float().cpu(), labels.cpu(), list(splits.dataset.classes))
    return out


def method_maps(method: nn.Module, view: torch.Tensor) -> torch.Tensor:
    """The (B, h, w) map a method's localisation is scored on: its first spatial map, or,
    for a method with none (MoCo, SDF, the init weights), the activation norm of the
    backbone's last feature map -- the map every CNN has, so every row gets a score and a
    method's own map can be compared with the plain encoder's."""
    maps = method.spatial_maps(view)
    if maps:
        return next(iter(maps.values())).float()
    return method.backbone.feature_map(view).float().norm(dim=1)


def localisation_scores(method: nn.Module, data: CachedSplit, size: int, batch_size: int,
                        device: torch.device, *, mean: tuple[float, ...],
                        std: tuple[float, ...], outcomes: dict[str, np.ndarray] | None = None,
                        ) -> dict[str, float]:
    """Box mass, pointing game and part hits (fgray.eval.localisation) of the method's map
    on every image of `data` with a box, in the eval view; {} when the split has no boxes.
    A method whose map needs input gradients (PP-SSL) enables them itself. `outcomes`, when
    given, gets each image's scores (NaN for an image without a box; see
    `evaluate_method`)."""
    has_box = ~np.isnan(data.boxes).any(axis=1)
    if not has_box.any():
        return {}
    maps, boxes, parts = [], [], []
    with eval_mode(method):
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            idx = idx[has_box[idx]]
            if len(idx) == 0:
                continue
            raw = torch.from_numpy(np.asarray(data.images[idx])).to(device)
            regions = data.regions[idx]
            with torch.no_grad():
                view = eval_transform(raw, size, mean=mean, std=std, regions=regions)
                maps.append(method_maps(method, view).cpu())
            boxes.append(eval_view_boxes(data.boxes[idx], regions, size))
            if data.parts is not None:
                p = torch.from_numpy(data.parts[idx]).float().clone()
                p[..., :2] = eval_view_points(p[..., :2], regions, size)
                inside = ((p[..., :2] >= 0) & (p[..., :2] < size)).all(-1)
                p[..., 2] = p[..., 2] * inside
                parts.append(p)
    maps_t = torch.cat(maps)
    out = {}
    per = outcomes is not None
    scores = box_scores(maps_t, torch.cat(boxes), (size, size), per_image=per)
    out["loc_box_mass"] = scores["box_mass"]
    out["loc_pointing"] = scores["pointing_game"]

    def spread(values: torch.Tensor) -> np.ndarray:  # over the whole split, NaN without a box
        full = np.full(len(data), np.nan)
        full[has_box] = values.numpy()
        return full

    if per:
        outcomes.update(loc_box_mass=spread(scores["per_image"]["box_mass"]),
                        loc_pointing=spread(scores["per_image"]["pointing_game"]))
    if parts:
        hits = part_hit_rate(maps_t, torch.cat(parts), (size, size),
                             top_fraction=PART_TOP_FRACTION, per_image=per)
        if hits["visible_parts"]:
            out["loc_part_hits"] = hits["hit_rate"]
            if per:
                visible = hits["per_image"]["visible"]
                rate = hits["per_image"]["credit"] / visible  # NaN where none is visible
                outcomes.update(loc_part_hits=spread(rate), loc_parts_visible=spread(visible))
    return out


class InitialWeights(nn.Module):
    """The baseline every paper reports: the initial weights, no self-supervised training.
    Its test feature is the L2-normalised pooled backbone feature, as MoCo's is."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images), dim=1)

    def spatial_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


def evaluate_init(spec: RunSpec, data: DataSpec, protocols: list[str], *,
                  device: torch.device, seed: int = 0, progress: bool = False,
                  outcomes: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """The init row: `spec`'s backbone and initial weights (`spec.init`), untrained, scored
    with `protocols` on test and with val kNN top-1 (as the runs select on it), on the
    same splits and views as every trained method; `outcomes` gets its per-image test
    outcomes (`evaluate_method`)."""
    from fgray.models.backbone import create_backbone

    torch.manual_seed(spec.train.seed)
    net = create_backbone(spec.backbone_name, init=spec.init, img_size=spec.train.image_size)
    model = InitialWeights(net).to(device).eval()
    out = evaluate_method(model, spec, data, protocols, split="test", device=device,
                          seed=seed, progress=progress, outcomes=outcomes)
    val = evaluate_method(model, spec, data, ["knn"], split="val", device=device, seed=seed,
                          progress=progress)
    out["val_knn_top1"] = val["knn_top1"]
    return out

