"""Leaderboard numbers against an independent pandas computation; renderings; plots."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os

import numpy as np
import pandas as pd
import pytest

from fgray.errors import UserError
from fgray.results import append, leaderboard, load, plots, render, results_command
from fgray.results.schema import TEST_METRICS, param_fields
from fgray.results.tensorboard import HPARAMS_FILE

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 3, 1, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (method, trial, status, best val, config hash, seed, gpu h, cpu h, start offset h, searched)
TRIALS = [
    ("moco", "m1", "completed", 0.61, "h1", 0, 0.5, 0.1, 0, {"lr": 0.03, "tau": 0.2}),
    ("moco", "m2", "stopped", 0.72, "h2", 0, 0.25, 0.05, 1, {"lr": 0.1, "tau": 0.1}),
    ("moco", "m3", "failed", None, "h3", 0, 0.05, None, 2, {"lr": 0.9, "tau": 0.05}),
    ("moco", "m4", "completed", 0.70, "h2", 1, 0.5, 0.1, 3, {"lr": 0.1, "tau": 0.1}),
    ("moco", "m5", "completed", 0.69, "h2", 2, 0.5, 0.1, 4, {"lr": 0.1, "tau": 0.1}),
    ("lcr", "l1", "completed", 0.55, "g1", 0, 1.0, 0.2, 0, {"lam": 0.5}),
    ("lcr", "l2", "running", None, "g2", 0, None, None, 1, {"lam": 0.1}),
    ("lcr", "l3", "stopped", 0.40, "g3", 0, 0.1, 0.0, 2, {"lam": 0.9}),
]

# Final test evaluations of moco's best configuration (h2) over three seeds, plus rows that
# must not count: another configuration's (m1), validation rows, an unmapped protocol.
EVAL_VALUES = {
    ("m2", 0): {"rank1": 0.50, "rank5": 0.80, "map": 0.30, "knn": 0.55, "linear": 0.60},
    ("m4", 1): {"rank1": 0.54, "rank5": 0.82, "map": 0.33, "knn": 0.57, "linear": 0.63},
    ("m5", 2): {"rank1": 0.49, "rank5": 0.79, "map": 0.31, "knn": 0.52, "linear": 0.62},
    ("m1", 0): {"rank1": 0.99, "rank5": 0.99, "map": 0.99, "knn": 0.99, "linear": 0.99},
}
_PROTOCOL = {"rank1": ("retrieval", "rank1"), "rank5": ("retrieval", "rank5"),
             "map": ("retrieval", "map"), "knn": ("knn", "top1"), "linear": ("linear", "top1")}


def _trial_row(spec, status=None) -> dict:
    method, tid, st, val, chash, seed, gpu, cpu, start_h, searched = spec
    start = T0 + dt.timedelta(hours=start_h)
    row = {"study": "s", "trial_id": tid, "method": method, "status": status or st,
           "best_val_knn_top1": val, "best_epoch": 3, "epochs_run": 4, "seed": seed,
           "config_hash": chash, "gpu_hours": gpu, "cpu_hours": cpu, "start_time": start,
           "end_time": start + dt.timedelta(minutes=30), "backbone": "test_resnet",
           "dataset": "synthetic", "image_size": 32, "error": "OOM" if st == "failed" else None}
    row.update(param_fields(searched, {"epochs": 4, "batch_size": 16}))
    if tid == "l1":
        row.update(test_rank1=0.45, test_knn_top1=0.47)  # no evals rows: trials columns used
    return row


def _eval_rows() -> list[dict]:
    rows = []
    for (tid, seed), values in EVAL_VALUES.items():
        for key, value in values.items():
            protocol, metric = _PROTOCOL[key]
            rows.append({"study": "s", "trial_id": tid, "method": "moco", "split": "test",
                         "protocol": protocol, "metric": metric, "value": value, "seed": seed})
    rows.append({"trial_id": "m2", "method": "moco", "split": "val", "protocol": "knn",
                 "metric": "top1", "value": 0.01, "seed": 0})
    rows.append({"trial_id": "m2", "method": "moco", "split": "test",
                 "protocol": "localisation", "metric": "iou", "value": 0.3, "seed": 0})
    return rows


@pytest.fixture()
def study(tmp_path):
    path = str(tmp_path / "study")
    # m2 first reports "running", then its final state: the final state must win.
    append(path, "trials", [_trial_row(TRIALS[1], status="running") | {
        "best_val_knn_top1": 0.99, "end_time": None}])
    for spec in TRIALS:
        append(path, "trials", [_trial_row(spec)])
    append(path, "evals", _eval_rows())
    epochs = []
    for method, tid, *_ in TRIALS:
        for epoch in range(4):
            epochs.append({"study": "s", "trial_id": tid, "method": method, "epoch": epoch,
                           "val_knn_top1": 0.1 * epoch + len(tid) / 100, "loss": 2.0 - epoch / 4,
                           "lr": 0.01})
    append(path, "epochs", epochs)
    return path


def _expected(path: str) -> dict[str, dict]:
    """The leaderboard, computed independently with pandas."""
    trials = pd.read_parquet(os.path.join(path, "tables", "trials"))
    trials["method"] = trials["method"].astype(str)
    trials = trials.sort_values("end_time", na_position="first")
    trials = trials.drop_duplicates(["method", "trial_id"], keep="last")
    evals = pd.read_parquet(os.path.join(path, "tables", "evals"))
    evals["method"] = evals["method"].astype(str)
    evals = evals[evals["split"] == "test"]
    column = {("retrieval", "rank1"): "test_rank1", ("retrieval", "rank5"): "test_rank5",
              ("retrieval", "map"): "test_map", ("knn", "top1"): "test_knn_top1",
              ("linear", "top1"): "test_linear_top1"}
    evals = evals.assign(col=[column.get((p, m)) for p, m in zip(evals.protocol, evals.metric)])
    out = {}
    for method, group in trials.groupby("method"):
        ranked = group[group.status.isin(["completed", "stopped"])]
        best = ranked.loc[ranked.best_val_knn_top1.idxmax()]
        same = group[group.config_hash == best.config_hash].trial_id
        mine = evals[(evals.method == method) & evals.trial_id.isin(same)]
        row = {"best_trial": best.trial_id, "val_knn_top1": best.best_val_knn_top1,
               "params": json.loads(best.params_json),
               "trials_completed": int((group.status == "completed").sum()),
               "trials_stopped": int((group.status == "stopped").sum()),
               "trials_failed": int((group.status == "failed").sum()),
               "trials_running": int((group.status == "running").sum()),
               "gpu_hours": group.gpu_hours.sum(), "cpu_hours": group.cpu_hours.sum()}
        for col in TEST_METRICS:
            values = mine[mine.col == col].value
            if values.empty:
                values = group[group.config_hash == best.config_hash][col].dropna()
            row[col] = values.mean() if len(values) else None
            row[f"{col}_std"] = values.std() if len(values) >= 2 else None
            row[f"{col}_n"] = len(values)
        out[method] = row
    return out


def _assert_close(got, want):
    if want is None or (isinstance(want, float) and np.isnan(want)):
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-12)


def test_leaderboard_matches_independent_pandas(study):
    rows = {r["method"]: r for r in leaderboard(study)}
    expected = _expected(study)
    assert sorted(rows) == sorted(expected) == ["lcr", "moco"]
    for method, want in expected.items():
        got = rows[method]
        for key, value in want.items():
            if key == "params" or key.startswith("trials_") or key.endswith("_n"):
                assert got[key] == value, (method, key)
            elif key == "best_trial":
                assert got[key] == value
            else:
                _assert_close(got[key], value)
    moco = rows["moco"]
    # Hand check of the pandas reference itself: three seeds of configuration h2.
    assert moco["best_trial"] == "m2" and moco["test_rank1_n"] == 3
    assert moco["test_rank1"] == pytest.approx((0.50 + 0.54 + 0.49) / 3)
    assert moco["test_rank1_std"] == pytest.approx(np.std([0.50, 0.54, 0.49], ddof=1))
    assert moco["searched"] == {"lr": 0.1, "tau": 0.1}
    assert moco["params"] == {"lr": 0.1, "tau": 0.1, "epochs": 4, "batch_size": 16}
    lcr = rows["lcr"]
    assert lcr["test_rank1"] == 0.45 and lcr["test_rank1_std"] is None
    assert lcr["test_map"] is None and lcr["test_map_n"] == 0
    assert lcr["trials_running"] == 1


def test_render_formats(study):
    rows = leaderboard(study)
    parsed = json.loads(render(rows, "json"))
    for got, want in zip(parsed, rows):
        assert got["method"] == want["method"]
        for key in ("val_knn_top1", "gpu_hours", *TEST_METRICS):
            assert got[key] == want[key]
        assert got["params"] == want["params"]

    reader = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    header = render(rows, "csv").splitlines()[0].split(",")
    assert header[:7] == ["method", "backbone", "init", "best_trial", "best_epoch",
                          "config_hash", "val_knn_top1"]
    assert [r["method"] for r in reader] == [r["method"] for r in rows]
    for got, want in zip(reader, rows):
        assert float(got["test_rank1"]) == want["test_rank1"]
        assert json.loads(got["params"]) == want["params"]

    markdown = render(rows, "markdown").splitlines()
    assert markdown[0].startswith("| method | backbone | best_trial | val_knn_top1 | test_rank1 |")
    assert set(markdown[1]) == {"|", "-"}
    moco_line = next(line for line in markdown if line.startswith("| moco |"))
    mean, std = rows[1]["test_rank1"], rows[1]["test_rank1_std"]
    assert f"{mean:.2f} ± {std:.2f}" in moco_line  # percent: two decimals
    assert "lr=0.1, tau=0.1" in moco_line and "| test_resnet |" in moco_line
    assert markdown[-1].startswith("Metrics: mean ± std over seeds. knn test se:")

    table = render(rows, "wide").splitlines()
    assert table[0].split()[:4] == ["method", "backbone", "best_trial", "val_knn_top1"]
    assert table[2].split()[:4] == ["lcr", "test_resnet", "l1", "0.55"]
    # Columns are aligned: every header starts where its cells start.
    start = table[0].index("val_knn_top1")
    assert table[2][start:].startswith("0.55") and table[3][start:].startswith("0.72")
    lcr_cells = table[2][table[0].index("vs moco"):].split()
    # lcr's one kNN value (0.47, seed 0) pairs with moco's seed 0 (0.55): one seed, a
    # difference without an interval.
    assert lcr_cells[:3] == ["-0.1", "(1", "seed)"]

    with pytest.raises(UserError, match="--format 'xml': expected one of table, wide, csv, "
                                        "markdown, json, html"):
        render(rows, "xml")


def test_results_command_with_tensorboard(study):
    out = results_command(study, "table", tensorboard=True)
    assert out.splitlines()[0].startswith("method")
    assert f"TensorBoard: tensorboard --logdir {study}/tensorboard" in out
    assert os.path.isfile(os.path.join(study, "tensorboard", "moco", "m2", HPARAMS_FILE))
    data = json.loads(results_command(study, "json", tensorboard=True))
    assert data["tensorboard"] == f"tensorboard --logdir {study}/tensorboard"
    assert [r["method"] for r in data["leaderboard"]] == ["lcr", "moco"]
    lcr_vs_moco = data["leaderboard"][0]["vs_moco"]["test_knn_top1"]
    assert lcr_vs_moco["diff"] == pytest.approx(0.47 - 0.55) and lcr_vs_moco["seeds"] == 1
    assert lcr_vs_moco["significant"] is False and lcr_vs_moco["low"] is None
    assert json.loads(results_command(study, "json")) == json.loads(
        render(leaderboard(study), "json"))
    with pytest.raises(UserError, match="--format"):
        results_command(study, "yaml")


def test_results_command_on_missing_or_empty_study(tmp_path):
    with pytest.raises(UserError, match="not an fgray study"):
        results_command(str(tmp_path / "missing"))
    (tmp_path / "empty" / "tables").mkdir(parents=True)
    out = results_command(str(tmp_path / "empty"))
    assert "(no trials recorded yet)" in out
    assert json.loads(results_command(str(tmp_path / "empty"), "json")) == []


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_plots_without_optuna_journal(study):
    notes: list[str] = []
    paths = plots(study, notes=notes)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["best_so_far.png", "cost_vs_accuracy.png", "val_vs_epoch_lcr.png",
                     "val_vs_epoch_moco.png"]
    assert all(os.path.dirname(p) == os.path.join(study, "plots") for p in paths)
    assert all(_is_png(p) for p in paths)
    assert any("no Optuna journal" in n for n in notes)


def test_plots_param_importance_from_optuna_journal(study, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.join(study, "optuna"))
    storage = optuna.storages.JournalStorage(
        JournalFileBackend(os.path.join(study, "optuna", "journal.log")))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    moco = optuna.create_study(study_name="cub-moco", storage=storage, direction="maximize",
                               sampler=optuna.samplers.RandomSampler(seed=0))
    moco.set_user_attr("method", "moco")
    moco.optimize(lambda t: -(np.log10(t.suggest_float("lr", 1e-4, 1, log=True)) + 2) ** 2
                  + 0 * t.suggest_float("tau", 0.05, 0.5), n_trials=12)
    lonely = optuna.create_study(study_name="lcr", storage=storage, direction="maximize")
    lonely.optimize(lambda t: t.suggest_float("lam", 0, 1), n_trials=1)

    out_dir = str(tmp_path / "figs")
    notes: list[str] = []
    paths = plots(study, out_dir=out_dir, notes=notes)
    names = {os.path.basename(p) for p in paths}
    assert "param_importance_moco.png" in names and "param_importance_lcr.png" not in names
    assert all(_is_png(p) and p.startswith(out_dir) for p in paths)
    assert any("'lcr': 1 completed trial(s), need 2" in n for n in notes)

    text = results_command(study, "table", plots=True)
    assert "plots:" in text and "param_importance_moco.png" in text
    assert os.path.exists(os.path.join(study, "plots", "param_importance_moco.png"))


def test_load_sees_all_rows_written_for_report(study):
    # One row per trial (m2's final state), 9 states in its history (m2 twice),
    # 4 x 5 + 2 eval rows, 8 x 4 epoch rows.
    assert load(study, "trials").num_rows == len(TRIALS)
    assert load(study, "trial_events").num_rows == len(TRIALS) + 1
    assert load(study, "evals").num_rows == 22
    assert load(study, "epochs").num_rows == 32


# ---------------------------------------------------------------- init row and significance

LITE0 = "tf_efficientnet_lite0.in1k"
# Test kNN top-1 per seed; moco's seeds pair with every other method's by seed index, the
# init row (40, one evaluation) with every seed. No per-image outcomes: the comparison is
# the paired t interval over seeds, checked against scipy below.
KNN = {"moco": [50.0, 52.0, 54.0], "lcr": [53.0, 56.0, 55.0], "sdf": [60.0, 61.0, 62.0],
       "ppssl": [52.5], "lodisc": [39.0, 40.0, 41.0]}


def _paired_t(a, b):
    """(diff, low, high) of the paired 95 % t interval, by scipy."""
    from scipy import stats as st

    d = np.asarray(a, float) - np.asarray(b, float)
    low, high = st.t.interval(0.95, d.size - 1, loc=d.mean(), scale=st.sem(d))
    return d.mean(), low, high


@pytest.fixture()
def compared(tmp_path):
    path = str(tmp_path / "cmp")
    trials, evals = [], []
    for method, values in KNN.items():
        for seed, value in enumerate(values):
            tid = f"{method}{seed}"
            trials.append({"study": "s", "trial_id": tid, "method": method,
                           "status": "completed", "best_val_knn_top1": 30.0 + seed,
                           "seed": seed, "config_hash": f"h-{method}", "backbone": LITE0,
                           "init": "imagenet", "start_time": T0, "end_time": T0,
                           "cpu_hours": 0.1})
            evals.append({"study": "s", "trial_id": tid, "method": method, "split": "test",
                          "protocol": "knn", "metric": "top1", "value": value, "seed": seed})
            evals.append({"study": "s", "trial_id": tid, "method": method, "split": "test",
                          "protocol": "localisation", "metric": "box_mass",
                          "value": 0.5 + seed / 100, "seed": seed})
    trials.append({"study": "s", "trial_id": "init", "method": "init", "status": "completed",
                   "best_val_knn_top1": 20.0, "seed": 0, "config_hash": "h-init",
                   "backbone": LITE0, "init": "imagenet", "start_time": T0, "end_time": T0})
    evals.append({"study": "s", "trial_id": "init", "method": "init", "split": "test",
                  "protocol": "knn", "metric": "top1", "value": 40.0, "seed": 0})
    append(path, "trials", trials)
    append(path, "evals", evals)
    return path


def test_init_row_first_and_significance_marks(compared):
    rows = leaderboard(compared)
    assert [r["method"] for r in rows] == ["init", "lcr", "lodisc", "moco", "ppssl", "sdf"]
    by = {r["method"]: r for r in rows}
    assert by["init"]["is_init"] and by["init"]["test_knn_top1"] == 40.0
    assert by["init"]["test_knn_top1_std"] is None and by["init"]["test_knn_top1_n"] == 1
    assert by["moco"]["test_knn_top1"] == pytest.approx(52.0)
    assert by["moco"]["test_knn_top1_std"] == pytest.approx(2.0)
    for method in ("lcr", "sdf", "lodisc"):
        for ref, ref_values in (("vs_moco", KNN["moco"]), ("vs_init", [40.0] * 3)):
            got = by[method]["vs_" + ref[3:]]["test_knn_top1"]
            diff, low, high = _paired_t(KNN[method], ref_values)
            assert (got["diff"], got["low"], got["high"]) == pytest.approx((diff, low, high))
            assert got["significant"] is bool(low > 0 or high < 0)
            assert got["basis"] == "seeds only" and got["seeds"] == 3
    assert by["sdf"]["vs_moco"]["test_knn_top1"]["significant"] is True
    assert by["lcr"]["vs_moco"]["test_knn_top1"]["significant"] is False
    # One seed (ppssl): the difference, no interval, never significant.
    assert by["ppssl"]["vs_init"]["test_knn_top1"]["diff"] == pytest.approx(12.5)
    assert by["ppssl"]["vs_init"]["test_knn_top1"]["low"] is None
    assert by["ppssl"]["vs_init"]["test_knn_top1"]["significant"] is False
    # Every metric is compared; one missing on either side gives no comparison.
    box = by["sdf"]["vs_moco"]["test_loc_box_mass"]
    assert box["diff"] == pytest.approx(0.0) and box["significant"] is False
    assert by["sdf"]["vs_init"]["test_loc_box_mass"] is None
    assert by["init"]["vs_moco"] is None and by["moco"]["vs_moco"] is None
    # The note says how LoDisc ran on a CNN; the init row says what it is.
    assert by["lodisc"]["note"] == "cnn location map [ours]" and by["moco"]["note"] is None
    assert by["init"]["note"] == "initial weights, no SSL"

    table = render(rows, "wide").splitlines()
    header = table[0]
    for line in table[2:2 + len(rows)]:
        method = line.split()[0]
        vs_moco = line[header.index("vs moco"):header.index("vs init")].strip()
        for ref, text in (("vs_moco", vs_moco),):
            c = (by[method][ref] or {}).get("test_knn_top1")
            if c is None:
                assert text == "-", method
            elif c["low"] is None:
                assert text == f"{c['diff']:+.1f} (1 seed)"
            else:
                star = "*" if c["significant"] else ""
                assert text == f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]{star}"
        assert f"{LITE0} (imagenet)" in line
    moco_line = next(line for line in table if line.startswith("moco "))
    assert "52.00 ± 2.00" in moco_line and "0.510 ± 0.010" in moco_line  # loc: 3 decimals
    assert any("95 % interval over seeds and" in line for line in table)

    flat = {r["method"]: r for r in csv.DictReader(io.StringIO(render(rows, "csv")))}
    assert float(flat["sdf"]["vs_moco"]) == pytest.approx(9.0)
    assert float(flat["sdf"]["vs_moco_low"]) == pytest.approx(_paired_t(KNN["sdf"],
                                                                        KNN["moco"])[1])
    assert flat["sdf"]["vs_moco_significant"] == "True"
    assert flat["lcr"]["vs_moco_significant"] == "False" and flat["init"]["vs_moco"] == ""
    parsed = json.loads(render(rows, "json"))
    assert parsed[0]["method"] == "init"
    assert parsed[5]["vs_init"]["test_knn_top1"]["significant"] is True  # sdf


def test_init_rows_per_weights(tmp_path):
    """Methods on two backbones: each is compared with the init row of its own weights."""
    path = str(tmp_path / "two")
    rows = []
    for method, backbone, value in (("init:a.x", "a.x", 10.0), ("init:b.y", "b.y", 30.0),
                                    ("moco", "a.x", 20.0), ("lcr", "b.y", 25.0)):
        rows.append({"trial_id": method, "method": method, "status": "completed",
                     "best_val_knn_top1": 1.0, "backbone": backbone, "init": "imagenet",
                     "test_knn_top1": value, "config_hash": method})
    append(path, "trials", rows)
    board = {r["method"]: r for r in leaderboard(path)}
    assert [r["method"] for r in leaderboard(path)][:2] == ["init:a.x", "init:b.y"]
    assert board["moco"]["vs_init"]["test_knn_top1"]["diff"] == pytest.approx(10.0)
    assert board["lcr"]["vs_init"]["test_knn_top1"]["diff"] == pytest.approx(-5.0)
    assert board["lcr"]["vs_moco"]["test_knn_top1"]["diff"] == pytest.approx(5.0)


# ---------------------------------------------------------------- per-image outcomes

def _outcome_rows(method, tid, seed, hits, ap):
    return [{"study": "s", "trial_id": tid, "method": method, "split": "test", "seed": seed,
             "image_id": i + 1, "label": i % 4, "knn_top1": float(h), "rank1": float(h),
             "map": None if np.isnan(a) else float(a)}
            for i, (h, a) in enumerate(zip(hits, ap))]


@pytest.fixture()
def with_outcomes(compared):
    """`compared` plus per-image kNN/Rank-1 hits and AP for moco, lcr (3 seeds each) and
    the init row, drawn at random; the image order of each trial's rows is shuffled."""
    rng = np.random.default_rng(0)
    n = 120
    hits, aps = {}, {}
    rows = []
    for method, p in (("moco", 0.5), ("lcr", 0.6), ("init", 0.35)):
        seeds = [0] if method == "init" else [0, 1, 2]
        hits[method] = 100.0 * (rng.random((len(seeds), n)) < p)
        aps[method] = 100.0 * rng.random((len(seeds), n))
        aps[method][:, ::10] = np.nan  # queries without another same-class item
        for s in seeds:
            tid = "init" if method == "init" else f"{method}{s}"
            part = _outcome_rows(method, tid, s, hits[method][s], aps[method][s])
            rows += [part[i] for i in rng.permutation(n)]
    append(compared, "outcomes", rows)
    # The evals rows the study writes with them (the leaderboard's means come from there).
    evals = []
    for method in ("moco", "lcr"):
        for s in range(3):
            evals.append({"study": "s", "trial_id": f"{method}{s}", "method": method,
                          "split": "test", "protocol": "retrieval", "metric": "map",
                          "value": float(np.nanmean(aps[method][s])), "seed": s})
    append(compared, "evals", evals)
    return compared, hits, aps


