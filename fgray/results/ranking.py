"""The leaderboard of a study and its statistics: which trial stands for each method, its
final test metrics over seeds, its paired comparisons with MoCo and with the init row, and
whether ASHA's early rungs predict the final ranking. Rendering it is `fgray.results.rendering`.

Final test metrics come from the `evals` table (split=test) of every trial that shares the
best trial's `config_hash` (the same configuration re-run with other seeds), reported as
mean ± sample std; when a configuration has no such rows, the trials' own `test_*` columns
are used. Evaluation rows map to leaderboard columns by (protocol, metric): retrieval rank1 /
rank5 / map, knn top1 / top5, linear top1 / top5 (percent), localisation box_mass / pointing
/ part_hits (fractions) -- a metric may repeat its protocol, e.g. `knn_top1`.

The init rows (method `init`, or `init:<weights>` when methods start from different weights:
the initial weights evaluated without SSL) come first. Every other row is compared with MoCo
and with the init row of its weights, metric by metric, as a paired difference with a 95 %
interval (`fgray.results.stats.paired_difference`): seed index s of a method is paired with
seed index s of MoCo (same split, same initial weights, same test images), the per-image test
outcomes of the `outcomes` table carry the test set's own sampling error, and the interval
comes from a crossed seeds x test-images random-effects model (the choice, and why not a
bootstrap, is explained in `fgray.results.stats`). A difference is significant only where
its interval excludes 0. A study recorded before per-image outcomes existed falls back to a
t interval over the paired seeds (`seed_difference`), which misses the test set's error and
says so (`images` 0). Each row also carries every metric's test-set standard error
(`<metric>_se`: what another draw of as many test images would move it by).
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from fgray.engine.selection import BEST_METRIC, best_of, score
from fgray.results.schema import OUTCOME_WEIGHTS, PARAM_PREFIX, TEST_METRICS
from fgray.results.stats import paired_difference, seed_difference, spearman, test_set_se
from fgray.results.tables import latest_trials, load
from fgray.storage import join, read_bytes, write_bytes

RANKED_STATUSES = ("completed", "stopped")
INIT = "init"  # the init rows' method: `init`, or `init:<weights>`
REFERENCE = "moco"  # the method every other one is compared with
HEADLINE = "test_knn_top1"  # the metric of the "vs moco" / "vs init" columns

_EVAL_COLUMN = {
    ("retrieval", "rank1"): "test_rank1",
    ("retrieval", "rank5"): "test_rank5",
    ("retrieval", "map"): "test_map",
    ("knn", "top1"): "test_knn_top1",
    ("knn", "top5"): "test_knn_top5",
    ("linear", "top1"): "test_linear_top1",
    ("linear", "top5"): "test_linear_top5",
    ("localisation", "box_mass"): "test_loc_box_mass",
    ("localisation", "pointing"): "test_loc_pointing",
    ("localisation", "part_hits"): "test_loc_part_hits",
}


def eval_column(protocol: str | None, metric: str | None) -> str | None:
    """The leaderboard column an `evals` row feeds, or None."""
    if not protocol or not metric:
        return None
    name = metric.lower()
    if name.startswith(f"{protocol}_"):
        name = name[len(protocol) + 1:]
    return _EVAL_COLUMN.get((protocol, name))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _summary(values: list[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) >= 2 else None
    return statistics.fmean(values), std, len(values)


def _params(trial: dict[str, Any]) -> dict[str, Any]:
    text = trial.get("params_json")
    return json.loads(text) if text else {}


def is_init(method: str) -> bool:
    """Whether a leaderboard method is an init row (the initial weights, no SSL)."""
    return method == INIT or method.startswith(f"{INIT}:")


def method_note(method: str, backbone: str | None) -> str | None:
    """What a row's reader must know about how it was run."""
    if is_init(method):
        return "initial weights, no SSL"
    if method == "lodisc" and backbone:
        import timm

        vit = timm.models.is_model_in_modules(
            backbone, ("vision_transformer", "vision_transformer_hybrid", "deit"))
        if not vit:
            return "cnn location map [ours]"  # LoDisc's attention map needs a ViT
    return None


def _weights(row: dict[str, Any]) -> tuple[Any, Any]:
    return row.get("backbone"), row.get("init")


class _Evidence:
    """What the comparisons need of one leaderboard row: for each metric, its value per
    seed, and the per-image test outcomes of its final models by seed."""

    def __init__(self) -> None:
        self.per_seed: dict[str, dict[Any, float]] = {}
        self.trial_by_seed: dict[Any, str] = {}


