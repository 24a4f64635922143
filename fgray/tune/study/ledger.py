"""What a study has done, read from its tables in one place: which trials ended and how,
which final models and init rows were tested, each method's best trial and the trials that
re-ran it, the retrains still owed, and, after a killed driver, the history events it did
not write and the trials it lost. Every resume decision (a job not repeated, a trial not
trained again) asks this module."""

from __future__ import annotations

import time
from typing import Any

from fgray.engine.selection import BEST_METRIC, best_of
from fgray.results.records import has_tables, latest_trial_row
from fgray.tune.study.config import StudyConfig
from fgray.tune.study.jobs import Job, JobKind

FINISHED = ("completed", "stopped")

LOST = ("interrupted: the study's driver stopped after this trial started and before Tune "
        "saved the experiment; Tune does not know it, and its configuration ran again")


def trial_row(study_dir: str, method: str, trial_id: str) -> dict[str, Any] | None:
    """A trial's latest row, or None before it started."""
    return latest_trial_row(study_dir, method, trial_id)


def tested(study_dir: str, trial_ids: set[str]) -> set[str]:
    """Those of `trial_ids` already evaluated on test."""
    from fgray.results.tables import load

    table = load(study_dir, "evals").to_pylist()
    return {r["trial_id"] for r in table if r.get("split") == "test"} & trial_ids


def init_recorded(study: StudyConfig, name: str) -> bool:
    """Whether init row `name` was evaluated and recorded."""
    known = latest_trial_row(study.study_dir, name, name)
    return known is not None and known.get("status") == "completed"


def latest_rows(study_dir: str) -> list[dict[str, Any]]:
    """Every trial's latest row."""
    from fgray.results.tables import latest_trials, load

    return latest_trials(load(study_dir, "trials").to_pylist())


def best_trials(study_dir: str, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """Per method (of `methods`, default all but the init rows), the leaderboard's best
    trial (by val kNN top-1) as its latest row."""
    from fgray.results.report import leaderboard

    out = []
    for row in leaderboard(study_dir):
        if methods is None and row.get("is_init"):
            continue
        if row.get("best_trial") and (methods is None or row["method"] in methods):
            trial = latest_trial_row(study_dir, row["method"], row["best_trial"])
            if trial is not None:
                out.append(trial)
    return out


def best_per_method(trials: list[dict[str, Any]]) -> set[str]:
    """The trial ids with the highest best val kNN top-1 of each method (the first on ties,
    and the first trial of a method none of whose trials has a score)."""
    out = set()
    for method in dict.fromkeys(t["method"] for t in trials):
        own = [t for t in trials if t["method"] == method]
        best, _ = best_of(own, BEST_METRIC)
        out.add((best or own[0])["trial_id"])  # no score at all: the first trial
    return out


def searched(trial: dict[str, Any]) -> dict[str, Any]:
    """The searched parameters of a trial row (its `param.<name>` columns), seed excluded."""
    from fgray.results.schema import PARAM_PREFIX

    return {k[len(PARAM_PREFIX):]: v for k, v in trial.items()
            if k.startswith(PARAM_PREFIX) and v is not None and k != f"{PARAM_PREFIX}seed"}


def same_config(study_dir: str, best: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials that re-ran a best trial's configuration with another seed."""
    hashes = {(t["method"], t["config_hash"]) for t in best}
    ids = {t["trial_id"] for t in best}
    return [r for r in latest_rows(study_dir) if (r["method"], r.get("config_hash")) in hashes
            and r["trial_id"] not in ids and r.get("status") == "completed"]


def more_seed_points(study: StudyConfig, best: list[dict[str, Any]],
                     rows: list[dict[str, Any]], more: int) -> list[Job]:
    """The retrains that give each method's best configuration (`best`, trials rows) `more`
    seeds beyond the study's `seeds`: seeds `seed + seeds ... seed + seeds + more - 1`, as
    retrains with its searched parameters like the searcher's own, leaving out a seed that
    already completed with that configuration (`rows`, so asking again after an
    interruption does not repeat one)."""
    done = {(r["method"], r.get("config_hash"), r.get("seed")) for r in rows
            if r.get("status") == "completed"}
    points = []
    for b in best:
        for k in range(study.seeds, study.seeds + more):
            seed = study.seed + k
            if (b["method"], b.get("config_hash"), seed) not in done:
                points.append(Job(JobKind.RETRAIN, b["method"], searched(b), seed=seed))
    return points


def restore_history(study: StudyConfig) -> list[dict[str, Any]]:
    """On resume: the trial states whose `trial_events` row a killed driver never wrote
    (`fgray.results.trials.restore_events`), appended now."""
    from fgray.results.trials import restore_events

    return restore_events(study.study_dir)


def ended_unknown(study: StudyConfig, known: set[str]) -> list[dict[str, Any]]:
    """On resume: the rows of trials that ended -- completed, stopped, or failed of their own
    error -- whose ids `known` (the trials a restored searcher handed out) lacks: they ended
    after the last snapshot Tune took before its driver was killed. Their work is done; the
    searcher adopts them (`StudySearcher.restore`) instead of asking for it again."""
    if not has_tables(study.study_dir):
        return []  # killed before any trial wrote a row
    return [r for r in latest_rows(study.study_dir)
            if r["method"] in study.methods and r["trial_id"] not in known
            and (r.get("status") in FINISHED
                 or (r.get("status") == "failed" and r.get("error") != LOST))]


def close_lost_trials(study: StudyConfig) -> list[dict[str, Any]]:
    """Close the trials still `running` once every experiment has finished: trials started
    after the last snapshot Tune took before its driver was killed. The restored experiment
    does not know them (the searcher asks for their configuration again), so nothing will
    ever finish them; they are recorded as failed with `LOST` as their error."""
    from fgray.results.trials import write_trials

    lost = [dict(r, status="failed", error=LOST, end_time=time.time())
            for r in latest_rows(study.study_dir)
            if r.get("status") == "running" and r["method"] in study.methods]
    write_trials(study.study_dir, lost)
    return lost
