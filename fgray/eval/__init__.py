"""Evaluation protocols on frozen features: retrieval, kNN, linear probes, localisation."""

from fgray.eval.knn import knn_classify
from fgray.eval.linear import linear_probe_fast, linear_probe_paper
from fgray.eval.localisation import box_scores, part_hit_rate
from fgray.eval.retrieval import retrieval_metrics

__all__ = [
    "box_scores",
    "knn_classify",
    "linear_probe_fast",
    "linear_probe_paper",
    "part_hit_rate",
    "retrieval_metrics",
]