def _outcomes_by_trial(study_dir: str) -> dict[str, dict[int, dict[str, Any]]]:
    """The `outcomes` table (split test) as {trial_id: {image_id: row}}, the first row of an
    image kept (a re-run evaluation does not count twice)."""
    table = load(study_dir, "outcomes", filter=ds.field("split") == "test").to_pylist()
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in table:
        out.setdefault(r["trial_id"], {}).setdefault(int(r["image_id"]), r)
    return out


def _matrix(outcomes: dict[str, dict[int, dict[str, Any]]], trials: list[str],
            images: list[int], column: str) -> np.ndarray:
    return np.array([[np.nan if (v := outcomes[t][i].get(column)) is None else float(v)
                      for i in images] for t in trials], dtype=float)


def _pair(row: _Evidence, ref: _Evidence, ref_once: bool,
          outcomes: dict[str, dict[int, dict[str, Any]]], col: str) -> dict[str, Any] | None:
    """`row` minus `ref` on `col`, paired by seed (a reference evaluated once, the init row,
    pairs with every seed) and, where both have per-image outcomes, by test image."""
    name = col[len("test_"):]
    if ref_once:
        seeds = sorted(row.trial_by_seed, key=str)
        ref_trials = list(ref.trial_by_seed.values())[:1]
    else:
        seeds = sorted(set(row.trial_by_seed) & set(ref.trial_by_seed), key=str)
        ref_trials = [ref.trial_by_seed[s] for s in seeds]
    mine = [row.trial_by_seed[s] for s in seeds]
    involved = mine + ref_trials
    if seeds and ref_trials and all(t in outcomes for t in involved):
        images = sorted(set.intersection(*(set(outcomes[t]) for t in involved)))
        a = _matrix(outcomes, mine, images, name)
        b = _matrix(outcomes, ref_trials, images, name)
        if images and np.isfinite(a).any() and np.isfinite(b).any():
            weights = None
            if name in OUTCOME_WEIGHTS:
                with np.errstate(all="ignore"):
                    weights = np.nanmean(np.vstack(
                        [_matrix(outcomes, involved, images, OUTCOME_WEIGHTS[name])]), axis=0)
            result = paired_difference(a, b, weights)
            if result is not None:
                return {**result, "basis": "seeds x test images"}
    # No per-image outcomes: the paired per-seed values alone.
    a_vals = row.per_seed.get(col, {})
    b_vals = ref.per_seed.get(col, {})
    if ref_once:
        keys = sorted(a_vals, key=str)
        result = seed_difference([a_vals[k] for k in keys], list(b_vals.values())[:1])
    else:
        keys = sorted(set(a_vals) & set(b_vals), key=str)
        result = seed_difference([a_vals[k] for k in keys], [b_vals[k] for k in keys])
    return {**result, "basis": "seeds only"} if result is not None else None


def _row_se(ev: _Evidence, outcomes: dict[str, dict[int, dict[str, Any]]],
            col: str) -> float | None:
    """The test-set standard error of a row's metric (`stats.test_set_se`)."""
    trials = [t for t in ev.trial_by_seed.values() if t in outcomes]
    if not trials:
        return None
    name = col[len("test_"):]
    images = sorted(set.intersection(*(set(outcomes[t]) for t in trials)))
    values = _matrix(outcomes, trials, images, name)
    if not np.isfinite(values).any():
        return None
    weights = None
    if name in OUTCOME_WEIGHTS:
        with np.errstate(all="ignore"):
            weights = np.nanmean(_matrix(outcomes, trials, images, OUTCOME_WEIGHTS[name]),
                                 axis=0)
    return test_set_se(values, weights)


def _add_comparisons(rows: list[dict[str, Any]], evidence: dict[str, _Evidence],
                     outcomes: dict[str, dict[int, dict[str, Any]]]) -> None:
    """Each row's test-set standard errors; each non-init row against MoCo (`vs_moco`) and
    against the init row of its weights (`vs_init`; the only init row when there is one),
    metric by metric (module docstring)."""
    reference = next((r for r in rows if r["method"] == REFERENCE), None)
    inits = [r for r in rows if r["is_init"]]
    for row in rows:
        ev = evidence[row["method"]]
        for col in TEST_METRICS:
            row[f"{col}_se"] = _row_se(ev, outcomes, col) if row[col] is not None else None
        row["vs_moco"] = row["vs_init"] = None
        if row["is_init"]:
            continue
        if reference is not None and row is not reference:
            ref = evidence[reference["method"]]
            row["vs_moco"] = {m: _pair(ev, ref, False, outcomes, m)
                              if row[m] is not None and reference[m] is not None else None
                              for m in TEST_METRICS}
        same = [r for r in inits if _weights(r) == _weights(row)]
        base = same[0] if same else (inits[0] if len(inits) == 1 else None)
        if base is not None:
            ref = evidence[base["method"]]
            row["vs_init"] = {m: _pair(ev, ref, True, outcomes, m)
                              if row[m] is not None and base[m] is not None else None
                              for m in TEST_METRICS}


