"""Leaderboard, renderings and plots of a study: what `fgray results STUDY_DIR` prints.

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

Renderings: `table` (the default) fits 100 columns -- method, kNN top-1, Rank-1, mAP (mean
± std over seeds) and the kNN difference from MoCo with its interval; `wide` and `markdown`
carry every column; `json` (and the Parquet file `comparisons_table` builds) carry every
metric's interval; `html` is a standalone page of the wide table.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
import os
import shlex
import statistics
import tempfile
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from fgray.engine.selection import BEST_METRIC, Best, best_of, score
from fgray.errors import UserError
from fgray.results.schema import OUTCOME_WEIGHTS, PARAM_PREFIX, TEST_METRICS
from fgray.results.stats import paired_difference, seed_difference, spearman, test_set_se
from fgray.results.tables import latest_trials, load
from fgray.storage import (
    absolute,
    as_location,
    is_local,
    join,
    put,
    read_bytes,
    resolve,
    write_bytes,
    write_text,
)

FORMATS = ("table", "wide", "csv", "markdown", "json", "html")
RANKED_STATUSES = ("completed", "stopped")
OPTUNA_JOURNAL = "optuna/journal.log"
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


def rung_lines(correlations: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The console's account of `rung_correlations`, one line per method and rung, then a
    plain sentence per group whose early ranking cannot be trusted."""
    if not correlations:
        return []
    lines = ["ASHA: Spearman rho of val kNN top-1 at each rung vs the final epoch "
             "(completed trials):"]
    verdicts = []
    for name, items in correlations.items():
        for c in items:
            rho = "-" if c["rho"] is None else f"{c['rho']:+.2f}"
            lines.append(f"  {name:<8} epoch {c['rung']} vs {c['final']}: rho {rho} "
                         f"(n={c['n']})")
            if c["trusted"] is False:
                verdicts.append(f"{name}: rho {rho} at epoch {c['rung']} is too low to trust "
                                f"ASHA's early stops at this budget.")
            elif c["trusted"] is None:
                verdicts.append(f"{name}: {c['n']} completed trials are too few to tell "
                                f"whether epoch {c['rung']} predicts the final ranking.")
    for v in verdicts:
        lines += _wrap(v)
    return lines


def _trial_seed(trial: dict[str, Any], outcomes: dict[str, dict[int, dict[str, Any]]]) -> Any:
    """The seed a final model was evaluated with: its outcome rows', else its trial row's."""
    rows = outcomes.get(trial["trial_id"])
    if rows:
        return next(iter(rows.values())).get("seed")
    return trial.get("seed")


# ---------------------------------------------------------------- rendering

_DISPLAY = ("method", "backbone", "best_trial", "val_knn_top1", *TEST_METRICS, "knn test se",
            "vs moco", "vs init", "seeds", "completed", "stopped", "failed", "running",
            "gpu_hours", "cpu_hours", "note", "params")
LEGEND = (f"Metrics: mean ± std over seeds. knn test se: the test set's standard error of kNN "
          f"top-1 (another draw of as many test images moves the mean by about that). vs "
          f"{REFERENCE} / vs init: paired difference of test kNN top-1 (points) from "
          f"{REFERENCE}'s and from the init row's, with its 95 % interval over seeds and "
          "test images; * where the interval excludes 0. JSON carries every metric's "
          "interval.")
WIDTH = 100  # the default console leaderboard's width
COMPACT = (("method", "method"), ("kNN top-1", "test_knn_top1"), ("Rank-1", "test_rank1"),
           ("mAP", "test_map"), ("test se", "knn test se"),
           (f"kNN vs {REFERENCE} [95% CI]", "vs moco"))


def _digits(column: str) -> int:
    """Localisation scores are fractions in [0, 1]; every other metric is percent."""
    return 3 if column.startswith("test_loc_") else 2


def _fmt_std(value: float, digits: int) -> str:
    """A spread with at least two significant digits (0.004 stays 0.004, not 0.0)."""
    if value != 0 and round(value, digits) == 0:
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


def _fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e4 or 0 < abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def fmt_comparison(result: dict[str, Any] | None, column: str = HEADLINE) -> str:
    """"+4.1 [+0.3, +7.9]*" for a difference whose 95 % interval excludes 0, "+1.0 [-2.4,
    +4.4]" for one whose interval holds 0, "+1.0 (1 seed)" for one without an interval, "-"
    for none."""
    if result is None:
        return "-"
    digits = _digits(column) - 1
    if result.get("low") is None:
        return f"{result['diff']:+.{digits}f} ({result['seeds']} seed)"
    text = (f"{result['diff']:+.{digits}f} [{result['low']:+.{digits}f}, "
            f"{result['high']:+.{digits}f}]")
    return f"{text}*" if result["significant"] else text


