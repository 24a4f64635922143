"""Linear probes on a frozen backbone: a fast one on cached features, and the papers' one.

* `linear_probe_fast` [ours] trains a softmax classifier on features computed once (no
  augmentation). It serves hyperparameter search, where seconds matter more than the last
  point of accuracy.
* `linear_probe_paper` follows the official recipes, re-embedding augmented images every
  epoch: LCR's `main_lincls.py` (SGD lr 30, momentum 0.9, wd 0, lr x0.1 at 60% and 80% of the
  epochs, RandomResizedCrop + flip) or LoDisc's MoCo v3 `main_lincls.py` lineage (SGD lr
  0.5 x batch/256, momentum 0.9, per-epoch cosine).

Both report percentages (0-100) computed over every evaluated image; LCR's script averages
per-batch accuracies instead, which differs when the last batch is smaller.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgray.errors import UserError
from fgray.eval._checks import (
    check_feature_pair,
    check_labels,
    check_positive_int,
    resolve_num_classes,
    topk_rows,
)
from fgray.eval_mode import eval_mode

ImageArray = Tensor | np.ndarray


def _check_float(name: str, value: float, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise UserError(f"{name}={value!r}: expected a finite number "
                        f"{'> 0' if positive else '>= 0'}")


def _evaluate(classifier: nn.Module, batches: Any, classes: int, *,
              per_query: bool = False) -> dict[str, Any]:
    """Top-1/top-5 percent over (features, labels) batches; with `per_query`, also the
    per-row outcomes (100 right, 0 wrong) as float64 CPU tensors under ``per_query``."""
    rows: dict[int, list[Tensor]] = {1: [], 5: []}
    classifier.eval()
    with torch.no_grad():
        for feats, labels in batches:
            for k, hit in topk_rows(classifier(feats), labels, (1, 5)).items():
                rows[k].append(hit.cpu())
    hits = {k: torch.cat(r).double() * 100.0 for k, r in rows.items()}
    total = hits[1].numel()
    out: dict[str, Any] = {"top1": float(hits[1].sum()) / total,
                           "top5": float(hits[5].sum()) / total}
    if per_query:
        out["per_query"] = {"top1": hits[1], "top5": hits[5]}
    return out


def linear_probe_fast(train_features: Tensor, train_labels: Tensor,
                      eval_features: Tensor, eval_labels: Tensor, *,
                      num_classes: int | None = None, epochs: int = 100, lr: float = 1e-3,
                      weight_decay: float = 5e-4, batch_size: int = 256,
                      seed: int = 0, per_query: bool = False) -> dict[str, Any]:
    """Softmax classifier on cached frozen features; returns ``top1``/``top5`` on the eval set
    (with `per_query`, also each eval item's outcome under ``per_query``, as `knn_classify`).

    [ours] Features are standardised per dimension with the train set's mean and standard
    deviation (dimensions constant on train are only centred), so one learning rate fits any
    backbone's feature scale and dimension. The classifier starts at zero and is trained with
    AdamW (`lr`, decoupled `weight_decay`), mini-batches of `batch_size` (the whole set when
    larger) reshuffled each epoch, and a per-step cosine decay to zero. Everything runs on the
    train features' device; the shuffle uses its own CPU generator seeded with `seed`, so the
    result is deterministic on CPU. Also returns ``train_top1`` (percent, final classifier
    on the train features) to tell under-fitting from over-fitting. Top-5 counts all classes
    when there are fewer than 5.
    """
    check_feature_pair(train_features, train_labels, eval_features, eval_labels, "eval")
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    _check_float("lr", lr, positive=True)
    _check_float("weight_decay", weight_decay, positive=False)
    classes = resolve_num_classes(num_classes, train_labels, eval_labels,
                                  names=("train_labels", "eval_labels"))

    device = train_features.device
    train_x = train_features.float()
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    train_x = (train_x - mean) / std
    eval_x = (eval_features.to(device).float() - mean) / std
    train_y = train_labels.to(device).long()
    eval_y = eval_labels.to(device).long()

    classifier = nn.Linear(train_x.shape[1], classes).to(device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)

    step = 0
    classifier.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(classifier(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

    def chunks(x: Tensor, y: Tensor) -> Any:
        return ((x[i:i + 4096], y[i:i + 4096]) for i in range(0, x.shape[0], 4096))

    result = _evaluate(classifier, chunks(eval_x, eval_y), classes, per_query=per_query)
    result["train_top1"] = _evaluate(classifier, chunks(train_x, train_y), classes)["top1"]
    return result


def _check_images(name: str, images: ImageArray, labels: Any) -> Tensor:
    """Validate a uint8 (N, 3, H, W) image array; return its labels as a CPU long tensor."""
    if not isinstance(images, (Tensor, np.ndarray)):
        raise UserError(f"{name}: expected a torch.Tensor or numpy array of uint8 images, "
                        f"got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"{name}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    is_uint8 = (images.dtype == torch.uint8 if isinstance(images, Tensor)
                else images.dtype == np.uint8)
    if not is_uint8:
        raise UserError(f"{name}: expected uint8 pixels, got {images.dtype}")
    if images.shape[0] < 1:
        raise UserError(f"{name}: expected at least one image, got 0")
    labels_t = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, Tensor) else labels
    label_name = name.replace("images", "labels")
    check_labels(label_name, labels_t, images.shape[0], features_name=name)
    return labels_t.cpu().long()


def _take(images: ImageArray, idx: Tensor, device: torch.device) -> Tensor:
    """Rows `idx` of a tensor or (memory-mapped) numpy array, as a uint8 tensor on `device`."""
    if isinstance(images, np.ndarray):
        # np.asarray copies just these rows out of a memory map.
        return torch.from_numpy(np.asarray(images[idx.numpy()])).to(device)
    return images[idx.to(images.device)].to(device)


def _resolve_device(embed_fn: Callable[[Tensor], Tensor],
                    device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(embed_fn, nn.Module):
        first = next(iter(embed_fn.parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def linear_probe_paper(embed_fn: Callable[[Tensor], Tensor],
                       train_images: ImageArray, train_labels: Tensor | np.ndarray,
                       eval_images: ImageArray, eval_labels: Tensor | np.ndarray, *,
                       train_transform: Callable[[Tensor, Tensor], Tensor],
                       eval_transform: Callable[[Tensor, Tensor], Tensor],
                       feature_dim: int, num_classes: int,
                       schedule: Literal["step", "cosine"] = "step", epochs: int = 100,
                       batch_size: int = 256, lr: float | None = None,
                       weight_decay: float = 0.0, seed: int = 0,
                       device: torch.device | str | None = None) -> dict[str, float]:
    """The papers' linear evaluation: a linear layer on a frozen backbone, augmented inputs.

    `embed_fn(float_images) -> (B, feature_dim)` is the frozen backbone; it is called under
    `torch.no_grad()`. The caller puts it in eval mode (as LCR's script does, so BatchNorm
    statistics stay frozen); when it is an `nn.Module` this function also sets eval mode and
    restores the previous mode afterwards. Images are uint8 (N, 3, H, W) tensors or numpy
    arrays (memory maps work: each batch's rows are read, then moved to `device`).
    `train_transform(images, rows)` / `eval_transform(images, rows)` map a uint8 batch on
    `device` to the float batch `embed_fn` expects (RandomResizedCrop + flip for training,
    resize/centre-crop for eval); `rows` are the batch's indices into its image array, so a
    transform can look up per-image data such as a cache's regions.

    Recipes (SGD, momentum 0.9, classifier initialised N(0, 0.01), bias 0):

    * ``schedule="step"`` (LCR): lr 30 unless `lr` is given; lr x0.1 from epoch
      round(0.6 * epochs) and again from round(0.8 * epochs) (60 and 80 of 100).
    * ``schedule="cosine"`` (LoDisc): lr 0.5 x batch_size / 256 unless `lr` is given (then
      used as is); per-epoch cosine decay lr * 0.5 * (1 + cos(pi * epoch / epochs)).

    `device` defaults to the device of `embed_fn`'s parameters (CPU when it has none).
    Shuffling, initialisation and the transforms' randomness are seeded with `seed` in a
    forked RNG, leaving the global RNG state untouched. Returns percentages on the eval set
    (``top1``, ``top5``; top-5 counts all classes when there are fewer than 5) and the last
    epoch's ``train_loss`` (mean over its batches) and ``train_top1`` (on augmented batches).
    """
    if not callable(embed_fn):
        raise UserError(f"embed_fn: expected a callable, got {type(embed_fn).__name__}")
    train_y = _check_images("train_images", train_images, train_labels)
    eval_y = _check_images("eval_images", eval_images, eval_labels)
    check_positive_int("feature_dim", feature_dim)
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if schedule not in ("step", "cosine"):
        raise UserError(f"schedule={schedule!r}: expected one of step, cosine")
    if lr is not None:
        _check_float("lr", lr, positive=True)
    _check_float("weight_decay", weight_decay, positive=False)
    classes = resolve_num_classes(num_classes, train_y, eval_y,
                                  names=("train_labels", "eval_labels"))
    base_lr = lr if lr is not None else (30.0 if schedule == "step"
                                         else 0.5 * batch_size / 256)
    milestones = (round(0.6 * epochs), round(0.8 * epochs))
    dev = _resolve_device(embed_fn, device)

    def embed(images_u8: Tensor, rows: Tensor,
              transform: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        with torch.no_grad():
            feats = embed_fn(transform(images_u8, rows))
        if feats.dim() != 2 or feats.shape[1] != feature_dim:
            raise UserError(f"embed_fn returned shape {tuple(feats.shape)}: expected "
                            f"(batch, feature_dim={feature_dim})")
        return feats.float()

    # An nn.Module embed_fn embeds in eval mode and is given back in the mode it had.
    frozen = (eval_mode(embed_fn) if isinstance(embed_fn, nn.Module)
              else contextlib.nullcontext())
    cuda_devices = [dev] if dev.type == "cuda" else []
    with frozen, torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        classifier = nn.Linear(feature_dim, classes).to(dev)
        nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(classifier.bias)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=base_lr, momentum=0.9,
                                    weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        n = train_y.shape[0]
        loss_sum, seen, correct = 0.0, 0, 0
        for epoch in range(epochs):
            if schedule == "step":
                epoch_lr = base_lr * 0.1 ** sum(epoch >= m for m in milestones)
            else:
                epoch_lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            classifier.train()
            perm = torch.randperm(n, generator=generator)
            loss_sum, seen, correct = 0.0, 0, 0
            for start in range(0, n, batch_size):
                # Sorted rows read a memory map front to back; order within a batch
                # does not matter to the gradient.
                idx = perm[start:start + batch_size].sort().values
                feats = embed(_take(train_images, idx, dev), idx, train_transform)
                target = train_y[idx].to(dev)
                logits = classifier(feats)
                loss = F.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * target.shape[0]
                seen += target.shape[0]
                correct += int((logits.argmax(dim=1) == target).sum())

        eval_batches = (
            (embed(_take(eval_images, idx, dev), idx, eval_transform), eval_y[idx].to(dev))
            for idx in torch.arange(eval_y.shape[0]).split(batch_size))
        result = _evaluate(classifier, eval_batches, classes)
    result["train_loss"] = loss_sum / seen
    result["train_top1"] = 100.0 * correct / seen
    return result
