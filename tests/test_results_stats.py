"""The paired comparison's interval, checked by simulation against a known true difference,
and its pieces against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from fgray.results import stats
from fgray.results.stats import paired_difference, seed_difference, spearman


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# A population of test images and training seeds: an image's difficulty u (shared by both
# methods), each method's own affinity g for it, a seed effect c shared by the two methods
# of a seed index (same split, same init) and each method's own seed effect a.
SD = {"u": 1.5, "g": 0.6, "c": 0.3, "a": 0.35}
BETA = (0.3, 0.0)  # the methods' effects on the logit


def _draw(rng, seeds: int, images: int):
    """One study: (S, N) hits (100 or 0) of the two methods on a fresh draw of test images
    and seeds."""
    u = rng.normal(0, SD["u"], images)
    c = rng.normal(0, SD["c"], seeds)[:, None]
    out = []
    for beta in BETA:
        p = _sigmoid(u + rng.normal(0, SD["g"], images) + beta + c
                     + rng.normal(0, SD["a"], seeds)[:, None])
        out.append(100.0 * (rng.random((seeds, images)) < p))
    return out


def _true_difference(m: int = 2_000_000) -> float:
    """E[accuracy A - accuracy B] over images and seeds, by a large Monte Carlo draw that
    shares nothing with the estimator."""
    rng = np.random.default_rng(12345)
    u, c = rng.normal(0, SD["u"], m), rng.normal(0, SD["c"], m)
    acc = [_sigmoid(u + rng.normal(0, SD["g"], m) + b + c + rng.normal(0, SD["a"], m)).mean()
           for b in BETA]
    return 100.0 * (acc[0] - acc[1])


@pytest.mark.parametrize("seeds", [3, 5])
def test_interval_covers_the_true_difference_95_percent_of_the_time(seeds):
    true = _true_difference()
    assert 3.0 < true < 7.0  # a real difference, a few points, as in the smoke study
    rng = np.random.default_rng(seeds)
    draws, covered, diffs, ses = 400, 0, [], []
    for _ in range(draws):
        a, b = _draw(rng, seeds, 300)
        r = paired_difference(a, b)
        covered += r["low"] <= true <= r["high"]
        diffs.append(r["diff"])
        ses.append(r["se"])
    assert 0.90 <= covered / draws <= 0.99
    # The standard error is calibrated: it matches the spread of the estimate over draws.
    assert 0.8 <= np.sqrt(np.mean(np.square(ses))) / np.std(diffs) <= 1.25


def test_weighted_ratio_interval_covers_the_true_difference():
    """Part hits: a ratio over visible parts, each image with its own number of them."""
    rng = np.random.default_rng(7)
    rates = (0.45, 0.40)  # the methods' hit probabilities per visible part
    true = 100.0 * (rates[0] - rates[1])
    draws, covered = 400, 0
    for _ in range(draws):
        visible = rng.integers(0, 6, 200).astype(float)  # 0 to 5 parts per image
        shift = rng.normal(0, 0.1, 200)  # image difficulty, shared
        rows = []
        for rate in rates:
            seed_shift = rng.normal(0, 0.03, (3, 1))
            p = np.clip(rate + shift + seed_shift, 0, 1)
            hits = rng.binomial(visible.astype(int), p).astype(float)
            with np.errstate(invalid="ignore"):
                rows.append(100.0 * hits / visible)  # NaN without a visible part
        r = paired_difference(rows[0], rows[1], weights=visible)
        covered += r["low"] <= true <= r["high"]
        # The estimate is the ratio of sums, seed by seed, averaged over seeds.
        ratio = [np.nansum(rows[0][s] * visible) / visible.sum()
                 - np.nansum(rows[1][s] * visible) / visible.sum() for s in range(3)]
        assert r["diff"] == pytest.approx(np.mean(ratio))
    assert 0.90 <= covered / draws <= 0.99


def test_one_seed_is_the_paired_test_image_interval():
    """With one seed the interval is the classical paired t interval over test images."""
    rng = np.random.default_rng(0)
    a = 100.0 * (rng.random((1, 300)) < 0.6)
    b = 100.0 * (rng.random((1, 300)) < 0.5)
    r = paired_difference(a, b)
    d = (a - b)[0]
    low, high = st.t.interval(0.95, d.size - 1, loc=d.mean(), scale=st.sem(d))
    assert (r["diff"], r["low"], r["high"]) == pytest.approx((d.mean(), low, high))
    assert r["seeds"] == 1 and r["images"] == 300


def test_reference_evaluated_once_pairs_with_every_seed():
    rng = np.random.default_rng(1)
    a = 100.0 * (rng.random((3, 100)) < 0.6)
    ref = 100.0 * (rng.random(100) < 0.4)
    assert paired_difference(a, ref) == paired_difference(a, np.tile(ref, (3, 1)))
    assert paired_difference(a, ref)["diff"] == pytest.approx(a.mean() - ref.mean())


def test_variance_components_against_a_hand_computation():
    """A 2 x 3 table: the method-of-moments standard error by hand."""
    d = np.array([[1.0, 2.0, 6.0], [3.0, 2.0, 10.0]])
    s, n = d.shape
    grand, rows, cols = d.mean(), d.mean(1), d.mean(0)
    ms_seed = n * ((rows - grand) ** 2).sum() / (s - 1)
    ms_img = s * ((cols - grand) ** 2).sum() / (n - 1)
    ms_res = ((d - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((s - 1) * (n - 1))
    var = (ms_seed + ms_img - ms_res) / (s * n)
    r = paired_difference(d, np.zeros_like(d))
    assert r["diff"] == pytest.approx(grand)
    assert r["se"] == pytest.approx(math.sqrt(var))


def test_image_se_and_seed_fallback():
    hits = np.array([[100.0, 0.0, 100.0, 100.0, 0.0, 100.0]])
    assert stats.test_set_se(hits) == pytest.approx(st.sem(hits[0]))
    r = seed_difference([50.0, 53.0, 55.0], [50.0, 52.0, 51.0])
    low, high = st.t.interval(0.95, 2, loc=5 / 3, scale=st.sem([0.0, 1.0, 4.0]))
    assert (r["diff"], r["low"], r["high"]) == pytest.approx((5 / 3, low, high))
    assert r["images"] == 0 and r["significant"] is False
    one = seed_difference([50.0], [40.0])
    assert one["diff"] == 10.0 and one["low"] is None and one["significant"] is False


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 5, 9).astype(float)
        y = x + rng.integers(-2, 3, 9)
        want = st.spearmanr(x, y).statistic
        got = spearman(x, y)
        if np.isnan(want):
            assert got is None
        else:
            assert got == pytest.approx(want)
    assert spearman([1, 2], [2, 1]) is None  # two trials: no ranking to trust