def leaderboard(study_dir: str) -> list[dict[str, Any]]:
    """One row per method, the init rows first: its best trial by best_val_knn_top1 among
    completed/stopped trials, the weights it started from (backbone with its tag, init),
    that trial's parameters, its final test metrics (mean, std and count over the seeds of
    its configuration), trial counts by status, the total GPU/CPU hours, and its comparison
    with MoCo and with the init row (see the module docstring)."""
    trials = latest_trials(load(study_dir, "trials").to_pylist())
    evals = load(study_dir, "evals", filter=ds.field("split") == "test").to_pylist()
    outcomes = _outcomes_by_trial(study_dir)
    evidence: dict[str, _Evidence] = {}
    rows = []
    methods = sorted({t["method"] for t in trials}, key=lambda m: (not is_init(m), m))
    for method in methods:
        mine = sorted((t for t in trials if t["method"] == method), key=lambda t: t["trial_id"])
        counts = Counter(t.get("status") for t in mine)
        ev = evidence[method] = _Evidence()
        row: dict[str, Any] = {
            "method": method, "is_init": is_init(method), "backbone": None, "init": None,
            "note": None, "best_trial": None, "best_epoch": None, "config_hash": None,
            "val_knn_top1": None}
        for col in TEST_METRICS:
            row.update({col: None, f"{col}_std": None, f"{col}_n": 0})
        ranked = [t for t in mine
                  if t.get("status") in RANKED_STATUSES and score(t, BEST_METRIC) is not None]
        params: dict[str, Any] = {}
        searched: dict[str, Any] = {}
        if ranked:
            # The best of the search: a seed retrain of the chosen configuration is a sample
            # of its spread, not a rival (picking the luckiest seed would bias the row).
            pool = [t for t in ranked if t.get(f"{PARAM_PREFIX}seed") is None] or ranked
            best, _ = best_of(pool, BEST_METRIC)
            params = _params(best)
            searched = {k[len(PARAM_PREFIX):]: v for k, v in best.items()
                        if k.startswith(PARAM_PREFIX) and v is not None}
            row.update(best_trial=best["trial_id"], best_epoch=best.get("best_epoch"),
                       config_hash=best.get("config_hash"),
                       val_knn_top1=best[BEST_METRIC], backbone=best.get("backbone"),
                       init=best.get("init"))
            same = ([t for t in mine if t.get("config_hash") == best["config_hash"]]
                    if best.get("config_hash") else [best])
            ids = {t["trial_id"] for t in same}
            seen: dict[tuple[str, str, Any], float] = {}
            for e in evals:
                col = eval_column(e.get("protocol"), e.get("metric"))
                if (col and e["method"] == method and e["trial_id"] in ids
                        and _finite(e.get("value"))):
                    # One value per trial and seed: a re-run evaluation does not count twice.
                    seen.setdefault((col, e["trial_id"], e.get("seed")), float(e["value"]))
            for col in TEST_METRICS:
                values = [v for (c, _, _), v in seen.items() if c == col]
                ev.per_seed[col] = {}
                for (c, _, seed), v in seen.items():
                    if c == col:
                        ev.per_seed[col].setdefault(seed, v)
                if not values:
                    values = [float(t[col]) for t in same if _finite(t.get(col))]
                    ev.per_seed[col] = {t.get("seed"): float(t[col]) for t in same
                                        if _finite(t.get(col))}
                mean, std, n = _summary(values)
                row.update({col: mean, f"{col}_std": std, f"{col}_n": n})
            for t in sorted(same, key=lambda t: t["trial_id"]):
                if t["trial_id"] in outcomes or t["trial_id"] in {k[1] for k in seen}:
                    seed = _trial_seed(t, outcomes)
                    ev.trial_by_seed.setdefault(seed, t["trial_id"])
        row.update(
            trials_completed=counts.get("completed", 0), trials_stopped=counts.get("stopped", 0),
            trials_failed=counts.get("failed", 0), trials_running=counts.get("running", 0),
            gpu_hours=math.fsum(float(t["gpu_hours"]) for t in mine
                                if _finite(t.get("gpu_hours"))),
            cpu_hours=math.fsum(float(t["cpu_hours"]) for t in mine
                                if _finite(t.get("cpu_hours"))),
            params=params, searched=searched)
        if row["backbone"] is None and mine:  # nothing ranked yet: the weights all the same
            row.update(backbone=mine[0].get("backbone"), init=mine[0].get("init"))
        row["note"] = method_note(method, row["backbone"])
        rows.append(row)
    _add_comparisons(rows, evidence, outcomes)
    correlations = rung_correlations(study_dir)
    for row in rows:
        row["asha_spearman"] = correlations.get(row["method"])
    return rows


