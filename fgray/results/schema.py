"""The declared Arrow schemas of a study's tables, in one place.

Five tables live under `STUDY_DIR/tables/<name>/`, hive-partitioned by `method`:

- `trials`: one row per trial, its current state (one file per trial, replaced atomically:
  see `fgray.results.tables`); searched parameters appear in `params_json` and again as
  dynamic `param.<name>` columns so pandas/DuckDB users can filter on them.
- `trial_events`: append-only history of `trials`, every state written (same schema).
- `epochs`: one row per trial and epoch; every loss term is a dynamic float64 column,
  `loss` for the total and `loss_<term>` for each named term.
- `evals`: one row per (trial, split, protocol, metric, seed) evaluation result.
- `outcomes`: one row per (final model, test image): the per-image outcome behind each test
  metric (`OUTCOME_METRICS`; see `fgray.engine.evaluate.evaluate_method`), which the paired
  comparisons resample (`fgray.results.stats`).

Declared columns are coerced to these types on write; any other column is kept with an
inferred type and the schemas of all files are unified on read, so columns added later are
never dropped.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from fgray.errors import UserError

PARTITION_COLUMN = "method"
"""Hive partition key: files live under `tables/<table>/method=<value>/`."""

TIMESTAMP = pa.timestamp("us", tz="UTC")

TRIAL_STATUSES = ("completed", "stopped", "failed", "running")
EVAL_SPLITS = ("val", "test")
EVAL_PROTOCOLS = ("retrieval", "knn", "linear", "localisation")

PARAM_PREFIX = "param."
LOSS_PREFIX = "loss_"

# Final test metrics that the trials table carries and the leaderboard reports: retrieval,
# kNN and linear probe (percent), localisation of the method's map (fractions in [0, 1]).
TEST_METRICS = ("test_rank1", "test_rank5", "test_map", "test_knn_top1", "test_knn_top5",
                "test_linear_top1", "test_linear_top5", "test_loc_box_mass",
                "test_loc_pointing", "test_loc_part_hits")

_KEYS = [
    pa.field("study", pa.string()),
    pa.field("trial_id", pa.string()),
    pa.field(PARTITION_COLUMN, pa.string()),
]

TRIALS = pa.schema(_KEYS + [
    pa.field("backbone", pa.string()),  # the weights' timm name, tag included (ImageNet init)
    pa.field("init", pa.string()),  # random, imagenet or a weights file
    pa.field("dataset", pa.string()),
    pa.field("image_size", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("best_val_knn_top1", pa.float64()),
    pa.field("best_epoch", pa.int32()),
    pa.field("epochs_run", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("gpu_hours", pa.float64()),
    pa.field("cpu_hours", pa.float64()),
    pa.field("start_time", TIMESTAMP),
    pa.field("end_time", TIMESTAMP),
    pa.field("node_id", pa.string()),  # the Ray node of its last epoch (rank 0's)
    pa.field("fgray_version", pa.string()),
    pa.field("git_revision", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("params_json", pa.string()),
] + [pa.field(name, pa.float64()) for name in TEST_METRICS])

EPOCHS = pa.schema(_KEYS + [
    pa.field("epoch", pa.int32()),
    pa.field("lr", pa.float64()),
    pa.field("images_per_s", pa.float64()),
    pa.field("peak_mem_mb", pa.float64()),
    pa.field("epoch_time_s", pa.float64()),
    pa.field("val_knn_top1", pa.float64()),
    pa.field("val_knn_top5", pa.float64()),
    pa.field("loss", pa.float64()),
    pa.field("node_id", pa.string()),  # the Ray node that ran the epoch (rank 0's)
])

EVALS = pa.schema(_KEYS + [
    pa.field("split", pa.string()),
    pa.field("protocol", pa.string()),
    pa.field("metric", pa.string()),
    pa.field("value", pa.float64()),
    pa.field("seed", pa.int64()),
])

# Per-image outcome columns of the `outcomes` table: the metric's name in evaluate_method's
# output (its leaderboard column is `test_<name>`); `loc_parts_visible` weighs part hits.
OUTCOME_METRICS = ("rank1", "rank5", "map", "knn_top1", "knn_top5", "linear_top1",
                   "linear_top5", "loc_box_mass", "loc_pointing", "loc_part_hits")
OUTCOME_WEIGHTS = {"loc_part_hits": "loc_parts_visible"}

OUTCOMES = pa.schema(_KEYS + [
    pa.field("split", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("image_id", pa.int64()),
    pa.field("label", pa.int64()),
] + [pa.field(name, pa.float64()) for name in OUTCOME_METRICS]
  + [pa.field(name, pa.float64()) for name in OUTCOME_WEIGHTS.values()])

SCHEMAS: dict[str, pa.Schema] = {"trials": TRIALS, "epochs": EPOCHS, "evals": EVALS,
                                 "trial_events": TRIALS, "outcomes": OUTCOMES}

# Declared string columns with a closed set of values, checked on write.
ALLOWED_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("trials", "status"): TRIAL_STATUSES,
    ("trial_events", "status"): TRIAL_STATUSES,
    ("evals", "split"): EVAL_SPLITS,
    ("evals", "protocol"): EVAL_PROTOCOLS,
    ("outcomes", "split"): EVAL_SPLITS,
}


def schema_for(table: str) -> pa.Schema:
    """The declared schema of `table`; an unknown name is a user error."""
    try:
        return SCHEMAS[table]
    except KeyError:
        raise UserError(
            f"unknown table {table!r}: expected one of {', '.join(SCHEMAS)}") from None


def dynamic_type(table: str, column: str) -> pa.DataType | None:
    """The type a dynamic (undeclared) column always gets, or None to infer it from values.

    Loss terms are float64 whatever Python type a method returns, so one int-valued term
    in one file cannot make the column's type differ across files.
    """
    if table == "epochs" and column.startswith(LOSS_PREFIX):
        return pa.float64()
    return None


def param_fields(searched: dict[str, Any], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trials-row fields that describe a trial's parameters.

    `params_json` holds every searched and fixed parameter (searched values win on a clash);
    each searched parameter also gets its own `param.<name>` column.
    """
    merged = {**(fixed or {}), **searched}
    out: dict[str, Any] = {"params_json": json.dumps(merged, sort_keys=True, default=str)}
    out.update({f"{PARAM_PREFIX}{name}": value for name, value in searched.items()})
    return out
