"""Append-only Parquet tables: concurrent writers, schema evolution, coercion, errors.

The append-only tables are epochs, evals and trial_events (the trials table, one file per
trial, is tested in test_results_trials.py); trial_events has the trials schema."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from fgray.errors import UserError
from fgray.results import append, load
from fgray.results.schema import EPOCHS, EVALS, TRIALS, param_fields
from fgray.results.tables import append_files, latest_trials, load_trial
from fgray.results.trials import write_trials

UTC = dt.timezone.utc


def _trial_rows(writer: int, write: int) -> list[dict]:
    method = ("moco", "lcr", "sdf")[write % 3]
    return [{"study": "s", "trial_id": f"w{writer}-{write}-{k}", "method": method,
             "status": "completed", "best_val_knn_top1": writer + write / 100 + k / 1000,
             "epochs_run": write, "param.lr": 0.01 * (write + 1)} for k in range(2)]


def _files_under(root) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def _expected_ids(n_writers: int, n_writes: int) -> set[str]:
    return {r["trial_id"] for w in range(n_writers) for i in range(n_writes)
            for r in _trial_rows(w, i)}


def _check_all_readers_agree(study, expected_ids: set[str]) -> None:
    loaded = load(str(study), "trial_events")
    assert sorted(loaded.column("trial_id").to_pylist()) == sorted(expected_ids)
    frame = pd.read_parquet(study / "tables" / "trial_events")
    assert sorted(frame["trial_id"]) == sorted(expected_ids)
    dataset = ds.dataset(study / "tables" / "trial_events", format="parquet",
                         partitioning="hive")
    table = dataset.to_table()
    assert sorted(table.column("trial_id").to_pylist()) == sorted(expected_ids)
    # The partition value each reader reports matches the method each row was written with.
    by_id = {r["trial_id"]: r["method"]
             for w in range(8) for i in range(20) for r in _trial_rows(w, i)}
    assert all(by_id[t] == m for t, m in zip(frame["trial_id"], frame["method"].astype(str)))
    assert all(by_id[t] == m for t, m in zip(loaded.column("trial_id").to_pylist(),
                                            loaded.column("method").to_pylist()))
    leftovers = [p for p in _files_under(study) if os.path.basename(p).startswith(".")
                 or p.endswith(".tmp")]
    assert leftovers == []


def test_concurrent_threads_write_every_row(tmp_path):
    study = tmp_path / "study"
    jobs = [(w, i) for w in range(4) for i in range(5)]  # 20 writes from 4 workers
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda job: append(str(study), "trial_events",
                                                 _trial_rows(*job)), jobs))
    assert len(set(paths)) == 20 and all(p.endswith(".parquet") for p in paths)
    parquet = [p for p in _files_under(study) if p.endswith(".parquet")]
    assert len(parquet) == 20
    _check_all_readers_agree(study, _expected_ids(4, 5))
    assert load(str(study), "trial_events").num_rows == 40


def test_concurrent_processes_write_every_row(tmp_path):
    study = tmp_path / "study"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as pool:
        futures = [pool.submit(append, str(study), "trial_events", _trial_rows(w, i))
                   for w in range(4) for i in range(2)]
        paths = [f.result() for f in futures]
    assert len(set(paths)) == 8
    _check_all_readers_agree(study, _expected_ids(4, 2))


def test_rows_spanning_methods_write_one_file_per_method(tmp_path):
    rows = [{"trial_id": "a", "method": "moco"}, {"trial_id": "b", "method": "lcr"},
            {"trial_id": "c", "method": "moco"}]
    files = append_files(str(tmp_path), "trial_events", rows)
    assert sorted(os.path.basename(os.path.dirname(f)) for f in files) == [
        "method=lcr", "method=moco"]
    assert append(str(tmp_path), "trial_events", rows) == f"{tmp_path}/tables/trial_events"
    loaded = load(str(tmp_path), "trial_events")
    assert loaded.num_rows == 6
    assert loaded.schema.field("method").type == pa.string()


def test_trials_append_writes_one_file_per_trial(tmp_path):
    rows = [{"trial_id": "a", "method": "moco"}, {"trial_id": "b", "method": "lcr"},
            {"trial_id": "a", "method": "moco", "status": "completed"}]
    with pytest.raises(UserError, match="write_trials"):
        append_files(str(tmp_path), "trials", rows)  # states, not appended rows
    files = write_trials(str(tmp_path), rows)
    assert sorted(f.split("/tables/trials/")[1] for f in files) == [
        "method=lcr/trial-b.parquet", "method=moco/trial-a.parquet"]
    assert append(str(tmp_path), "trials", rows[:1]).endswith("method=moco/trial-a.parquet")
    loaded = load(str(tmp_path), "trials")
    assert loaded.num_rows == 2  # one row per trial: a's completed state stays
    assert dict(zip(loaded.column("trial_id").to_pylist(),
                    loaded.column("status").to_pylist())) == {"a": "completed", "b": None}
    assert load(str(tmp_path), "trial_events").num_rows == 4


def test_one_trials_rows_come_from_its_own_files(tmp_path, monkeypatch):
    """A file of one trial's rows is named after it; `load_trial` reads those and the files
    of several trials (or of the layout before the tag), never another trial's own."""
    import pyarrow.parquet as pq

    study = str(tmp_path)
    own = append(study, "epochs", [{"trial_id": "a/1", "method": "moco", "epoch": 1}])
    assert own.endswith("-a%2F1.parquet")
    other = append(study, "epochs", [{"trial_id": "b", "method": "moco", "epoch": 1}])
    append(study, "epochs", [{"trial_id": "a/1", "method": "moco", "epoch": 2},
                             {"trial_id": "b", "method": "moco", "epoch": 2}])
    read = []
    real = pq.read_schema
    monkeypatch.setattr(pq, "read_schema", lambda f, **kw: read.append(f) or real(f, **kw))
    rows = load_trial(study, "epochs", "moco", "a/1").to_pylist()
    assert sorted(r["epoch"] for r in rows) == [1, 2] and {r["trial_id"] for r in rows} == {"a/1"}
    assert other not in read and len(read) == 2
    assert load_trial(study, "epochs", "lcr", "a/1").num_rows == 0