TRUST_RHO = 0.7  # a rung whose Spearman rho with the final ranking is lower is not trusted
TRUST_N = 5  # fewer completed trials than this cannot tell


def _rung_epochs(study_dir: str, final: int) -> list[int]:
    """ASHA's rungs below `final` epochs: grace_period x reduction_factor^k from the
    study's settings (study.json), else every epoch before the last."""
    raw = read_bytes(join(study_dir, "study.json"))
    settings = json.loads(raw) if raw else {}
    grace, factor = settings.get("grace_period"), settings.get("reduction_factor")
    if not grace or not factor or factor < 2:
        return list(range(1, final))
    rungs, r = [], int(grace)
    while r < final:
        rungs.append(r)
        r *= int(factor)
    return rungs


def rung_correlations(study_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Is ASHA's early stopping safe at this budget? For each method (and `all`, the trials
    of every method pooled), over its completed trials (those that ran every epoch: stopped
    trials have no final value), Spearman's rho between the val kNN top-1 at each ASHA rung
    and at the final epoch: [{rung, final, n, rho, trusted}]. `trusted` is rho >= TRUST_RHO
    with n >= TRUST_N; None when there are too few trials to tell."""
    trials = [t for t in latest_trials(load(study_dir, "trials").to_pylist())
              if not is_init(t["method"]) and t.get("status") == "completed"]
    if not trials:
        return {}
    ids = {t["trial_id"]: t["method"] for t in trials}
    curves: dict[str, dict[int, float]] = {}
    for e in load(study_dir, "epochs").to_pylist():
        if e["trial_id"] in ids and e.get("epoch") is not None and score(e) is not None:
            curves.setdefault(e["trial_id"], {}).setdefault(int(e["epoch"]), score(e))
    final = max((max(c) for c in curves.values()), default=0)
    rungs = _rung_epochs(study_dir, final)
    groups: dict[str, list[str]] = {}
    for trial_id, method in sorted(ids.items()):
        groups.setdefault(method, []).append(trial_id)
    groups["all"] = sorted(ids)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, members in groups.items():
        for rung in rungs:
            pairs = [(curves[t][rung], curves[t][final]) for t in members
                     if t in curves and rung in curves[t] and final in curves[t]]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            trusted = (None if rho is None or len(pairs) < TRUST_N
                       else rho >= TRUST_RHO)
            out.setdefault(name, []).append({"rung": rung, "final": final, "n": len(pairs),
                                             "rho": rho, "trusted": trusted})
    return out


def _trial_seed(trial: dict[str, Any], outcomes: dict[str, dict[int, dict[str, Any]]]) -> Any:
    """The seed a final model was evaluated with: its outcome rows', else its trial row's."""
    rows = outcomes.get(trial["trial_id"])
    if rows:
        return next(iter(rows.values())).get("seed")
    return trial.get("seed")


COMPARISONS_FILE = "report/comparisons.parquet"


def comparisons_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every paired comparison of the leaderboard, one row per (method, reference, metric):
    diff, 95 % interval (low, high), se, df, seeds, images, significant, mde, basis."""
    out = []
    for row in rows:
        for ref in ("vs_moco", "vs_init"):
            for metric, c in (row.get(ref) or {}).items():
                if c is None:
                    continue
                out.append({"method": row["method"], "reference": ref[3:], "metric": metric,
                            **{k: c.get(k) for k in ("diff", "low", "high", "se", "df",
                                                     "seeds", "images", "significant",
                                                     "mde", "basis")}})
    return out


def write_comparisons(study_dir: str, rows: list[dict[str, Any]]) -> str | None:
    """Write `comparisons_rows` to STUDY_DIR/report/comparisons.parquet (replaced whole, one
    write) for pandas/DuckDB; None when there is nothing to compare."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = comparisons_rows(rows)
    if not items:
        return None
    schema = pa.schema([("method", pa.string()), ("reference", pa.string()),
                        ("metric", pa.string()), ("diff", pa.float64()),
                        ("low", pa.float64()), ("high", pa.float64()), ("se", pa.float64()),
                        ("df", pa.float64()), ("seeds", pa.int64()), ("images", pa.int64()),
                        ("significant", pa.bool_()), ("mde", pa.float64()),
                        ("basis", pa.string())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(items, schema=schema), buffer)
    target = join(study_dir, COMPARISONS_FILE)
    write_bytes(target, buffer.getvalue())
    return target
