"""Retrieval, kNN and linear probes against independent brute-force computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fgray.errors import UserError
from fgray.eval import knn_classify, linear_probe_fast, linear_probe_paper, retrieval_metrics

# ---------------------------------------------------------------- brute-force references


def _cosine_table(queries: np.ndarray, items: np.ndarray) -> list[list[float]]:
    """Cosine similarity of every pair, one Python dot product per pair (float64)."""
    def unit(v: np.ndarray) -> list[float]:
        norm = math.sqrt(sum(float(a) * float(a) for a in v))
        return [float(a) / norm for a in v]

    q_units = [unit(q) for q in queries]
    i_units = [unit(i) for i in items]
    return [[sum(a * b for a, b in zip(q, i)) for i in i_units] for q in q_units]


def _brute_retrieval(features: np.ndarray, labels: list[int]) -> dict[str, float]:
    n = len(labels)
    sims = _cosine_table(features, features)
    rank1, rank5, aps = 0, 0, []
    for q in range(n):
        others = [j for j in range(n) if j != q]
        # Higher similarity first, ties to the lower index.
        ranking = sorted(others, key=lambda j: (-sims[q][j], j))
        same = [labels[j] == labels[q] for j in ranking]
        rank1 += same[0]
        rank5 += any(same[:5])
        if any(same):
            found, precisions = 0, []
            for position, hit in enumerate(same, start=1):
                if hit:
                    found += 1
                    precisions.append(found / position)
            aps.append(sum(precisions) / len(precisions))
    return {"rank1": 100 * rank1 / n, "rank5": 100 * rank5 / n,
            "map": 100 * sum(aps) / len(aps) if aps else float("nan")}


def _brute_knn(train: np.ndarray, train_labels: list[int], query: np.ndarray,
               query_labels: list[int], k: int, t: float, classes: int) -> dict[str, float]:
    sims = _cosine_table(query, train)
    top1 = top5 = 0
    for q, label in enumerate(query_labels):
        ranking = sorted(range(len(train_labels)), key=lambda j: (-sims[q][j], j))[:k]
        scores = [0.0] * classes
        for j in ranking:
            scores[train_labels[j]] += math.exp(sims[q][j] / t)
        order = sorted(range(classes), key=lambda c: (-scores[c], c))
        top1 += order[0] == label
        top5 += label in order[:5]
    return {"top1": 100 * top1 / len(query_labels), "top5": 100 * top5 / len(query_labels)}


def _with_duplicates(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features where a few rows repeat others exactly (tied similarities)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    feats[5] = feats[1]
    feats[9] = feats[1]
    feats[12] = feats[3]
    labels[9] = (labels[1] + 1) % classes
    labels[-1] = classes  # a class with one image
    return feats, labels


def _approx(expected: dict[str, float]) -> dict:
    return {k: pytest.approx(v, abs=1e-4, nan_ok=True) for k, v in expected.items()}


# ---------------------------------------------------------------- retrieval


def test_retrieval_hand_worked_example() -> None:
    # Unit vectors at 0, 10, 30 and 100 degrees; item 2 is alone in its class.
    angles = torch.tensor([0.0, 10.0, 30.0, 100.0]).deg2rad()
    feats = torch.stack([angles.cos(), angles.sin()], dim=1)
    result = retrieval_metrics(feats, torch.tensor([0, 0, 1, 0]))
    # Query 0 ranks 1,2,3 (hits at 1, 3): AP 5/6; query 1 ranks 0,2,3: AP 5/6;
    # query 3 ranks 2,1,0 (hits at 2, 3): AP 7/12; query 2 has no relevant item.
    assert result["rank1"] == pytest.approx(50.0)
    assert result["rank5"] == pytest.approx(75.0)
    assert result["map"] == pytest.approx(100 * (5 / 6 + 5 / 6 + 7 / 12) / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_brute_force_with_ties_and_singletons(seed: int) -> None:
    feats, labels = _with_duplicates(40, 6, 4, seed)
    expected = _brute_retrieval(feats.double().numpy(), labels.tolist())
    assert retrieval_metrics(feats, labels) == _approx(expected)


def test_retrieval_chunk_size_does_not_change_results() -> None:
    feats, labels = _with_duplicates(37, 5, 3, seed=2)
    reference = retrieval_metrics(feats, labels, chunk_size=1024)
    for chunk in (1, 3, 16, 37):
        assert retrieval_metrics(feats, labels, chunk_size=chunk) == reference


def test_retrieval_rank5_uses_all_others_when_fewer_than_five() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2]])
    labels = torch.tensor([0, 1, 1, 0])
    result = retrieval_metrics(feats, labels)
    assert result["rank5"] == 100.0  # every query has its class among its 3 others
    assert result == _approx(_brute_retrieval(feats.double().numpy(), labels.tolist()))


def test_retrieval_without_any_relevant_pair_has_nan_map() -> None:
    result = retrieval_metrics(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert result["rank1"] == 0.0 and result["rank5"] == 0.0
    assert math.isnan(result["map"])


def test_retrieval_perfect_clusters_score_100() -> None:
    centres = torch.eye(3) * 10
    labels = torch.arange(3).repeat_interleave(4)
    feats = centres[labels] + 0.01 * torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    assert retrieval_metrics(feats, labels) == _approx({"rank1": 100, "rank5": 100, "map": 100})


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((torch.randn(5, 3), torch.zeros(4, dtype=torch.long)), {}, "labels: expected shape (5,)"),
    ((torch.randn(1, 3), torch.zeros(1, dtype=torch.long)), {}, "at least 2 rows"),
    ((torch.randn(5), torch.zeros(5, dtype=torch.long)), {}, "expected shape (N, D)"),
    ((torch.randn(5, 3), torch.zeros(5)), {}, "expected integer class labels"),
    ((torch.randn(5, 3), torch.zeros(5, dtype=torch.long)), {"chunk_size": 0}, "chunk_size=0"),
    ((torch.full((5, 3), float("nan")), torch.zeros(5, dtype=torch.long)), {}, "NaN"),
])
def test_retrieval_rejects_bad_inputs(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        retrieval_metrics(*args, **kwargs)
    assert message in str(err.value)


# ---------------------------------------------------------------- kNN


@pytest.mark.parametrize(("k", "t"), [(1, 0.1), (5, 0.1), (7, 0.5), (500, 0.07)])
def test_knn_matches_brute_force(k: int, t: float) -> None:
    train, train_labels = _with_duplicates(45, 6, 5, seed=3)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(23, 6, generator=gen)
    query[0] = train[1]  # a query exactly on a duplicated train vector
    query_labels = torch.randint(0, 6, (23,), generator=gen)
    expected = _brute_knn(train.double().numpy(), train_labels.tolist(), query.double().numpy(),
                          query_labels.tolist(), k, t, classes=6)
    result = knn_classify(train, train_labels, query, query_labels, k=k, temperature=t)
    assert result == _approx(expected)


def test_knn_k_larger_than_train_set_uses_all_of_it() -> None:
    train, labels = _with_duplicates(30, 4, 3, seed=5)
    query = torch.randn(10, 4, generator=torch.Generator().manual_seed(6))
    qlabels = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(7))
    assert (knn_classify(train, labels, query, qlabels, k=10_000)
            == knn_classify(train, labels, query, qlabels, k=30))


def test_knn_chunk_size_does_not_change_results() -> None:
    train, labels = _with_duplicates(30, 4, 3, seed=8)
    query = torch.randn(17, 4, generator=torch.Generator().manual_seed(9))
    qlabels = torch.randint(0, 4, (17,), generator=torch.Generator().manual_seed(10))
    reference = knn_classify(train, labels, query, qlabels, k=6, chunk_size=1024)
    for chunk in (1, 4, 17):
        assert knn_classify(train, labels, query, qlabels, k=6, chunk_size=chunk) == reference


def test_knn_ties_go_to_lower_index_then_lower_class() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    train_labels = torch.tensor([2, 0, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    # k=1: items 0 and 2 tie; item 0 (class 2) is the neighbour.
    assert knn_classify(train, train_labels, query, torch.tensor([2]), k=1)["top1"] == 100.0
    # k=2: classes 2 and 1 get equal votes; class 1 (lower index) ranks first.
    assert knn_classify(train, train_labels, query, torch.tensor([1]), k=2)["top1"] == 100.0
    result = knn_classify(train, train_labels, query, torch.tensor([2]), k=2)
    assert result == {"top1": 0.0, "top5": 100.0}


def test_knn_small_temperature_stays_finite() -> None:
    # exp(1 / 0.005) = exp(200) overflows float32 unless the vote is rescaled.
    train, labels = _with_duplicates(20, 4, 3, seed=11)
    query = torch.randn(15, 4, generator=torch.Generator().manual_seed(12))
    qlabels = torch.randint(0, 4, (15,), generator=torch.Generator().manual_seed(13))
    expected = _brute_knn(train.double().numpy(), labels.tolist(), query.double().numpy(),
                          qlabels.tolist(), 5, 0.005, classes=4)
    result = knn_classify(train, labels, query, qlabels, k=5, temperature=0.005)
    assert result == _approx(expected)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 0}, "k=0: expected an integer >= 1"),
    ({"temperature": 0.0}, "temperature=0.0: expected a finite number > 0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"num_classes": 2}, "does not fit num_classes=2"),
    ({"chunk_size": -3}, "chunk_size=-3"),
])
def test_knn_rejects_bad_settings(kwargs: dict, message: str) -> None:
    train, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(UserError) as err:
        knn_classify(train, labels, train, labels, **kwargs)
    assert message in str(err.value)


def test_knn_rejects_mismatched_shapes() -> None:
    labels = torch.tensor([0, 1, 0])
    with pytest.raises(UserError, match="expected the same"):
        knn_classify(torch.randn(3, 4), labels, torch.randn(3, 5), labels)
    with pytest.raises(UserError, match=r"query_labels: expected shape \(2,\)"):
        knn_classify(torch.randn(3, 4), labels, torch.randn(2, 4), labels)
    with pytest.raises(UserError, match="must be >= 0"):
        knn_classify(torch.randn(3, 4), torch.tensor([0, -1, 0]), torch.randn(3, 4), labels)


# ---------------------------------------------------------------- linear probe (fast)


def _blobs(n_per: int, classes: int, d: int, seed: int, spread: float = 6.0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(100)) * spread
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), d, generator=gen), labels


def test_linear_fast_separates_gaussian_blobs() -> None:
    xtr, ytr = _blobs(40, 5, 16, seed=0)
    xte, yte = _blobs(30, 5, 16, seed=1)
    result = linear_probe_fast(xtr * 50 + 3, ytr, xte * 50 + 3, yte, epochs=30, batch_size=64)
    assert result["top1"] >= 99.0
    assert result["train_top1"] >= 99.0
    assert result["top5"] == 100.0  # 5 classes: top-5 covers all


def test_linear_fast_random_labels_stay_near_chance() -> None:
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(300, 16, generator=gen), torch.randint(0, 4, (300,), generator=gen)
    xte, yte = torch.randn(400, 16, generator=gen), torch.randint(0, 4, (400,), generator=gen)
    result = linear_probe_fast(xtr, ytr, xte, yte, epochs=30, batch_size=64)
    assert 10.0 <= result["top1"] <= 40.0  # chance is 25 %


def test_linear_fast_is_deterministic_and_seeded() -> None:
    xtr, ytr = _blobs(20, 3, 8, seed=2, spread=0.7)
    xte, yte = _blobs(20, 3, 8, seed=3, spread=0.7)
    first = linear_probe_fast(xtr, ytr, xte, yte, epochs=5, batch_size=16, seed=1)
    assert linear_probe_fast(xtr, ytr, xte, yte, epochs=5, batch_size=16, seed=1) == first


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, "epochs=0"),
    ({"lr": 0.0}, "lr=0.0: expected a finite number > 0"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0"),
    ({"batch_size": 0}, "batch_size=0"),
])
def test_linear_fast_rejects_bad_settings(kwargs: dict, message: str) -> None:
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(UserError, match=message):
        linear_probe_fast(x, y, x, y, **kwargs)


def test_linear_fast_rejects_mismatched_dimensions() -> None:
    y = torch.tensor([0, 1])
    with pytest.raises(UserError, match="eval_features has 4 dimensions"):
        linear_probe_fast(torch.randn(2, 3), y, torch.randn(2, 4), y)


# ---------------------------------------------------------------- linear probe (paper)


def _colour_images(n_per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 uint8 images whose class sets which channel is bright."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per)
    images = torch.randint(0, 60, (len(labels), 3, 8, 8), generator=gen)
    images[torch.arange(len(labels)), labels] += 150
    return images.to(torch.uint8), labels


class _TinyEmbed(nn.Module):
    """Channel means through a fixed random linear map; records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.modes: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.proj(images.mean(dim=(2, 3)))