def test_comparisons_pair_seeds_and_test_images(with_outcomes):
    from fgray.results.stats import paired_difference

    path, hits, aps = with_outcomes
    by = {r["method"]: r for r in leaderboard(path)}
    got = by["lcr"]["vs_moco"]["test_knn_top1"]
    want = paired_difference(hits["lcr"], hits["moco"])
    assert got["basis"] == "seeds x test images" and got["images"] == 120
    assert (got["diff"], got["low"], got["high"]) == pytest.approx(
        (want["diff"], want["low"], want["high"]))
    assert got["diff"] == pytest.approx(hits["lcr"].mean() - hits["moco"].mean())
    # mAP: the queries without a relevant item (NaN) do not count, in either method.
    keep = ~np.isnan(aps["lcr"][0])
    assert by["lcr"]["vs_moco"]["test_map"]["diff"] == pytest.approx(
        aps["lcr"][:, keep].mean() - aps["moco"][:, keep].mean())
    # vs init: the init row's one evaluation pairs with every seed.
    vs_init = by["lcr"]["vs_init"]["test_knn_top1"]
    assert vs_init["diff"] == pytest.approx(hits["lcr"].mean() - hits["init"].mean())
    # The row's test-set standard error: the seed-averaged hits' spread over sqrt(N).
    seed_mean = hits["lcr"].mean(axis=0)
    assert by["lcr"]["test_knn_top1_se"] == pytest.approx(
        seed_mean.std(ddof=1) / np.sqrt(seed_mean.size))
    # Methods without outcomes fall back to the seeds, and say so.
    assert by["sdf"]["vs_moco"]["test_knn_top1"]["basis"] == "seeds only"
    # Parquet carries every comparison with its interval.
    results_command(path)
    table = pd.read_parquet(os.path.join(path, "report", "comparisons.parquet"))
    row = table[(table.method == "lcr") & (table.reference == "moco")
                & (table.metric == "test_knn_top1")].iloc[0]
    assert (row["low"], row["high"]) == pytest.approx((got["low"], got["high"]))


