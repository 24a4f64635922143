"""Paired comparisons with confidence intervals, test-set standard errors and rank
correlations: the statistics behind the leaderboard's verdicts. Plain numpy/scipy, no Ray.

[ours] **The design is paired and crossed.** Seed index s of every method shares the split,
the initial weights and the test images with seed index s of the reference (MoCo, or the
init row), and every final model is scored on the same N test images. A difference between
two methods therefore has three sources of noise: the seed (training randomness, a_s), the
test image (some images are easier for one method, b_i) and their interaction (e_si). The
question a reader asks -- "would this difference hold on another draw of seeds *and* of test
images?" -- needs all three, so the interval must come from both the seeds and the images:

    d_si = a_si - b_si  (method minus reference, per seed and test image)
    d_si = mu + a_s + b_i + e_si,  Var(mean d) = s2_seed / S + s2_image / N + s2_e / (S N).

**Why a random-effects model and not a two-way bootstrap.** The issue allows either. A
bootstrap that resamples S = 3 seeds sees at most 10 distinct seed sets; its percentile
interval treats 3 values as the whole seed distribution and is too narrow: in the
simulation of `tests/test_results_stats.py` (300 draws of 300 test images, one scratch run
of that simulation with a percentile bootstrap added), a seeds x images bootstrap covered
the true difference 85 % of the time with 3 seeds and 91 % with 5, not 95 %. The two-way
crossed random-effects model below estimates the variance of the mean difference by the
method of moments (the ANOVA mean squares of the S x N table of differences, unbiased) and
keeps the seed component's S - 1 degrees of freedom in a Student t interval
(Satterthwaite's approximation combines the seed and image terms' degrees of freedom),
which is exact for normal seed effects without an image term and covered 93 % (3 seeds) and
94 % (5 seeds) in the same simulation; the test asserts 90-99 %. With one seed (or a single
init evaluation against one seed) the seed term cannot be estimated and the interval is
the test-image one alone; `seeds` in the result says so.

Metrics that are ratios (mAP over the queries with another same-class item; part hits over
visible parts) enter as weighted means: an image's value v_si with weight w_i (0 for an
image that does not count), linearised as z_si = D + (w_i / mean w)(d_si - D) so that the
row means are the per-seed differences and the image component carries the ratio's own
sampling error (the delta method).

A difference is *significant* only where the 95 % interval excludes 0. `mde` is the smallest
true difference the design detects with 80 % power at that level, (t_0.975 + t_0.80) x SE:
what a study with these seeds and this test set can and cannot resolve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

LEVEL = 0.95  # two-sided confidence level of every interval
POWER = 0.80  # the power of the minimal detectable difference


def _weights(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per-image weights (N,): `weights` (or 1), 0 where any value of the column is NaN."""
    n = values.shape[-1]
    w = np.ones(n) if weights is None else np.asarray(weights, float).copy()
    w[~np.isfinite(w)] = 0.0
    w[~np.isfinite(values).all(axis=0)] = 0.0
    return w


def _mean_squares(z: np.ndarray) -> tuple[float, float, float]:
    """The ANOVA mean squares of the S x N table `z` (two-way crossed, one value per cell):
    seeds, images, residual (interaction); the residual is 0 with one seed."""
    s, n = z.shape
    grand = z.mean()
    rows = z.mean(axis=1)
    cols = z.mean(axis=0)
    ms_img = s * float(((cols - grand) ** 2).sum()) / (n - 1) if n > 1 else 0.0
    if s == 1:
        return 0.0, ms_img, 0.0
    ms_seed = n * float(((rows - grand) ** 2).sum()) / (s - 1)
    resid = z - rows[:, None] - cols[None, :] + grand
    ms_res = float((resid ** 2).sum()) / ((s - 1) * (n - 1)) if n > 1 else 0.0
    return ms_seed, ms_img, ms_res


