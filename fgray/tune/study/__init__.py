"""The study driver: Ray Tune trials, each training one configuration -- in the trial's own
process (`--workers 0`) or as a Ray Train run (`--workers N`).

A study lives in one folder, STUDY_DIR = STORAGE/NAME (a local path, or s3:// / gs://):

    study.json            the study's settings (what `--resume` continues)
    tune/<experiment>/    Ray Tune's experiment state (Tuner.restore reads it)
    train/<trial_id>/     each trial's run: checkpoints (epoch-XXXX/), ranks/, and for a Ray
                          Train run Ray's state
    optuna/journal.log    the Optuna studies (JournalStorage; optuna-dashboard opens it)
    tables/{trials,epochs,evals}/  Parquet results;  tensorboard/  scalars and HParams

Search (`mode="search"`): one Tune experiment (`tune/search/`) for the whole study, fed by
`StudySearcher`: one Optuna study per method (its own conditional knobs from
fgray.tune.spaces, its own seeded TPE model, the paper's recipe as its first trial) and one
set of ASHA rungs per method (`MethodScheduler`, on per-epoch val kNN top-1; TPE learns from
each trial's best val kNN top-1 so far), so methods whose losses and learning curves differ
never compete inside one model or bracket, and the leaderboard's "best config per method" is
the best of that method's search. Search trials are asked method by method; when a method's
search ends, its best configuration is retrained over the extra seeds while the next
methods' trials fill the other slots, and each final model (the best trial, each retrain, the
initial weights) is evaluated on test by a job of the same experiment (`evaluate_job`).
Work goes out longest first -- search trials, retrains, then the short evaluations, which
fill the slots the last retrains leave free. One experiment means one Tune start-up and one
import of torch per trial process (`reuse_actors`), and no slot idles between methods.

Compare (`mode="compare"`): every method x seed at a fixed budget with the recipe defaults,
one experiment, no search and no early stopping.

Two ways to run a trial, one loop (`fgray.train.trainer.worker_loop`) and one way of reporting
and checkpointing (a per-epoch report with its checkpoint, best k by val kNN plus the latest
kept, the epoch recorded before it is reported):

- `--workers 0` (the smoke and laptop presets): the trial runs the engine loop itself and
  reserves one worker's CPUs / GPU share; no worker group, no TorchTrainer, so a trial costs
  what its epochs cost plus about a second. Tune reuses trial actors (`reuse_actors`: a
  trial builds all its state -- seeded weights, optimiser, data stream -- from its spec, so
  nothing leaks from one trial to the next but the warm imports and the decoded caches).
  Tune's FailureConfig restarts a crashed trial, which resumes from its latest checkpoint.
- `--workers N` (the paper preset): the trial is only a driver for its Ray Train run (DDP over
  N workers): it asks for no CPU (a little memory so Ray can place it), and Ray Train's
  FailureConfig restarts a dead worker group from its latest checkpoint. Tune reuses these
  trial processes too: a trial Tune stops ends its Train run (`fgray.train.run_stop`).

`max_concurrent_trials` is what the cluster's CPUs / GPUs fit of one trial's share (fractional
GPUs allowed, e.g. 0.5 for two small-backbone trials per GPU). A trial that fails -- a
non-finite loss or a user error (never retried: it would fail again), a crash past the
retries -- is recorded as failed with its error and the study goes on. The best trial of each
method (by val kNN top-1, as the leaderboard ranks it) and its retrains are evaluated once on
test with their best checkpoints, and the results are recorded in the tables (`evals`, and
`test_*` on the trial's row). The initial weights are evaluated once too, with the same
protocols on the same splits, as the `init` row (one per distinct backbone and init when
methods differ: `init:<backbone>`). A compare study evaluates its runs after its experiment
by the same evaluation jobs, in one more experiment (`tune/evaluate-<hash>/`); so does a
resumed study whatever its experiment left unevaluated. Either way their time is counted as
the study's work (`StudySummary.evaluation_time_s`).

The package, one job per module, each importing only those above it:

    config       StudyConfig and the study folder's names
    jobs         Job / JobKind (what a trial does, under the config key "job"), TrialSetup
    ledger       what is done: trial rows, tested models, best trials, lost trials
    evaluation   the test evaluation jobs
    trial        the trial function (`train_trial`)
    recorder     the Tune callback writing trials rows
    console      StudyProgress, Console
    searcher     StudySearcher and the per-method Optuna searches
    scheduler    MethodScheduler (ASHA per method)
    experiment   Tuner / RunConfig wiring: `search`, `run_jobs`
    driver       load_study, prepare, check_data, run_study, StudySummary
"""

from fgray.tune.study.config import (
    INIT,
    PROTOCOLS,
    SEARCH_METRIC,
    STUDY_FILE,
    TRAIN_DIR,
    TUNE_DIR,
    StudyConfig,
)
from fgray.tune.study.console import Console, StudyProgress
from fgray.tune.study.driver import (
    MORE_SEEDS,
    StudySummary,
    check_data,
    concurrency_for,
    load_study,
    prepare,
    run_study,
)
from fgray.tune.study.evaluation import evaluation_jobs, test_final_model, test_init_weights
from fgray.tune.study.experiment import SEARCH, run_jobs, search
from fgray.tune.study.jobs import JOB, Job, JobKind, TrialSetup, init_targets, recipe
from fgray.tune.study.ledger import (
    LOST,
    best_per_method,
    best_trials,
    close_lost_trials,
    more_seed_points,
)
from fgray.tune.study.recorder import StudyRecorder, error_line
from fgray.tune.study.scheduler import MethodScheduler, make_scheduler
from fgray.tune.study.searcher import ResumableOptunaSearch, StudySearcher, make_searcher
from fgray.tune.study.trial import train_trial

__all__ = [
    "INIT", "JOB", "LOST", "MORE_SEEDS", "PROTOCOLS", "SEARCH", "SEARCH_METRIC", "STUDY_FILE",
    "TRAIN_DIR", "TUNE_DIR", "Console", "Job", "JobKind", "MethodScheduler",
    "ResumableOptunaSearch", "StudyConfig", "StudyProgress", "StudyRecorder", "StudySearcher",
    "StudySummary", "TrialSetup", "best_per_method", "best_trials", "check_data",
    "close_lost_trials", "concurrency_for", "error_line", "evaluation_jobs", "init_targets",
    "load_study", "make_scheduler", "make_searcher", "more_seed_points", "prepare", "recipe",
    "run_jobs", "run_study", "search", "test_final_model", "test_init_weights", "train_trial",
]