def test_column_added_later_is_kept_and_earlier_rows_are_null(tmp_path):
    study = str(tmp_path)
    append(study, "epochs", [{"trial_id": "t1", "method": "moco", "epoch": 0, "loss": 2.0,
                              "loss_inst": 1}])
    append(study, "epochs", [{"trial_id": "t2", "method": "lcr", "epoch": 0, "loss": 3.0,
                              "loss_inst": 1.5, "loss_rationale": 0.25}])
    table = load(study, "epochs")
    assert table.schema.field("loss_rationale").type == pa.float64()
    # Loss terms are always float64, even when a method returned an int.
    assert table.schema.field("loss_inst").type == pa.float64()
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert rows["t1"]["loss_rationale"] is None
    assert rows["t2"]["loss_rationale"] == 0.25
    assert rows["t1"]["loss_inst"] == 1.0
    # Declared columns keep the declared order, then extras sorted by name.
    assert table.schema.names[:len(EPOCHS.names)] == EPOCHS.names
    assert table.schema.names[len(EPOCHS.names):] == ["loss_inst", "loss_rationale"]


def test_conflicting_dynamic_types_unify_to_string(tmp_path):
    study = str(tmp_path)
    append(study, "trials", [{"trial_id": "a", "method": "moco", "param.fusion": 1}])
    append(study, "trials", [{"trial_id": "b", "method": "moco", "param.fusion": "product"}])
    table = load(study, "trials")
    assert table.schema.field("param.fusion").type == pa.string()
    assert sorted(table.column("param.fusion").to_pylist()) == ["1", "product"]


def test_declared_columns_are_coerced(tmp_path):
    study = str(tmp_path)
    start = dt.datetime(2024, 5, 1, 12, 0, 0)  # naive: taken as UTC
    append(study, "trials", [{
        "trial_id": "t", "method": "moco", "image_size": "64", "best_epoch": 3.0,
        "seed": 7, "start_time": start, "end_time": start.timestamp() + 0,
        "params_json": {"lr": 0.1}, "gpu_hours": 1, "error": None,
        "searched": {"x": [1, 2]}, "flag": True}])
    row = load(study, "trials").to_pylist()[0]
    assert row["image_size"] == 64 and row["best_epoch"] == 3
    assert row["start_time"] == start.replace(tzinfo=UTC)
    assert row["end_time"] == dt.datetime.fromtimestamp(start.timestamp(), tz=UTC)
    assert json.loads(row["params_json"]) == {"lr": 0.1}
    assert row["gpu_hours"] == 1.0 and row["error"] is None and row["test_rank1"] is None
    assert json.loads(row["searched"]) == {"x": [1, 2]}
    assert row["flag"] is True
    schema = load(study, "trials").schema
    for field in TRIALS:
        assert schema.field(field.name).type == field.type


