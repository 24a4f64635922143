"""fgray.tune without a cluster: search spaces (validated against each method's Config), the
Optuna searcher and ASHA wiring, trial specs, concurrency, the study CLI's flags."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import optuna
import pytest

from fgray.engine.optim import OptimConfig
from fgray.engine.spec import TrainConfig
from fgray.errors import UserError
from fgray.methods import method_class, method_names
from fgray.train.cluster import ClusterResources
from fgray.train.resources import WorkerResources
from fgray.tune.cli import _fixed, _methods, build_parser, study_from_args
from fgray.tune.presets import PRESETS
from fgray.tune.spaces import SHARED_KNOBS, Space, space_for
from fgray.tune.study import (
    SEARCH_METRIC,
    Job,
    JobKind,
    StudyConfig,
    TrialSetup,
    concurrency_for,
    error_line,
    make_scheduler,
    make_searcher,
    prepare,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


METHODS = list(method_names())
# The knobs METHODS.md names for each method's sweep (Config field names).
EXPECTED = {
    "lcr": {"capacity", "depth", "nu", "t"},
    "lodisc": {"keep_ratio", "local_weight", "fusion", "sample_temperature"},
    "sdf": {"epsilon", "q_var", "q_cam", "set_rule", "alpha", "nu", "perturb"},
    "ppssl": {"iadm_weight", "keep_fraction"},
    "moco": set(), "mocov3": set(),
}


def _study(tmp_path, **kw) -> StudyConfig:
    base = dict(name="s", storage=str(tmp_path), data={"format": "cub", "root": "/data/cub"},
                methods=["moco"], epochs=4, image_size=32, batch_size=16,
                backbones={"moco": "test_resnet", "lcr": "test_resnet"},
                fixed={"moco": {"method.queue_size": 64, "method.mlp_hidden": 32},
                       "lcr": {"method.queue_size": 64, "method.mlp_hidden": 32}})
    base.update(kw)
    return StudyConfig(**base)


@pytest.mark.parametrize("method", METHODS)
def test_space_knobs_are_config_fields(method):
    space = space_for(method, shared=SHARED_KNOBS)  # validates
    fields = {f.name for f in dataclasses.fields(method_class(method).Config)}
    optim = {f.name for f in dataclasses.fields(OptimConfig)}
    names = space.knob_names() - set(space.structural)
    assert EXPECTED[method] <= names
    assert names - set(SHARED_KNOBS) <= fields
    assert names & set(SHARED_KNOBS) <= fields | optim


@pytest.mark.parametrize("method", METHODS)
def test_defaults_are_the_config_defaults(method):
    space = Space(method, shared=("lr", "weight_decay"))
    point = space.defaults()
    cls = method_class(method)
    cfg = cls.Config()
    for key, value in space.settings(point).items():
        section, name = key.split(".")
        if section == "method":
            assert value == getattr(cfg, name), name
        else:
            assert value == cls.optim_defaults.get(name, getattr(OptimConfig(), name)), name


@pytest.mark.parametrize("method", METHODS)
def test_sampled_points_build_valid_runs(tmp_path, method):
    study = _study(tmp_path, methods=[method], shared=["lr", "temperature", "momentum"],
                   fixed={method: {}}, backbones={method: None})
    setup = TrialSetup(study, WorkerResources())
    space = study.space(method)
    ot = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(8):
        trial = ot.ask()
        space(trial)
        params = trial.params
        spec = setup.spec_for(Job(JobKind.SEARCH, method, params))  # raises on a bad value
        for key, value in space.settings(params).items():
            section, name = key.split(".")
            got = getattr(spec.method_config if section == "method" else spec.optim, name)
            assert got == value
        ot.tell(trial, 0.0)


def test_a_misspelled_knob_fails_fast(monkeypatch):
    def bad(s, fixed):
        s.float("capacityy", 1, 256, default=32)

    monkeypatch.setattr(method_class("moco"), "search_space", staticmethod(bad))
    with pytest.raises(UserError, match="'capacityy' is not a field of MoCoV2Config"):
        space_for("moco")


def test_a_default_outside_its_range_fails_fast(tmp_path):
    with pytest.raises(UserError, match="lies outside its search range"):
        space_for("lcr", fixed={"capacity": 512})


def test_conditional_knobs():
    lodisc, sdf = Space("lodisc", ()), Space("sdf", ())
    ot = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"topk": 0, "stochastic": 0, "gaussian": 0, "shuffle": 0}
    for _ in range(40):
        trial = ot.ask()
        p = lodisc._run(trial)
        seen[p["sampling"]] += 1
        assert ("sample_temperature" in p) == (p["sampling"] == "stochastic")
        q = sdf._run(trial)
        seen[q["perturb"]] += 1
        assert ("epsilon" in q) == (q["perturb"] == "gaussian")
        ot.tell(trial, 0.0)
    assert min(seen.values()) > 0
    assert lodisc.defaults()["sampling"] == "topk"
    assert "sampling" not in lodisc.settings(lodisc.defaults())


def test_ppssl_distillation_knobs_need_a_teacher():
    assert "kd_weight" not in Space("ppssl", ()).knob_names()
    with_teacher = Space("ppssl", (), (("clip_weights", "/w.bin"), ("corpus_path", "/c.arrow")))
    assert {"kd_weight", "kd_temperature"} <= with_teacher.knob_names()


def test_shared_ranges_sit_around_the_recipe():
    ot = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = Space("moco", SHARED_KNOBS)
    for _ in range(30):
        trial = ot.ask()
        p = space._run(trial)
        assert 0.003 <= p["lr"] <= 0.3 and 1e-5 <= p["weight_decay"] <= 1e-3
        assert 0.99 <= p["momentum"] <= 0.9999 and 0.05 <= p["temperature"] <= 0.5
        ot.tell(trial, 0.0)
    with pytest.raises(UserError, match="shared knob 'beta'"):
        Space("moco", ("beta",))


def test_searcher_starts_with_the_recipe_and_stores_a_journal(tmp_path):
    study = _study(tmp_path, methods=["lcr"], points={"lcr": [{"capacity": 200}]})
    searcher = make_searcher(study, "lcr")
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == Space("lcr", ("lr",)).defaults()
    assert second["capacity"] == 200 and set(second) == set(first)
    journal = tmp_path / "s" / "optuna" / "journal.log"
    assert journal.is_file()
    stored = optuna.load_study(study_name="lcr", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert stored.user_attrs == {"method": "lcr", "metric": SEARCH_METRIC}
    assert len(stored.trials) == 2


def test_scheduler_stops_on_per_epoch_val_at_its_rungs(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    asha = make_scheduler(_study(tmp_path, grace_period=1, reduction_factor=3, epochs=9))
    trials = {t: SimpleNamespace(trial_id=t, config={}) for t in "abde"}
    for trial in trials.values():
        asha.on_trial_add(None, trial)

    def report(t, epoch, value):
        return asha.on_trial_result(None, trials[t], {"epoch": epoch, "val_knn_top1": value})

    # Rungs at epochs 1, 3 (and 9, the budget): the bottom two thirds stop there.
    assert report("a", 1, 30.0) == TrialScheduler.CONTINUE
    assert report("b", 1, 20.0) == TrialScheduler.STOP
    assert report("a", 2, 0.0) == TrialScheduler.CONTINUE  # no rung at epoch 2
    assert report("d", 3, 30.0) == TrialScheduler.CONTINUE
    assert report("e", 3, 1.0) == TrialScheduler.STOP


def test_trial_spec_from_params(tmp_path):
    study = _study(tmp_path, methods=["lcr"], seed=5)
    setup = TrialSetup(study, WorkerResources())
    spec = setup.spec_for(Job(JobKind.SEARCH, "lcr", {"capacity": 8, "lr": 0.1, "nu": 0.02}))
    assert spec.method == "lcr" and spec.backbone == "test_resnet"
    assert spec.method_config.capacity == 8 and spec.optim.lr == 0.1
    assert spec.method_config.queue_size == 64
    assert spec.train.seed == 5 and spec.train.eval_every == 1 and spec.train.epochs == 4
    retrain = Job(JobKind.RETRAIN, "moco", {"lr": 0.2}, seed=2)
    other = setup.spec_for(retrain)
    assert other.method == "moco" and other.train.seed == 2 and other.optim.lr == 0.2
    assert retrain.recorded_params() == {"seed": 2, "lr": 0.2}
    assert Job.of(retrain.config()) == retrain  # what a trial's config carries


def test_in_trial_resources():
    in_trial = WorkerResources(workers=0, cpus_per_worker=1.0)
    assert in_trial.in_trial and in_trial.trial_resources() == {"cpu": 1.0}
    assert (in_trial.cpus, in_trial.gpus) == (1.0, 0.0)
    assert concurrency_for(in_trial, ClusterResources(cpus=2, gpus=0)) == 2
    gpu = WorkerResources(workers=0, cpus_per_worker=2, gpus_per_worker=0.5)
    assert gpu.trial_resources() == {"cpu": 2, "gpu": 0.5}
    assert concurrency_for(gpu, ClusterResources(cpus=16, gpus=1)) == 2
    driver = WorkerResources(workers=2)
    assert driver.trial_resources()["cpu"] == 0  # a Train run's workers hold the CPUs
    with pytest.raises(UserError, match="--workers -1: expected 0"):
        WorkerResources(workers=-1)


def test_concurrency_from_cluster_resources():
    cpu = WorkerResources(workers=2, cpus_per_worker=1)
    assert concurrency_for(cpu, ClusterResources(cpus=8, gpus=0)) == 4
    gpu = WorkerResources(workers=1, cpus_per_worker=2, gpus_per_worker=0.5)
    assert concurrency_for(gpu, ClusterResources(cpus=16, gpus=2)) == 4  # two per GPU
    assert concurrency_for(gpu, ClusterResources(cpus=3, gpus=2)) == 1  # CPUs limit
    assert concurrency_for(cpu, ClusterResources(cpus=8, gpus=0), override=3) == 3
    with pytest.raises(UserError, match="one trial needs 2 CPUs"):
        concurrency_for(cpu, ClusterResources(cpus=1, gpus=0))


@pytest.mark.parametrize("kw, message", [
    ({"grace_period": 5}, "--grace-period 5 exceeds --epochs 4"),
    ({"reduction_factor": 1}, "--reduction-factor 1: expected 2 or more"),
    ({"methods": []}, "no methods"),
    ({"protocols": ["lineer"]}, "protocol 'lineer'"),
    ({"workers": -1}, "--workers -1: expected 0 or more"),
])
def test_study_config_checks(tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        _study(tmp_path, **kw)


def test_prepare_stores_the_study_and_refuses_to_overwrite(tmp_path):
    study = _study(tmp_path, methods=["moco", "lcr"])
    prepare(study)
    stored = StudyConfig.from_json((tmp_path / "s" / "study.json").read_text())
    assert stored == study
    with pytest.raises(UserError, match="already exists.*--resume"):
        prepare(study)
    bad = _study(tmp_path, name="t", points={"moco": [{"capacity": 3}]})
    with pytest.raises(UserError, match="'capacity' is not a knob"):
        prepare(bad)
    typo = _study(tmp_path, name="u", fixed={"moco": {"queue_sise": 3}})
    with pytest.raises(UserError, match="unknown setting 'queue_sise'"):
        prepare(typo)


def test_error_line_takes_the_exception():
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
             "    raise FloatingPointError('non-finite loss at epoch 2: {}')\n"
             "FloatingPointError: non-finite loss at epoch 2: {'loss': nan}\n")
    assert error_line(trace) == "FloatingPointError: non-finite loss at epoch 2: {'loss': nan}"
    assert error_line("ray.exceptions.RayTaskError(KeyError): boom").startswith("ray.exc")
    assert error_line(None) == "unknown error"


def test_cli_flags_to_study(tmp_path, synth_root):
    points = tmp_path / "points.json"
    points.write_text(json.dumps([{"lr": 0.1}]))
    parser = build_parser("cub_sweep.py", "x", mode="search")
    args = parser.parse_args(["--data-root", str(synth_root), "--preset", "smoke", "--methods",
                              "moco,lcr", "--trials", "5", "--storage", str(tmp_path),
                              "--set", "lcr.method.capacity=16", "--set", "queue_size=128",
                              "--points", str(points), "--search-shared", "lr,momentum"])
    study = study_from_args(args, dataset="cub", mode="search", default_name="cub_sweep-smoke")
    smoke = PRESETS["smoke"]
    assert study.methods == ["moco", "lcr"] and study.trials == 5
    assert study.epochs == smoke.epochs and study.image_size == smoke.image_size
    assert study.backbones == {"moco": "tf_efficientnet_lite0.in1k",
                               "lcr": "tf_efficientnet_lite0.in1k"}
    assert study.init == "imagenet" and study.workers == 0 and study.seeds == 3
    assert study.protocols == ["retrieval", "knn", "linear", "localisation"]
    assert study.data["val_fraction"] == 0.25
    assert study.fixed["lcr"]["method.capacity"] == 16
    assert "method.capacity" not in study.fixed["moco"]
    assert study.fixed["moco"]["method.queue_size"] == 128
    assert study.fixed["moco"]["method.mlp_hidden"] == 512  # the preset's scale
    assert study.points == {"moco": [{"lr": 0.1}], "lcr": [{"lr": 0.1}]}
    assert study.shared == ["lr", "momentum"] and study.data["root"] == str(synth_root)
    assert study.study_dir == f"{tmp_path}/cub_sweep-smoke"


def test_cli_flags_override_the_preset(tmp_path, synth_root):
    parser = build_parser("cub_sweep.py", "x", mode="search")
    args = parser.parse_args(["--data-root", str(synth_root), "--preset", "paper", "--workers",
                              "0", "--seeds", "1", "--protocols", "knn", "--val-fraction",
                              "0.3", "--storage", str(tmp_path)])
    study = study_from_args(args, dataset="cub", mode="search", default_name="x")
    assert (study.workers, study.seeds, study.protocols) == (0, 1, ["knn"])
    assert study.data["val_fraction"] == 0.3
    paper = study_from_args(parser.parse_args(["--data-root", str(synth_root), "--preset",
                                               "paper", "--storage", str(tmp_path)]),
                            dataset="cub", mode="search", default_name="x")
    assert paper.workers == 1 and paper.init == "imagenet"  # Ray Train DDP
    assert paper.backbones["lcr"] == "resnet50.tv_in1k"
    assert paper.backbones["lodisc"] == "deit_base_patch16_224.fb_in1k"
    compare = build_parser("compare_methods.py", "x", mode="compare")
    study = study_from_args(compare.parse_args(["--data-root", str(synth_root), "--preset",
                                                "smoke", "--storage", str(tmp_path)]),
                            dataset="cub", mode="compare", default_name="x")
    assert study.seeds == 3 and study.workers == 0


def test_presets_name_their_weights():
    import timm

    smoke, paper = PRESETS["smoke"], PRESETS["paper"]
    for preset in (smoke, PRESETS["laptop"]):
        assert preset.workers == 0 and preset.seeds >= 3 and preset.init == "imagenet"
        assert "localisation" in preset.protocols
        # Every method, LoDisc included (on its CNN location map), on the same lite0 weights.
        assert {preset.backbone_for(m) for m in preset.methods} == {"tf_efficientnet_lite0.in1k"}
    assert (smoke.image_size, smoke.epochs, smoke.trials, smoke.batch_size) == (96, 2, 2, 32)
    # The calibrated embedded set (docs/configuration.md): init kNN 35.7 % at 96 px, chance 10 %.
    assert smoke.synthetic == {"classes": 10, "per_class": 60, "size": 96}
    assert smoke.settings_for("moco")["train.knn_k"] == 20
    assert smoke.settings_for("lodisc")["method.embed"] == "encoder"
    assert "method.embed" not in smoke.settings_for("lcr")
    assert smoke.settings_for("moco")["method.queue_size"] == 1024
    assert smoke.settings_for("lodisc")["method.mlp_hidden"] == 512
    assert "method.queue_size" not in smoke.settings_for("lodisc")  # MoCo v3 has no queue
    assert paper.workers == 1 and paper.seeds >= 3
    for name in (paper.cnn_backbone, paper.vit_backbone, smoke.cnn_backbone):
        # Exact weights: a timm name with its pretrained tag, which timm knows.
        assert "." in name and name in timm.list_pretrained(name)


def test_cli_user_errors():
    smoke = PRESETS["smoke"]
    with pytest.raises(UserError, match="--methods 'moco,nope'"):
        _methods("moco,nope", smoke)
    assert _fixed(["sdf.alpha=2"], ["moco"], smoke)["moco"] == smoke.settings_for("moco")
    with pytest.raises(UserError, match="ambiguous for sdf"):
        _fixed(["warmup_epochs=2"], ["moco", "sdf"], smoke)
    parser = build_parser("cub_sweep.py", "x", mode="search")
    with pytest.raises(UserError, match="not allowed with argument"):
        parser.parse_args(["--synthetic", "--data-root", "/x"])
    args = parser.parse_args([])
    with pytest.raises(UserError, match="expected --data-root ROOT or --synthetic"):
        study_from_args(args, dataset="cub", mode="search", default_name="x")


def test_presets_fit_their_methods():
    for preset in PRESETS.values():
        for method in preset.methods:
            fields = {f"method.{f.name}" for f in dataclasses.fields(method_class(method).Config)}
            train = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
            assert set(preset.settings_for(method)) <= fields | train
        assert math.isfinite(preset.epochs) and preset.grace_period <= preset.epochs


def test_restored_searcher_reruns_a_point_asked_after_its_snapshot(tmp_path):
    study = _study(tmp_path, methods=["lcr"], points={"lcr": [{"capacity": 200}]})
    searcher = make_searcher(study, "lcr")
    as_pickled = pickle.dumps(searcher)  # what tuner.pkl holds
    assert searcher.suggest("a") == Space("lcr", ("lr",)).defaults()
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))
    assert searcher.suggest("b")["capacity"] == 200  # asked, then the driver dies
    restored = pickle.loads(as_pickled)
    restored.restore(str(snapshot))
    assert restored.suggest("b2")["capacity"] == 200  # the point is not lost
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "s" / "optuna" / "journal.log")))
    states = [t.state.name for t in optuna.load_study(study_name="lcr", storage=journal).trials]
    assert states.count("FAIL") == 1 and states.count("RUNNING") == 2