def _weights_cell(row: dict[str, Any]) -> str:
    if not row.get("backbone"):
        return "-"
    return f"{row['backbone']} ({row['init']})" if row.get("init") else row["backbone"]


def _display_cells(row: dict[str, Any]) -> list[str]:
    cells = {
        "method": row["method"],
        "backbone": _weights_cell(row),
        "best_trial": row["best_trial"] or "-",
        "val_knn_top1": _fmt_number(row["val_knn_top1"], 2),
        "vs moco": fmt_comparison((row.get("vs_moco") or {}).get(HEADLINE)),
        "vs init": fmt_comparison((row.get("vs_init") or {}).get(HEADLINE)),
        "knn test se": _fmt_number(row.get(f"{HEADLINE}_se"), 1),
        "seeds": str(max(row[f"{c}_n"] for c in TEST_METRICS)),
        "completed": str(row["trials_completed"]),
        "stopped": str(row["trials_stopped"]),
        "failed": str(row["trials_failed"]),
        "running": str(row["trials_running"]),
        "gpu_hours": _fmt_number(row["gpu_hours"], 2),
        "cpu_hours": _fmt_number(row["cpu_hours"], 2),
        "note": row.get("note") or "",
        # The searched parameters tell trials apart; fixed ones are in params_json.
        "params": _fmt_params(row["searched"] or row["params"]),
    }
    for col in TEST_METRICS:
        text = _fmt_number(row[col], _digits(col))
        if row[f"{col}_std"] is not None:
            text += f" ± {_fmt_std(row[f'{col}_std'], _digits(col))}"
        cells[col] = text
    return [cells[name] for name in _DISPLAY]


def _compact_cells(row: dict[str, Any]) -> list[str]:
    """The default table's cells: one decimal, the method name cut to 16 characters."""
    method = row["method"] if len(row["method"]) <= 16 else row["method"][:15] + "…"
    cells = {"method": method,
             "vs moco": fmt_comparison((row.get("vs_moco") or {}).get(HEADLINE)),
             "knn test se": ("±" + _fmt_number(row.get(f"{HEADLINE}_se"), 1)
                             if row.get(f"{HEADLINE}_se") is not None else "-")}
    for col in ("test_knn_top1", "test_rank1", "test_map"):
        text = _fmt_number(row[col], 1)
        if row[f"{col}_std"] is not None:
            text += f" ± {_fmt_std(row[f'{col}_std'], 1)}"
        cells[col] = text
    return [cells[key] for _, key in COMPACT]


def _wrap(text: str, width: int = WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, break_on_hyphens=False)


def _detectable(rows: list[dict[str, Any]]) -> float | None:
    """The median smallest detectable kNN difference from MoCo (80 % power) over the rows."""
    mdes = [c["mde"] for r in rows if (c := (r.get("vs_moco") or {}).get(HEADLINE))
            and c.get("mde") is not None]
    return statistics.median(mdes) if mdes else None


