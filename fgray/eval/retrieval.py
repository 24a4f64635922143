"""Leave-one-out image retrieval: Rank-1, Rank-5 and mAP over one evaluated split.

Follows the `validate` function of LCR's `main_moco.py` (GANPerf/LCR), which LoDisc reports
the same way: every image queries all the others, ranked by cosine similarity of L2-normalised
features. Differences from that code, all deliberate:

* Units: percent (0-100). LCR's code prints fractions (0-1); its paper tables are percent.
* A query whose class has no other image has no relevant item, so its AP is undefined (LCR's
  code divides by zero and its mAP becomes NaN). Here such queries are left out of mAP and
  count as misses for Rank-1/Rank-5 (they cannot retrieve a same-class item).
* Ties: LCR reverses an unstable `np.argsort`, so tied items come in arbitrary order. Here tied
  items are ranked lower index first (stable descending sort), which makes the numbers
  reproducible and independent of `chunk_size`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fgray.eval._checks import check_features, check_labels, check_positive_int


@torch.no_grad()
def retrieval_metrics(features: Tensor, labels: Tensor, *,
                      chunk_size: int = 1024, per_query: bool = False) -> dict[str, Any]:
    """Leave-one-out retrieval scores of `features` (N, D) with class `labels` (N,).

    Returns percentages (0-100):

    * ``rank1``: share of queries whose nearest other item has the query's class;
    * ``rank5``: share of queries with a same-class item among the 5 nearest others (all
      others when fewer than 5 exist);
    * ``map``: mean over queries of average precision over all same-class items in the
      ranking of the N-1 others. Queries without another same-class item are excluded from
      the mean (NaN when no query has one).

    Similarity is cosine (features are L2-normalised here, computed in float32 on the
    features' device). The query itself is excluded; ties go to the lower index. Queries are
    processed `chunk_size` at a time, so memory is O(chunk_size x N).

    With `per_query`, also ``per_query``: {"rank1", "rank5", "map"} float64 CPU tensors (N,)
    -- 100 or 0 per query for Rank-1/Rank-5, 100 x its AP for mAP (NaN for a query without
    another same-class item) -- whose means (NaN left out) are the three scores.
    """
    check_features("features", features, min_rows=2)
    check_labels("labels", labels, features.shape[0], features_name="features")
    check_positive_int("chunk_size", chunk_size)

    feats = F.normalize(features.float(), dim=1)
    labels = labels.to(feats.device)
    n = feats.shape[0]
    top = min(5, n - 1)
    # Float32 counts are exact up to 2**24 items, far beyond any evaluated split.
    ranks = torch.arange(1, n, device=feats.device, dtype=torch.float32)

    rank1_rows, rank5_rows, ap_rows = [], [], []
    for start in range(0, n, chunk_size):
        query = feats[start:start + chunk_size]
        rows = torch.arange(query.shape[0], device=feats.device)
        sims = query @ feats.T
        # Cosine similarities are finite, so -inf sends the query itself to the last place.
        sims[rows, start + rows] = float("-inf")
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, : n - 1]
        match = labels[order] == labels[start:start + query.shape[0]].unsqueeze(1)

        rank1_rows.append(match[:, 0].cpu())
        rank5_rows.append(match[:, :top].any(dim=1).cpu())

        relevant = match.float()
        num_relevant = relevant.sum(dim=1)
        precision_at_hits = relevant.cumsum(dim=1) / ranks * relevant
        ap = precision_at_hits.sum(dim=1) / num_relevant.clamp(min=1)
        ap = ap.double().cpu()
        ap[(num_relevant == 0).cpu()] = float("nan")
        ap_rows.append(ap)

    rank1 = torch.cat(rank1_rows).double() * 100.0
    rank5 = torch.cat(rank5_rows).double() * 100.0
    aps = torch.cat(ap_rows)
    has_relevant = ~aps.isnan()
    ap_queries = int(has_relevant.sum())
    out: dict[str, Any] = {
        "rank1": float(rank1.sum()) / n,
        "rank5": float(rank5.sum()) / n,
        "map": 100.0 * float(aps[has_relevant].sum()) / ap_queries if ap_queries
        else float("nan"),
    }
    if per_query:
        out["per_query"] = {"rank1": rank1, "rank5": rank5, "map": aps * 100.0}
    return out
