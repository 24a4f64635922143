"""Weighted k-nearest-neighbour classification on frozen features.

The vote of InstDisc (Wu et al., CVPR 2018) as used by the kNN monitor of LCR's BYOL path
(GANPerf/LCR, module `tools/knn_monitor`): the k most cosine-similar train items each vote for
their class with weight exp(sim / T); the class with the largest summed weight wins.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fgray.errors import UserError
from fgray.eval._checks import (
    check_feature_pair,
    check_positive_int,
    resolve_num_classes,
    topk_rows,
)


@torch.no_grad()
def knn_classify(train_features: Tensor, train_labels: Tensor,
                 query_features: Tensor, query_labels: Tensor, *,
                 k: int = 200, temperature: float = 0.1, num_classes: int | None = None,
                 chunk_size: int = 1024, per_query: bool = False) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (percent, 0-100) of the weighted kNN vote; with
    `per_query`, also ``per_query``: {"top1", "top5"} float tensors (N,) on the CPU, 100 for
    a query the vote gets right and 0 otherwise (their means are top-1 and top-5), the
    per-image outcomes a paired test-image bootstrap resamples.

    Features are L2-normalised (cosine similarity, float32, on the train features' device).
    When `k` exceeds the number of train items all of them vote. Ties are broken
    deterministically: among equally similar train items the lower index is a neighbour
    first, and among equal class scores the lower class index ranks first. Classes are
    `0 .. num_classes-1` (default: one more than the largest label seen). Top-5 counts all
    classes when there are fewer than 5. Queries are processed `chunk_size` at a time.
    """
    check_feature_pair(train_features, train_labels, query_features, query_labels, "query")
    check_positive_int("k", k)
    check_positive_int("chunk_size", chunk_size)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise UserError(f"temperature={temperature!r}: expected a finite number > 0")
    classes = resolve_num_classes(num_classes, train_labels, query_labels,
                                  names=("train_labels", "query_labels"))

    bank = F.normalize(train_features.float(), dim=1)
    device = bank.device
    bank_labels = train_labels.to(device)
    query_labels = query_labels.to(device)
    neighbours = min(k, bank.shape[0])

    rows: dict[int, list[Tensor]] = {1: [], 5: []}
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start:start + chunk_size].to(device).float(), dim=1)
        sims = query @ bank.T
        top = torch.sort(sims, dim=1, descending=True, stable=True)
        sim, idx = top.values[:, :neighbours], top.indices[:, :neighbours]
        # Subtracting the row maximum rescales a row's class scores by one positive factor
        # (same ranking) and keeps exp() finite for small temperatures.
        weights = torch.exp((sim - sim[:, :1]) / temperature)
        scores = torch.zeros(query.shape[0], classes, device=device)
        scores.scatter_add_(1, bank_labels[idx], weights)
        for kk, hit in topk_rows(scores, query_labels[start:start + query.shape[0]],
                                 (1, 5)).items():
            rows[kk].append(hit.cpu())

    n = query_features.shape[0]
    hits = {kk: torch.cat(r).double() * 100.0 for kk, r in rows.items()}
    out: dict[str, Any] = {"top1": float(hits[1].sum()) / n, "top5": float(hits[5].sum()) / n}
    if per_query:
        out["per_query"] = {"top1": hits[1], "top5": hits[5]}
    return out
