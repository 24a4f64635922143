"""A study's settings (`StudyConfig`, stored as STUDY_DIR/study.json) and the names of the
study folder's parts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from fgray.engine.selection import BEST_METRIC
from fgray.engine.spec import DataSpec
from fgray.errors import UserError
from fgray.storage import Location
from fgray.tune.spaces import Space, space_for

STUDY_FILE = "study.json"
TUNE_DIR, TRAIN_DIR = "tune", "train"
SEARCH_METRIC = BEST_METRIC  # what TPE learns from: a trial's best val kNN top-1 so far
PROTOCOLS = ("retrieval", "knn", "linear", "localisation")
INIT = "init"  # the method name (and trial id) of the initial weights' row


@dataclass
class StudyConfig:
    """Everything a study needs; stored as STUDY_DIR/study.json so `--resume` continues
    exactly the study that was started."""

    name: str
    storage: str
    data: dict[str, Any]  # DataSpec fields
    methods: list[str]
    mode: Literal["search", "compare"] = "search"
    trials: int = 4  # per method (search)
    epochs: int = 4
    batch_size: int = 32
    image_size: int = 32
    backbones: dict[str, str | None] = field(default_factory=dict)  # per method; None: default
    init: str = "random"
    # Per-method settings: `section.name` keys (method., optim., train., aug.), typed values.
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=lambda: ["lr"])  # shared knobs searched
    grace_period: int = 1
    reduction_factor: int = 2
    workers: int = 1  # Ray Train workers per trial; 0: the loop in the trial's own process
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    concurrency: int | None = None  # None: what the cluster fits
    seed: int = 0
    seeds: int = 1  # compare: seeds per method; search: seeds of the final test evaluation
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    max_failures: int = 1  # Ray Train worker-group restarts per trial
    keep_best: int = 2  # checkpoints kept per trial besides the latest
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra first points

    def __post_init__(self) -> None:
        # Resolved once (made absolute) and passed as it is everywhere (`study_dir`).
        self.storage = Location(self.storage)
        if not self.methods:
            raise UserError("no methods to study: expected --methods with at least one")
        if self.mode not in ("search", "compare"):
            raise UserError(f"study mode {self.mode!r}: expected search or compare")
        for name, value, low in (("--trials", self.trials, 1), ("--epochs", self.epochs, 1),
                                 ("--grace-period", self.grace_period, 1),
                                 ("--reduction-factor", self.reduction_factor, 2),
                                 ("--seeds", self.seeds, 1), ("--workers", self.workers, 0)):
            if value < low:
                raise UserError(f"{name} {value}: expected {low} or more")
        if self.grace_period > self.epochs:
            raise UserError(f"--grace-period {self.grace_period} exceeds --epochs "
                            f"{self.epochs}: expected at most the epoch budget")
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError(f"--concurrency {self.concurrency}: expected 1 or more")
        unknown = sorted(set(self.protocols) - set(PROTOCOLS) - {"linear-paper"})
        if unknown:
            raise UserError(f"protocol {unknown[0]!r}: expected some of "
                            f"{', '.join(PROTOCOLS)}, linear-paper")

    @property
    def study_dir(self) -> Location:
        return self.storage.child(self.name)

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(**self.data)

    def space(self, method: str, *, validate: bool = False) -> Space:
        # The backbone fixes family-dependent recipe values (MoCo v3's T: 0.2 ViT, 1.0 CNN).
        backbone = self.backbones.get(method)
        if validate:
            return space_for(method, shared=self.shared, fixed=self.fixed.get(method, {}),
                             backbone=backbone)
        return Space(method, tuple(self.shared), tuple(sorted(self.fixed.get(method, {}).items())),
                     backbone)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudyConfig:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

