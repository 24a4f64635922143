"""What a trial of a study does, as one typed value: a `Job` (its `JobKind`, its method, its
parameters, seed and evaluation target), stored in the trial's config under `JOB` -- so no
part of the study guesses a trial's kind from which keys its config holds -- and
`TrialSetup`, what every job of one experiment shares and the run spec a job trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fgray.engine.spec import RunSpec, build_spec
from fgray.results.records import EpochRecorder, weights_name
from fgray.train.hooks import EpochHookSpec
from fgray.train.resources import WorkerResources
from fgray.tune.study.config import INIT, StudyConfig

JOB = "job"  # the trial config's one key: the job, as a plain dict (Tune logs and pickles it)


class JobKind(str, Enum):
    SEARCH = "search"  # a configuration the method's TPE asked for; ASHA may stop it
    RETRAIN = "retrain"  # a method's best configuration with another seed; never stopped early
    POINT = "point"  # a fixed configuration (compare, --more-seeds); never stopped early
    EVALUATE = "evaluate"  # a final model (`target`: its trial id) or init row tested once


@dataclass(frozen=True)
class Job:
    """One trial's work. `params`: the searched knobs (a training job); `seed`: the run's
    seed when it is not the study's; `target`: the trial id (or init row name) an
    evaluation tests; `project`: its test features also go to the embedding projector."""

    kind: JobKind
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    target: str | None = None
    project: bool = False

    @property
    def trains(self) -> bool:
        return self.kind is not JobKind.EVALUATE

    @property
    def stoppable(self) -> bool:
        """Whether the method's ASHA rungs may stop it: a search trial only."""
        return self.kind is JobKind.SEARCH

    @property
    def tests_init(self) -> bool:
        return self.kind is JobKind.EVALUATE and self.target == INIT

    def recorded_params(self) -> dict[str, Any]:
        """The parameters its trials row records (`param.<name>`): the seed, if its own,
        then the searched knobs."""
        return {**({} if self.seed is None else {"seed": self.seed}), **self.params}

    def config(self) -> dict[str, Any]:
        """The trial config that carries it (`Job.of` reads it back)."""
        return {JOB: {"kind": self.kind.value, "method": self.method,
                      "params": dict(self.params), "seed": self.seed, "target": self.target,
                      "project": self.project}}

    @classmethod
    def of(cls, config: dict[str, Any]) -> Job:
        """The job of a trial config (`config()`), or of a config written before jobs were
        typed (`_untyped`: Tune's state of a study interrupted under an older fgray)."""
        job = config.get(JOB)
        if job is None:
            return cls._untyped(config)
        return cls(JobKind(job["kind"]), job["method"], dict(job.get("params") or {}),
                   job.get("seed"), job.get("target"), bool(job.get("project")))

    @classmethod
    def _untyped(cls, config: dict[str, Any]) -> Job:
        """An older config: a fixed-point grid under "point", an evaluation with an
        "evaluate" target, a retrain with a "seed", else a searched point -- read once here,
        so a resumed old study goes on; new configs always carry their kind."""
        fixed = "point" in config
        old = dict(config.get("point", config))
        method, seed = old.pop("method"), old.pop("seed", None)
        if "evaluate" in old:
            return cls(JobKind.EVALUATE, method, seed=seed, target=old["evaluate"],
                       project=bool(old.get("project")))
        kind = JobKind.POINT if fixed else JobKind.RETRAIN if seed is not None else JobKind.SEARCH
        return cls(kind, method, old, seed=None if seed is None else int(seed))


@dataclass(frozen=True)
class TrialSetup:
    """What every job of one experiment shares; each trial's own work is its `Job`."""

    study: StudyConfig
    resources: WorkerResources
    # Called by every rank after each epoch (`fgray.train.trainer`'s epoch hooks): given
    # per invocation of the study (`--epoch-hook`), not stored with it.
    epoch_hooks: tuple[EpochHookSpec, ...] = ()

    def spec_for(self, job: Job) -> RunSpec:
        """The run a training job trains (its method's fixed settings and recipe, its knobs,
        its seed, the study's budget)."""
        method = job.method
        sets = {**self.study.fixed.get(method, {}), **self.study.space(method).settings(job.params)}
        train = {"epochs": self.study.epochs, "batch_size": self.study.batch_size,
                 "image_size": self.study.image_size,
                 "seed": int(self.study.seed if job.seed is None else job.seed),
                 "eval_every": 1}  # ASHA and TPE read val kNN top-1 every epoch
        return build_spec(method, self.study.data_spec, backbone=self.study.backbones.get(method),
                          init=self.study.init, train=train, sets=sets)

    def recorder(self, trial_id: str, job: Job, spec: RunSpec,
                 start_time: float | None = None) -> EpochRecorder:
        return EpochRecorder(self.study.study_dir, trial_id, spec, study=self.study.name,
                             params=job.recorded_params(), cpus=self.resources.cpus,
                             gpus=self.resources.gpus, start_time=start_time)


def recipe(method: str) -> Job:
    """A method's recipe defaults with the study's seed: what a study validates and plans."""
    return Job(JobKind.POINT, method)


def init_targets(study: StudyConfig) -> dict[str, RunSpec]:
    """The init rows a study has, by name: one per distinct initial weights (backbone and
    init; the study's init is shared, so per backbone) of its methods: `init` when all
    methods share them, else `init:<backbone with its weights tag>`. Each is evaluated with
    the spec of the first method that uses it (image size, the backbone's normalisation, the
    study's splits and eval settings)."""

    setup = TrialSetup(study, WorkerResources())
    specs: dict[str, RunSpec] = {}
    for method in study.methods:
        spec = setup.spec_for(recipe(method))
        specs.setdefault(weights_name(spec.backbone_name, spec.init), spec)
    if len(specs) == 1:
        return {INIT: next(iter(specs.values()))}
    return {f"{INIT}:{weights}": spec for weights, spec in specs.items()}
