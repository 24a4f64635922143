"""The test evaluation of a study's final models -- each method's best trial, its retrains
and the initial weights -- by one route: `Job`s of kind EVALUATE, run by Tune in trial
processes (`evaluate_job`, which reports the seconds it took, so the study counts them as
work). The search experiment queues them as models become final; after an experiment,
`evaluation_jobs` lists what is left untested (a compare study's runs, or what a resumed
study's experiment left), which the driver runs as one more experiment of the same kind."""

from __future__ import annotations

import time
from typing import Any

import ray.tune

from fgray.engine.spec import DataSpec
from fgray.results.records import record_init, record_test
from fgray.storage import join, local_copy
from fgray.train.checkpoints import best_checkpoint_dir
from fgray.train.resources import WorkerResources
from fgray.tune.study.config import INIT, TRAIN_DIR, StudyConfig
from fgray.tune.study.jobs import Job, JobKind, TrialSetup, init_targets
from fgray.tune.study.ledger import best_per_method, init_recorded, tested


def _evaluate_checkpoint(checkpoint: str, data: dict[str, Any], protocols: list[str],
                         seed: int, embeddings: tuple[str, str] | None = None,
                         outcomes: dict[str, Any] | None = None) -> dict[str, float]:
    """Runs in an evaluation job with a worker's share, next to the data like the trials. With
    `embeddings` = (study_dir, TensorBoard run), the test features also go to that run's
    embedding projector, written here so they never travel back to the driver. `outcomes`
    gets the per-image test outcomes (`evaluate_method`)."""
    from fgray.engine.evaluate import evaluate_method, load_checkpoint
    from fgray.engine.run import resolve_device

    device = resolve_device(None)
    with local_copy(checkpoint) as folder:
        method, spec, _ = load_checkpoint(folder, device)
    if embeddings is None:
        return evaluate_method(method, spec, DataSpec(**data), protocols, split="test",
                               device=device, seed=seed, progress=False, outcomes=outcomes)
    from fgray.results.tensorboard import write_embeddings

    metrics, (features, labels, classes) = evaluate_method(
        method, spec, DataSpec(**data), protocols, split="test", device=device, seed=seed,
        progress=False, return_features=True, outcomes=outcomes)
    write_embeddings(embeddings[0], embeddings[1], features, labels, classes)
    return metrics


def test_final_model(study: StudyConfig, job: Job) -> None:
    """Evaluate one final model (`job.target`: a method's best trial or a retrain of it) on
    test with its best checkpoint and record it (`evals` rows, `test_*` on its trial row).
    `job.project`: its test features also go to its TensorBoard run's embedding projector.
    Does nothing for a trial already tested (a resumed study) or without a checkpoint."""
    from fgray.results.tensorboard import run_name

    trial_id = job.target
    if tested(study.study_dir, {trial_id}):
        return
    checkpoint = best_checkpoint_dir(join(study.study_dir, TRAIN_DIR, trial_id))
    if checkpoint is None:
        return
    seed = int(job.seed or 0)
    embeddings = (study.study_dir, run_name(job.method, trial_id)) if job.project else None
    outcomes: dict[str, Any] = {}
    metrics = _evaluate_checkpoint(checkpoint, study.data, study.protocols, seed, embeddings,
                                   outcomes)
    record_test(study.study_dir, job.method, trial_id, metrics, seed=seed, study=study.name,
                outcomes=outcomes)


def test_init_weights(study: StudyConfig, name: str, resources: WorkerResources) -> None:
    """Evaluate the initial weights of init row `name` (`init_targets`) with the study's
    protocols on the same splits and record them as a completed trials row (val kNN top-1 as
    its best, so it ranks like a trial) with its evals rows. Does nothing when the row is
    already there."""
    from fgray.engine.evaluate import evaluate_init
    from fgray.engine.run import resolve_device

    if init_recorded(study, name):
        return
    began, spec = time.time(), init_targets(study)[name]
    outcomes: dict[str, Any] = {}
    metrics = evaluate_init(spec, spec.data, study.protocols, device=resolve_device(None),
                            seed=study.seed, progress=False, outcomes=outcomes)
    record_init(study.study_dir, name, spec, metrics, study=study.name, start_time=began,
                cpus=resources.cpus, gpus=resources.gpus, outcomes=outcomes)


def evaluate_job(job: Job, setup: TrialSetup) -> None:
    """An evaluation job, in a trial's process (warm imports, a worker's share):
    `test_final_model` of a final model or `test_init_weights` of an init row. Reports the
    time it took (`evaluation_s`), which the study counts as work, not overhead."""
    began = time.time()
    if job.tests_init:
        test_init_weights(setup.study, job.method, setup.resources)
    else:
        test_final_model(setup.study, job)
    ray.tune.report({"evaluation_s": time.time() - began})


def final_model_job(trial: dict[str, Any], project: bool = False) -> Job:
    """The evaluation job of a final model (a trials row)."""
    return Job(JobKind.EVALUATE, trial["method"], seed=int(trial.get("seed") or 0),
               target=trial["trial_id"], project=project)


def init_jobs(study: StudyConfig) -> list[Job]:
    """The evaluation job of each of the study's init rows (`init_targets`)."""
    return [Job(JobKind.EVALUATE, name, target=INIT) for name in init_targets(study)]


def evaluation_jobs(study: StudyConfig, trials: list[dict[str, Any]]) -> list[Job]:
    """The evaluation jobs still owed after an experiment: each of `trials` (rows) not yet
    tested -- the best of each method projected -- and each init row not yet recorded.
    Checked here, before any job starts: after a search experiment nothing is normally
    left, and an experiment that would only find its work done still costs a start-up."""
    projected = best_per_method(trials)
    done = tested(study.study_dir, {t["trial_id"] for t in trials})
    return ([final_model_job(t, t["trial_id"] in projected) for t in trials
             if t["trial_id"] not in done]
            + [j for j in init_jobs(study) if not init_recorded(study, j.method)])