def compact_table(rows: list[dict[str, Any]]) -> str:
    """The default console leaderboard: method, kNN top-1, Rank-1, mAP (mean ± std over
    seeds), the kNN test-set standard error and the kNN difference from MoCo with its 95 %
    interval, one line per method, every line at most `WIDTH` characters."""
    if not rows:
        return "(no trials recorded yet)\n"
    heads = [h for h, _ in COMPACT]
    body = [_compact_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    legend = (f"Percent; mean ± std over seeds. test se: the test set's standard error of kNN "
              f"top-1. kNN vs {REFERENCE}: paired difference, 95 % interval over seeds and test "
              "images; * where it excludes 0.")
    mde = _detectable(rows)
    if mde is not None:
        legend += (f" Smallest kNN difference from {REFERENCE} these seeds and test images "
                   f"detect (80 % power): about {mde:.1f} points.")
    legend += " Every metric, vs init and the rest: --format wide|markdown|json|html."
    return "\n".join(lines + [""] + _wrap(legend)) + "\n"


def _csv_keys() -> list[str]:
    keys = ["method", "backbone", "init", "best_trial", "best_epoch", "config_hash",
            "val_knn_top1"]
    for col in TEST_METRICS:
        keys += [col, f"{col}_std", f"{col}_n", f"{col}_se"]
    return keys + ["vs_moco", "vs_moco_low", "vs_moco_high", "vs_moco_significant",
                   "vs_init", "vs_init_low", "vs_init_high", "vs_init_significant",
                   "trials_completed", "trials_stopped", "trials_failed", "trials_running",
                   "gpu_hours", "cpu_hours", "note", "params", "searched"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """The leaderboard as the compact text table (`table`), the aligned table of every column
    (`wide`), CSV, GitHub markdown, JSON or a standalone HTML page."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "table":
        return compact_table(rows)
    if fmt == "html":
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>fgray leaderboard</title><style>{_CSS}</style></head><body>\n"
                f"{_leaderboard_html(rows)}\n</body></html>\n")
    if fmt == "json":
        return json.dumps(_json_safe(rows), indent=2, sort_keys=False, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_csv_keys(), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in _csv_keys()}
            for ref in ("vs_moco", "vs_init"):  # the headline metric's comparison
                result = (row.get(ref) or {}).get(HEADLINE)
                for key, field in (("", "diff"), ("_low", "low"), ("_high", "high"),
                                   ("_significant", "significant")):
                    flat[f"{ref}{key}"] = result[field] if result else None
            flat["params"] = json.dumps(row.get("params") or {}, sort_keys=True)
            flat["searched"] = json.dumps(row.get("searched") or {}, sort_keys=True)
            writer.writerow(flat)
        return out.getvalue()
    body = [_display_cells(row) for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(_DISPLAY) + " |", "|" + "---|" * len(_DISPLAY)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
                  for cells in body]
        if body:
            lines += ["", LEGEND]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(cells[i]) for cells in body)) if body else len(h)
              for i, h in enumerate(_DISPLAY)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(_DISPLAY, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    if not body:
        lines.append("(no trials recorded yet)")
    else:
        lines += ["", LEGEND]
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------- plots


def _save(fig: Any, fs: pafs.FileSystem, directory: str, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = f"{directory}/{name}"
    put(fs, path, buf.getvalue())
    return path


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _start_key(trial: dict[str, Any]) -> tuple:
    start = trial.get("start_time")
    return (start is None, start.timestamp() if start else 0.0, trial["trial_id"])


def _open_journal(study_dir: str, notes: list[str]) -> tuple[Any, str | None]:
    """The study's Optuna JournalStorage (a local copy for object stores), or None."""
    fs, root = resolve(study_dir)
    path = f"{root}/{OPTUNA_JOURNAL}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        notes.append(f"no Optuna journal at {join(study_dir, OPTUNA_JOURNAL)}: "
                     "parameter-importance plots skipped")
        return None, None
    import optuna
    from optuna.storages.journal import JournalFileBackend

    copy = None
    if not is_local(fs):
        handle, copy = tempfile.mkstemp(suffix=".log")
        with os.fdopen(handle, "wb") as out, fs.open_input_stream(path) as src:
            out.write(src.read())
        path = copy
    return optuna.storages.JournalStorage(JournalFileBackend(path)), copy


def _importance_plots(study_dir: str, fs: pafs.FileSystem, out: str,
                      notes: list[str]) -> list[str]:
    from matplotlib.figure import Figure

    storage, copy = _open_journal(study_dir, notes)
    if storage is None:
        return []
    import optuna
    from optuna.trial import TrialState

    paths = []
    try:
        for name in optuna.study.get_all_study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            # The tune layer names one Optuna study per method or records it as a user attr.
            label = str(study.user_attrs.get("method", name))
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(done) < 2:
                notes.append(f"Optuna study {name!r}: {len(done)} completed trial(s), need 2 "
                             "for parameter importance; skipped")
                continue
            if len(study.directions) > 1:
                notes.append(f"Optuna study {name!r} is multi-objective; importance skipped")
                continue
            try:
                importances = optuna.importance.get_param_importances(study)
            except (ValueError, RuntimeError) as exc:
                notes.append(f"Optuna study {name!r}: parameter importance failed ({exc})")
                continue
            if not importances:
                notes.append(f"Optuna study {name!r}: no parameters varied; skipped")
                continue
            names = list(importances)[::-1]
            fig = Figure(figsize=(6, 0.4 * len(names) + 1.5), layout="constrained")
            ax = fig.subplots()
            ax.barh(names, [importances[n] for n in names])
            ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
            ax.set_title(f"parameter importance: {label}")
            paths.append(_save(fig, fs, out, f"param_importance_{_safe_name(label)}.png"))
    finally:
        if copy:
            os.remove(copy)
    return paths


def _write_plots(study_dir: str, out_dir: str | None, notes: list[str]) -> list[str]:
    # Figure without pyplot: no global backend switch, nothing left open between calls.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # The init rows are no trials: nothing to plot against trials or cost.
    trials = [t for t in latest_trials(load(study_dir, "trials").to_pylist())
              if not is_init(t["method"])]
    epochs = load(study_dir, "epochs").to_pylist()
    target = out_dir or join(study_dir, "plots")
    fs, out = resolve(target)
    fs.create_dir(out, recursive=True)
    paths = []

    curves: dict[str, dict[str, dict[int, float]]] = {}
    for e in epochs:
        if score(e) is not None and e.get("epoch") is not None:
            curves.setdefault(e["method"], {}).setdefault(e["trial_id"], {})[e["epoch"]] = \
                score(e)
    if not curves:
        notes.append("no val_knn_top1 in the epochs table: val-vs-epoch plots skipped")
    for method in sorted(curves):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for trial_id in sorted(curves[method]):
            points = sorted(curves[method][trial_id].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1,
                    label=trial_id)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("val kNN top-1")
        ax.set_title(f"{method}: val kNN top-1 per epoch ({len(curves[method])} trials)")
        if len(curves[method]) <= 12:
            ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, f"val_vs_epoch_{_safe_name(method)}.png"))

    if not trials:
        notes.append("no trials recorded: best-so-far and cost plots skipped")
    else:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for method in sorted({t["method"] for t in trials}):
            ordered = sorted((t for t in trials if t["method"] == method), key=_start_key)
            best, xs, ys = Best(BEST_METRIC), [], []
            for i, t in enumerate(ordered, start=1):
                if t.get("status") in RANKED_STATUSES:
                    best.update(t)
                if best.value is not None:
                    xs.append(i)
                    ys.append(best.value)
            ax.step(xs, ys, where="post", marker="o", label=method)
        ax.set_xlabel("trial (by start time)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("best val kNN top-1 so far")
        ax.set_title("best so far")
        ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, "best_so_far.png"))

        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for method in sorted({t["method"] for t in trials}):
            pts = [((t.get("gpu_hours") or 0.0) + (t.get("cpu_hours") or 0.0),
                    score(t, BEST_METRIC))
                   for t in trials if t["method"] == method and score(t, BEST_METRIC) is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
        ax.set_xlabel("GPU + CPU hours")
        ax.set_ylabel("best val kNN top-1")
        ax.set_title("cost vs accuracy")
        ax.legend(fontsize="small")
        paths.append(_save(fig, fs, out, "cost_vs_accuracy.png"))

    paths += _importance_plots(study_dir, fs, out, notes)
    return [as_location(target, p) for p in paths]


def plots(study_dir: str, out_dir: str | None = None,
          notes: list[str] | None = None) -> list[str]:
    """Write PNG plots of the study (default: `STUDY_DIR/plots/`) and return their paths:
    `val_vs_epoch_<method>.png`, `best_so_far.png`, `cost_vs_accuracy.png`, and
    `param_importance_<method>.png` per Optuna study in `STUDY_DIR/optuna/journal.log`
    (labelled by the study's `method` user attribute, else its name). Why a plot was skipped
    is appended to `notes` when given."""
    return _write_plots(study_dir, out_dir, notes if notes is not None else [])


# ---------------------------------------------------------------- viewers and HTML

REPORT_FILE = "report/index.html"
MAP_PREFIXES = ("maps/", "pairs/")  # the TensorBoard image tags the report shows


def _quote_path(study_dir: str, rel: str) -> str:
    path = join(study_dir, rel)
    return shlex.quote(absolute(path))


def viewer_commands(study_dir: str) -> dict[str, str | None]:
    """The shell commands that open the study in TensorBoard and in optuna-dashboard (None
    without an Optuna journal). optuna-dashboard reads a local journal file: for an object
    store study, the command first copies it here."""
    commands: dict[str, str | None] = {
        "tensorboard": f"tensorboard --logdir {_quote_path(study_dir, 'tensorboard')}",
        "optuna_dashboard": None}
    fs, root = resolve(study_dir)
    if fs.get_file_info(f"{root}/{OPTUNA_JOURNAL}").type == pafs.FileType.File:
        journal = _quote_path(study_dir, OPTUNA_JOURNAL)
        if "://" not in study_dir:
            commands["optuna_dashboard"] = f"optuna-dashboard {journal}"
        else:
            copy = ("gcloud storage cp" if study_dir.startswith("gs://") else "aws s3 cp")
            commands["optuna_dashboard"] = (f"{copy} {journal} journal.log && "
                                            "optuna-dashboard journal.log")
    return commands


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em;
       color: #1d2433; max-width: 1600px; }
h1 { margin-bottom: .1em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7e2; }
.meta, .legend, figcaption { color: #5a6478; }
pre { background: #f3f5f9; padding: .6em .8em; border-radius: 4px; overflow-x: auto; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7e2; padding: .3em .55em; text-align: left;
         white-space: nowrap; vertical-align: top; }
th { background: #eef1f6; position: sticky; top: 0; }
tr.init td { background: #fbf7e9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.params { white-space: normal; min-width: 18em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #d0d7e2; }
.plots figure img { width: 560px; }
.maps figure img { max-width: 820px; }
"""

_NUMERIC = {"val_knn_top1", *TEST_METRICS, "gpu_hours", "cpu_hours", "seeds", "completed",
            "stopped", "failed", "running"}


def _img(data: bytes, alt: str, *, min_width: int = 0, max_height: int = 700) -> str:
    """An inline PNG; one narrower than `min_width` is shown enlarged by a whole factor that
    keeps it under `max_height` (maps of 32-px images would be stamps), with crisp pixels."""
    encoded = base64.b64encode(data).decode("ascii")
    size = ""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and min_width:
        width, height = (int.from_bytes(data[i:i + 4], "big") for i in (16, 20))
        factor = min(min_width // max(width, 1), max_height // max(height, 1))
        if factor > 1:
            size = f' width="{width * factor}" style="image-rendering: pixelated"'
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}"{size}>'


def _leaderboard_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in _DISPLAY)
    body = []
    for row in rows:
        cells = []
        for name, text in zip(_DISPLAY, _display_cells(row)):
            cls = "num" if name in _NUMERIC else "params" if name == "params" else ""
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>' if cls
                         else f"<td>{html.escape(text)}</td>")
        kind = ' class="init"' if row["is_init"] else ""
        body.append(f"<tr{kind}>{''.join(cells)}</tr>")
    if not body:
        return "<p>(no trials recorded yet)</p>"
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
            f'<p class="legend">{html.escape(LEGEND)}</p>')


def _read_bytes(path: str) -> bytes:
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(path)
    return data


def html_report(study_dir: str, out: str | None = None,
                notes: list[str] | None = None) -> str:
    """Write a one-page, self-contained HTML report of the study (default
    `STUDY_DIR/report/index.html`; every image inline as base64) and return its path: how to
    open the study in TensorBoard and optuna-dashboard, the leaderboard (mean ± std over
    seeds), the plots (written under `STUDY_DIR/plots/` as `--plots` does), and per method
    its best trial's maps -- the last `maps/*` and `pairs/*` images logged to the trial's
    TensorBoard run (no model is loaded). Why something is missing goes to `notes` and to
    the page."""
    from fgray.results.tensorboard import latest_images, run_name

    notes = notes if notes is not None else []
    rows = leaderboard(study_dir)
    plot_paths = _write_plots(study_dir, None, notes)
    commands = viewer_commands(study_dir)
    name = study_dir.rstrip("/").rsplit("/", 1)[-1]
    trials = sum(r["trials_completed"] + r["trials_stopped"] + r["trials_failed"]
                 + r["trials_running"] for r in rows if not r["is_init"])
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    parts = [f"<h1>Study {html.escape(name)}</h1>",
             f'<p class="meta">{html.escape(study_dir)} &middot; {trials} trials &middot; '
             f"generated {generated} by <code>fgray results --html</code></p>",
             "<h2>Open the study</h2>",
             "<p>TensorBoard (scalars, maps, HParams, embedding projector; one run per "
             "trial):</p>", f"<pre>{html.escape(commands['tensorboard'] or '')}</pre>"]
    if commands["optuna_dashboard"]:
        parts += ["<p>optuna-dashboard (the Optuna studies: history, importances):</p>",
                  f"<pre>{html.escape(commands['optuna_dashboard'])}</pre>"]
    else:
        notes.append(f"no Optuna journal at {OPTUNA_JOURNAL}: no optuna-dashboard command")
    parts += ["<h2>Leaderboard</h2>", _leaderboard_html(rows)]

    parts.append("<h2>Plots</h2>")
    if plot_paths:
        figures = [f"<figure>{_img(_read_bytes(p), os.path.basename(p))}<figcaption>"
                   f"{html.escape(os.path.basename(p))}</figcaption></figure>"
                   for p in plot_paths]
        parts.append(f'<div class="gallery plots">{"".join(figures)}</div>')
    else:
        parts.append("<p>(no plots: nothing recorded yet)</p>")

    parts.append("<h2>Maps of each method's best trial</h2>")
    shown = 0
    for row in rows:
        if row["is_init"] or not row.get("best_trial"):
            continue
        images = latest_images(study_dir, run_name(row["method"], row["best_trial"]),
                               MAP_PREFIXES)
        if not images:
            notes.append(f"{row['method']}: its best trial {row['best_trial']} logged no "
                         f"{' or '.join(p + '*' for p in MAP_PREFIXES)} images to TensorBoard")
            continue
        shown += 1
        parts.append(f"<h3>{html.escape(row['method'])} &mdash; trial "
                     f"{html.escape(row['best_trial'])}</h3>")
        figures = [f"<figure>{_img(data, tag, min_width=560)}<figcaption>"
                   f"{html.escape(tag)}, epoch {step}"
                   f"</figcaption></figure>" for tag, step, data in images]
        parts.append(f'<div class="gallery maps">{"".join(figures)}</div>')
    if not shown:
        parts.append("<p>(no maps logged by the best trials)</p>")
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append(f"<h2>Notes</h2><ul>{items}</ul>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fgray study {html.escape(name)}</title>"
            '<link rel="icon" href="data:,">'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    target = out or join(study_dir, REPORT_FILE)
    write_text(target, page)
    return target


def results_command(study_dir: str, fmt: str = "table", *, tensorboard: bool = False,
                    plots: bool = False, html: bool = False) -> str:
    """What `fgray results STUDY_DIR` prints: the leaderboard in `fmt`; with `tensorboard`,
    the HParams table is refreshed from the trials table and the command to view the logs is
    added; with `plots`, the plots are written and their paths listed; with `html`, the
    one-page report is written (`html_report`) and its path printed. With json and any flag
    the output is one object: {"leaderboard", "tensorboard", "plots", "report", "notes"}."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    rows = leaderboard(study_dir)
    correlations = rung_correlations(study_dir)
    notes: list[str] = []
    try:
        write_comparisons(study_dir, rows)
    except OSError as exc:  # a study folder this user may read but not write
        notes.append(f"{COMPARISONS_FILE} not written ({exc})")
    if not (tensorboard or plots or html):
        text = render(rows, fmt)
        if fmt in ("table", "wide", "markdown") and correlations:
            text = text.rstrip("\n") + "\n\n" + "\n".join(rung_lines(correlations)) + "\n"
        return text + "".join(f"note: {n}\n" for n in notes if fmt != "json")
    command = paths = report = None
    if tensorboard:
        from fgray.results.tensorboard import write_hparams

        write_hparams(study_dir, load(study_dir, "trials").to_pylist())
        logdir = join(study_dir, "tensorboard")
        if "://" not in logdir:
            logdir = os.path.abspath(logdir)
        command = f"tensorboard --logdir {shlex.quote(logdir)}"
    if plots:
        paths = _write_plots(study_dir, None, notes)
    if html:
        # Its plots are the same files --plots writes; their notes are already in `notes`.
        report = html_report(study_dir, notes=[] if plots else notes)
    if fmt == "json":
        return json.dumps({"leaderboard": _json_safe(rows), "tensorboard": command,
                           "plots": paths, "report": report, "notes": notes}, indent=2,
                          default=str)
    lines = [render(rows, fmt).rstrip("\n"), ""]
    if fmt in ("table", "wide", "markdown") and correlations:
        lines += rung_lines(correlations) + [""]
    if command:
        lines.append(f"TensorBoard: {command}")
    if paths is not None:
        lines.append("plots:")
        lines += [f"  {p}" for p in paths]
    if report is not None:
        lines.append(f"report: {report}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