def test_default_leaderboard_fits_100_columns(with_outcomes):
    path, _, _ = with_outcomes
    # A long init row name (methods on two weights) must not widen it either.
    append(path, "trials", [{"study": "s", "trial_id": "init:tf_efficientnet_lite0.in1k",
                             "method": "init:tf_efficientnet_lite0.in1k",
                             "status": "completed", "best_val_knn_top1": 20.0,
                             "backbone": LITE0, "init": "imagenet", "test_knn_top1": 30.0}])
    out = results_command(path)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split()[:4] == ["method", "kNN", "top-1", "Rank-1"]
    rows = {r["method"]: r for r in leaderboard(path)}
    c = rows["lcr"]["vs_moco"]["test_knn_top1"]
    lcr = next(line for line in lines if line.startswith("lcr "))
    star = "*" if c["significant"] else ""
    assert lcr.endswith(f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]{star}")
    assert f"±{rows['lcr']['test_knn_top1_se']:.1f}" in lcr
    body = lines[2:lines.index("")]
    assert len(body) == len(rows) and "init:tf_efficie… " in "\n".join(body)


def test_asha_rung_correlations(tmp_path):
    from scipy import stats as st

    from fgray.results.ranking import rung_correlations
    from fgray.results.rendering import rung_lines

    path = str(tmp_path / "asha")
    rng = np.random.default_rng(1)
    trials, epochs = [], []
    for method, count in (("moco", 3), ("lcr", 6)):
        for i in range(count):
            tid = f"{method}{i}"
            trials.append({"trial_id": tid, "method": method, "status": "completed",
                           "best_val_knn_top1": 1.0})
            for epoch in (1, 2, 3, 4):
                epochs.append({"trial_id": tid, "method": method, "epoch": epoch,
                               "val_knn_top1": float(rng.integers(0, 20))})
    trials.append({"trial_id": "lcr9", "method": "lcr", "status": "stopped",
                   "best_val_knn_top1": 1.0})  # stopped: no final value, not counted
    epochs.append({"trial_id": "lcr9", "method": "lcr", "epoch": 1, "val_knn_top1": 99.0})
    append(path, "trials", trials)
    append(path, "epochs", epochs)
    # study.json: grace period 1, reduction factor 2, 4 epochs -> rungs at epochs 1 and 2.
    with open(os.path.join(path, "study.json"), "w") as f:
        json.dump({"grace_period": 1, "reduction_factor": 2}, f)
    got = rung_correlations(path)
    frame = pd.DataFrame(epochs[:-1]).pivot(index="trial_id", columns="epoch",
                                            values="val_knn_top1")
    for name, members in (("lcr", [f"lcr{i}" for i in range(6)]),
                          ("all", list(frame.index))):
        sub = frame.loc[members]
        assert [c["rung"] for c in got[name]] == [1, 2]
        for c in got[name]:
            assert c["rho"] == pytest.approx(st.spearmanr(sub[c["rung"]], sub[4]).statistic)
            assert c["n"] == len(members) and c["final"] == 4
            assert c["trusted"] is (c["rho"] >= 0.7)
    assert got["moco"][0]["n"] == 3 and got["moco"][0]["trusted"] is None  # too few
    text = "\n".join(rung_lines(got))
    assert "moco: 3 completed trials are too few to tell" in text