def test_uncastable_value_names_the_column(tmp_path):
    with pytest.raises(ValueError, match=r"trials\.best_epoch: cannot store 2\.5"):
        append(str(tmp_path), "trials", [{"trial_id": "t", "method": "m", "best_epoch": 2.5}])


def test_closed_value_sets_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"trials\.status: 'done' is not one of completed, "
                                         "stopped, failed, running"):
        append(str(tmp_path), "trials", [{"trial_id": "t", "method": "m", "status": "done"}])
    with pytest.raises(ValueError, match=r"evals\.split: 'train'"):
        append(str(tmp_path), "evals", [{"trial_id": "t", "method": "m", "split": "train"}])
    assert not (tmp_path / "tables").exists()


def test_row_without_method_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="row 1 has no 'method'"):
        append(str(tmp_path), "evals", [{"method": "moco"}, {"trial_id": "x"}])


def test_unknown_table_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown table 'runs': expected one of trials, "
                                        "epochs, evals, trial_events"):
        append(str(tmp_path), "runs", [{"method": "moco"}])
    (tmp_path / "tables").mkdir()
    with pytest.raises(UserError, match="unknown table 'runs'"):
        load(str(tmp_path), "runs")


def test_missing_or_non_study_dir_is_a_user_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as err:
        load(str(missing), "trials")
    assert str(err.value) == f"{missing}: not an fgray study (no tables/ found)"
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="not an fgray study"):
        load(str(tmp_path / "other"), "trials")


def test_empty_table_has_the_declared_schema(tmp_path):
    append(str(tmp_path), "trials", [{"trial_id": "t", "method": "moco"}])
    evals = load(str(tmp_path), "evals")
    assert evals.num_rows == 0 and evals.schema == EVALS
    # Only an unfinished temp file in the table: still empty.
    part = tmp_path / "tables" / "epochs" / "method=moco"
    part.mkdir(parents=True)
    (part / ".part-x.parquet.tmp").write_bytes(b"partial")
    assert load(str(tmp_path), "epochs").schema == EPOCHS


def test_filter_by_dict_and_expression(tmp_path):
    study = str(tmp_path)
    append(study, "evals", [
        {"trial_id": "t1", "method": "moco", "split": "test", "protocol": "knn",
         "metric": "top1", "value": 0.5, "seed": 0},
        {"trial_id": "t1", "method": "moco", "split": "val", "protocol": "knn",
         "metric": "top1", "value": 0.4, "seed": 0}])
    append(study, "evals", [{"trial_id": "t2", "method": "lcr", "split": "test",
                             "protocol": "knn", "metric": "top1", "value": 0.6, "seed": 1}])
    assert load(study, "evals", filter={"method": "lcr"}).column("value").to_pylist() == [0.6]
    test = load(study, "evals", filter=(ds.field("split") == "test") & (ds.field("seed") == 0))
    assert test.column("trial_id").to_pylist() == ["t1"]
    assert test.column("value").to_pylist() == [0.5]


def test_method_with_special_characters_round_trips(tmp_path):
    append(str(tmp_path), "trials", [{"trial_id": "t", "method": "moco v3/b"}])
    assert load(str(tmp_path), "trials").column("method").to_pylist() == ["moco v3/b"]


def test_param_fields_json_and_columns():
    fields = param_fields({"lr": 0.1, "tau": 0.2}, {"lr": 0.5, "epochs": 10})
    assert json.loads(fields["params_json"]) == {"lr": 0.1, "tau": 0.2, "epochs": 10}
    assert fields["param.lr"] == 0.1 and fields["param.tau"] == 0.2
    assert "param.epochs" not in fields


def test_latest_trials_prefers_terminal_then_later_end():
    t0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
    rows = [
        {"method": "moco", "trial_id": "a", "status": "running", "epochs_run": 5},
        {"method": "moco", "trial_id": "a", "status": "stopped", "end_time": t0,
         "epochs_run": 3},
        {"method": "moco", "trial_id": "a", "status": "running", "epochs_run": 9},
        {"method": "moco", "trial_id": "b", "status": "stopped", "end_time": t0},
        {"method": "moco", "trial_id": "b", "status": "completed",
         "end_time": t0 + dt.timedelta(hours=1)},
        {"method": "lcr", "trial_id": "a", "status": "failed"},
    ]
    latest = {(r["method"], r["trial_id"]): r["status"] for r in latest_trials(rows)}
    assert latest == {("moco", "a"): "stopped", ("moco", "b"): "completed",
                      ("lcr", "a"): "failed"}