def _train_tf(batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    assert len(rows) == batch.shape[0]
    flip = torch.rand(batch.shape[0]) < 0.5
    batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    return batch.float() / 255.0


def _eval_tf(batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    assert len(rows) == batch.shape[0]
    return batch.float() / 255.0


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_linear_paper_beats_chance_on_separable_images(schedule: str) -> None:
    torch.manual_seed(0)
    embed = _TinyEmbed()
    embed.train()
    xtr, ytr = _colour_images(16, seed=0)
    xte, yte = _colour_images(10, seed=1)
    lr = None if schedule == "step" else 2.0  # cosine default (0.5 x 16/256) is tiny here
    result = linear_probe_paper(embed, xtr, ytr, xte, yte, train_transform=_train_tf,
                                eval_transform=_eval_tf, feature_dim=6, num_classes=3,
                                schedule=schedule, epochs=4, batch_size=16, lr=lr)
    assert result["top1"] >= 80.0  # chance is 33 %
    assert result["top5"] == 100.0
    assert math.isfinite(result["train_loss"])
    assert embed.modes and not any(embed.modes)  # the backbone ran in eval mode
    assert embed.training  # and its mode was restored


def test_linear_paper_reads_memory_mapped_arrays_deterministically(tmp_path) -> None:
    xtr, ytr = _colour_images(10, seed=2)
    xte, yte = _colour_images(6, seed=3)
    mm = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.uint8,
                                   shape=tuple(xtr.shape))
    mm[:] = xtr.numpy()
    mm.flush()
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    torch.manual_seed(0)
    embed = _TinyEmbed()
    kwargs = dict(train_transform=_train_tf, eval_transform=_eval_tf, feature_dim=6,
                  num_classes=3, epochs=2, batch_size=8, seed=5)
    state = torch.random.get_rng_state()
    from_mmap = linear_probe_paper(embed, mm, ytr.numpy(), xte, yte, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    from_tensor = linear_probe_paper(embed, xtr, ytr, xte, yte, **kwargs)
    assert from_mmap == from_tensor


def test_linear_paper_rejects_bad_inputs() -> None:
    xtr, ytr = _colour_images(4, seed=0)
    kwargs = dict(train_transform=_eval_tf, eval_transform=_eval_tf, feature_dim=6,
                  num_classes=3, epochs=1, batch_size=4)
    embed = _TinyEmbed()
    with pytest.raises(UserError, match="expected uint8 pixels"):
        linear_probe_paper(embed, xtr.float(), ytr, xtr, ytr, **kwargs)
    with pytest.raises(UserError, match=r"expected shape \(N, 3, H, W\)"):
        linear_probe_paper(embed, xtr[:, :1], ytr, xtr, ytr, **kwargs)
    with pytest.raises(UserError, match=r"train_labels: expected shape \(12,\)"):
        linear_probe_paper(embed, xtr, ytr[:5], xtr, ytr, **kwargs)
    with pytest.raises(UserError, match="schedule='linear'"):
        linear_probe_paper(embed, xtr, ytr, xtr, ytr, **{**kwargs, "schedule": "linear"})
    with pytest.raises(UserError, match=r"embed_fn returned shape \(4, 6\)"):
        linear_probe_paper(embed, xtr, ytr, xtr, ytr, **{**kwargs, "feature_dim": 5})
