"""Input checks shared by the evaluation protocols: each raises a one-line UserError."""

from __future__ import annotations

import torch
from torch import Tensor

from fgray.errors import UserError


def check_features(name: str, features: Tensor, *, min_rows: int = 1) -> None:
    """`features` must be a finite floating (N, D) tensor with at least `min_rows` rows."""
    if not isinstance(features, Tensor):
        raise UserError(f"{name}: expected a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise UserError(f"{name}: expected shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] < min_rows:
        raise UserError(f"{name}: expected at least {min_rows} rows, got {features.shape[0]}")
    if features.shape[1] < 1:
        raise UserError(f"{name}: expected at least one feature dimension, got 0")
    if not features.is_floating_point():
        raise UserError(f"{name}: expected a floating-point tensor, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise UserError(f"{name}: contains NaN or infinite values")


def check_labels(name: str, labels: Tensor, n: int, *, features_name: str) -> None:
    """`labels` must be an integer (N,) tensor matching `n` feature rows."""
    if not isinstance(labels, Tensor):
        raise UserError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise UserError(
            f"{name}: expected shape ({n},) to match {features_name}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"{name}: expected integer class labels, got {labels.dtype}")


def check_feature_pair(train_features: Tensor, train_labels: Tensor, other_features: Tensor,
                       other_labels: Tensor, other: str) -> None:
    """Labelled train features and a second labelled set (`other`: its argument prefix, e.g.
    "query" or "eval") with the same feature dimension."""
    check_features("train_features", train_features)
    check_labels("train_labels", train_labels, train_features.shape[0],
                 features_name="train_features")
    check_features(f"{other}_features", other_features)
    check_labels(f"{other}_labels", other_labels, other_features.shape[0],
                 features_name=f"{other}_features")
    if other_features.shape[1] != train_features.shape[1]:
        raise UserError(f"{other}_features has {other_features.shape[1]} dimensions but "
                        f"train_features has {train_features.shape[1]}: expected the same")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}={value!r}: expected an integer >= 1")


def resolve_num_classes(num_classes: int | None, *labels: Tensor, names: tuple[str, ...]) -> int:
    """Number of classes: given, or one more than the largest label; labels must fit in it."""
    lows = [int(lab.min()) for lab in labels if lab.numel()]
    highs = [int(lab.max()) for lab in labels if lab.numel()]
    if lows and min(lows) < 0:
        raise UserError(f"{'/'.join(names)}: class labels must be >= 0, got {min(lows)}")
    if num_classes is None:
        return max(highs) + 1 if highs else 1
    check_positive_int("num_classes", num_classes)
    if highs and max(highs) >= num_classes:
        raise UserError(f"{'/'.join(names)}: label {max(highs)} does not fit "
                        f"num_classes={num_classes} (expected labels in [0, {num_classes}))")
    return num_classes


def topk_rows(scores: Tensor, labels: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """Per row, whether its label is among the `k` highest scores (k capped at the columns):
    a bool tensor (N,) per k. Ties between class scores go to the lower class index (stable
    descending sort)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = order == labels.to(order.device).view(-1, 1)
    return {k: hits[:, : min(k, scores.shape[1])].any(dim=1) for k in ks}


def topk_hits(scores: Tensor, labels: Tensor, ks: tuple[int, ...]) -> dict[int, int]:
    """Count of rows whose label is among the `k` highest scores (`topk_rows`)."""
    return {k: int(rows.sum()) for k, rows in topk_rows(scores, labels, ks).items()}
