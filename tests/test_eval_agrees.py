"""`fgray eval CHECKPOINT` agrees with the study: it reads the checkpoint's own data spec
(split, validation fraction, seed, image size, normalisation) and reproduces, exactly, the
table row the study's test evaluation recorded for that checkpoint; and the per-image
outcomes the study records average to the same metrics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fgray.cli import main
from fgray.engine.run import run_pretraining
from fgray.engine.spec import DataSpec, build_spec
from fgray.results import leaderboard, load
from fgray.results.ranking import eval_column
from fgray.results.records import record_test
from fgray.results.trials import write_trials

PROTOCOLS = ["retrieval", "knn", "linear", "localisation"]
SEED = 3


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """A 1-epoch MoCo run with a validation fraction (0.5) and a seed (3) that are not the
    CLI's defaults, its best checkpoint evaluated the way a study's final evaluation does
    (`fgray.tune.study.evaluation._evaluate_checkpoint` + `record_test`)."""
    from fgray.tune.study.evaluation import _evaluate_checkpoint

    tmp = tmp_path_factory.mktemp("agree")
    data = DataSpec(format="cub", root=str(synth_root), val_fraction=0.5,
                    cache_dir=str(tmp / "cache"))
    spec = build_spec("moco", data, backbone="test_resnet",
                      train={"epochs": 1, "batch_size": 16, "image_size": 32, "knn_k": 10,
                             "seed": SEED},
                      sets={"queue_size": "64", "mlp_hidden": "64", "dim": "32"})
    run_pretraining(spec, tmp / "run", resume=False, progress=False)
    best = tmp / "run" / "checkpoints" / "best"
    study = str(tmp / "study")
    write_trials(study, [{"study": "s", "trial_id": "t1", "method": "moco",
                          "status": "completed", "best_val_knn_top1": 50.0, "seed": SEED,
                          "config_hash": "h", "backbone": "test_resnet", "init": "random"}])
    outcomes: dict = {}
    metrics = _evaluate_checkpoint(str(best), dataclasses.asdict(data), PROTOCOLS, SEED, None,
                                   outcomes)
    record_test(study, "moco", "t1", metrics, seed=SEED, study="s", outcomes=outcomes)
    return {"best": best, "study": study, "metrics": metrics, "tmp": tmp}


def test_fgray_eval_reproduces_the_study_row_exactly(trained, capsys):
    out = trained["tmp"] / "eval.json"
    # No data flags: the checkpoint's own spec decides.
    assert main(["eval", str(trained["best"]), "--protocols", ",".join(PROTOCOLS),
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]
    study = trained["study"]
    evals = {eval_column(r["protocol"], r["metric"]): r["value"]
             for r in load(study, "evals").to_pylist() if r["trial_id"] == "t1"}
    trial = load(study, "trials").to_pylist()[0]
    row = next(r for r in leaderboard(study) if r["method"] == "moco")
    assert len(evals) == 10
    for column, value in evals.items():
        name = column[len("test_"):]
        assert got[name] == value, name  # exactly, not approximately
        assert trial[column] == value and row[column] == value
    # The CLI's old default (10 % validation) would change the kNN bank: the checkpoint's
    # 50 % is what reproduced the row, and passing it again changes nothing.
    assert main(["eval", str(trained["best"]), "--protocols", "knn", "--val-fraction", "0.5",
                 "--out", str(trained["tmp"] / "again.json")]) == 0
    again = json.loads((trained["tmp"] / "again.json").read_text())["metrics"]
    assert again["knn_top1"] == got["knn_top1"]
    capsys.readouterr()


def test_per_image_outcomes_average_to_the_metrics(trained):
    rows = load(trained["study"], "outcomes").to_pylist()
    metrics = trained["metrics"]
    assert len(rows) == len({r["image_id"] for r in rows}) > 0
    assert {r["seed"] for r in rows} == {SEED}
    for name in ("rank1", "rank5", "knn_top1", "knn_top5", "linear_top1", "linear_top5",
                 "loc_box_mass", "loc_pointing"):
        values = np.array([np.nan if r[name] is None else r[name] for r in rows], float)
        # float32 on the device, float64 here
        assert np.nanmean(values) == pytest.approx(metrics[name], rel=1e-6), name
    ap = np.array([np.nan if r["map"] is None else r["map"] for r in rows], float)
    assert np.nanmean(ap) == pytest.approx(metrics["map"], rel=1e-6)
    hits = np.array([r["loc_part_hits"] or 0.0 for r in rows])
    visible = np.array([r["loc_parts_visible"] or 0.0 for r in rows])
    assert (hits * visible).sum() / visible.sum() == pytest.approx(metrics["loc_part_hits"])


def test_eval_flags_override_the_checkpoint(trained, capsys):
    assert main(["eval", str(trained["best"]), "--protocols", "retrieval", "--data-root",
                 str(trained["tmp"] / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