def _mean_se(z: np.ndarray) -> tuple[float, float, float]:
    """Mean of `z` (S x N), its standard error under the crossed model and Satterthwaite's
    degrees of freedom. E[MS_seed] = s2_e + N s2_seed, E[MS_img] = s2_e + S s2_image,
    E[MS_res] = s2_e, so (MS_seed + MS_img - MS_res) / (S N) is unbiased for Var(mean) (no
    component is floored at 0 first: flooring adds a positive bias that, multiplied by the
    t quantile of 2 degrees of freedom, makes the interval far too wide); it is kept at
    least MS_res / (S N), the interaction's share, so it stays positive."""
    s, n = z.shape
    ms_seed, ms_img, ms_res = _mean_squares(z)
    if s == 1:
        terms = [(ms_img / n, n - 1)]
    else:
        terms = [(ms_seed / (s * n), s - 1), (ms_img / (s * n), n - 1),
                 (-ms_res / (s * n), (s - 1) * (n - 1))]
    var = max(sum(v for v, _ in terms), ms_res / (s * n))
    if var <= 0:
        return float(z.mean()), 0.0, math.inf
    denom = sum(v * v / d for v, d in terms if d > 0)
    df = max(var * var / denom, 1.0) if denom > 0 else math.inf
    return float(z.mean()), math.sqrt(var), df


def _linearised(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """z_si with row means equal to each seed's weighted mean (module docstring)."""
    keep = w > 0
    v, w = values[:, keep], w[keep]
    mean = float((v * w).sum() / (w.sum() * v.shape[0]))
    return mean + (w / w.mean()) * (v - mean)


def _interval(mean: float, se: float, df: float, seeds: int, images: int) -> dict[str, Any]:
    t = float(_st.t.ppf(0.5 + LEVEL / 2, df)) if math.isfinite(df) else float(
        _st.norm.ppf(0.5 + LEVEL / 2))
    t_power = float(_st.t.ppf(POWER, df)) if math.isfinite(df) else float(_st.norm.ppf(POWER))
    low, high = mean - t * se, mean + t * se
    return {"diff": mean, "low": low, "high": high, "se": se,
            "df": df if math.isfinite(df) else None, "seeds": seeds, "images": images,
            "significant": bool(low > 0 or high < 0), "mde": (t + t_power) * se}


def paired_difference(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None
                      ) -> dict[str, Any] | None:
    """Method `a` minus reference `b` on one metric, paired by seed and test image.

    `a` is (S, N): per seed index and test image, the image's value (NaN: it does not count);
    `b` is (S, N), the reference's values at the same seed indices, or (N,) / (1, N) for a
    reference evaluated once (the init row), the same for every seed. `weights` (N,) weigh
    the images of a ratio metric. Returns {diff, low, high, se, df, seeds, images,
    significant, mde} (the module docstring), or None when no image counts."""
    a = np.atleast_2d(np.asarray(a, float))
    b = np.atleast_2d(np.asarray(b, float))
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = np.broadcast_to(b, a.shape)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: shapes {a.shape} and {b.shape} do not pair")
    d = a - b
    w = _weights(d, weights)
    if not (w > 0).any():
        return None
    z = _linearised(d, w)
    mean, se, df = _mean_se(z)
    return _interval(mean, se, df, z.shape[0], z.shape[1])


def test_set_se(values: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """The standard error of a row's metric from its test set alone: the spread over test
    images of the seed-averaged per-image values (`values` (S, N), weighted as in
    `paired_difference`), over sqrt(N). What another draw of the same number of test images
    would move the mean by, seeds held fixed; None without values."""
    v = np.atleast_2d(np.asarray(values, float))
    w = _weights(v, weights)
    keep = w > 0
    if keep.sum() < 2:
        return None
    z = _linearised(v, w).mean(axis=0)
    return float(z.std(ddof=1) / math.sqrt(z.size))


def seed_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """The fallback without per-image outcomes (a study recorded before they were): the
    paired per-seed differences a_s - b_s (a single reference value is broadcast) and a t
    interval over seeds. It misses the test set's own sampling error; `images` is 0. One
    pair gives the difference without an interval (never significant)."""
    a_ = np.asarray(list(a), float)
    b_ = np.asarray(list(b), float)
    if b_.size == 1:
        b_ = np.full(a_.shape, float(b_[0]))
    if a_.size == 0 or a_.shape != b_.shape:
        return None
    d = a_ - b_
    if d.size < 2:  # one pair: a difference without any measure of its noise
        return {"diff": float(d[0]), "low": None, "high": None, "se": None, "df": None,
                "seeds": 1, "images": 0, "significant": False, "mde": None}
    se = float(d.std(ddof=1) / math.sqrt(d.size))
    return _interval(float(d.mean()), se, d.size - 1, d.size, 0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the average ranks); None with fewer than
    3 pairs or a constant side, where no ranking exists to compare."""
    x_, y_ = np.asarray(list(x), float), np.asarray(list(y), float)
    if x_.size < 3 or x_.size != y_.size:
        return None
    rx, ry = _ranks(x_), _ranks(y_)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else None
