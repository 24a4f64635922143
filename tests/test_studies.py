"""The study scripts: `--help` and one-line user errors, `ray job submit` of a smoke study to a
real local head (token auth on), and a study whose driver is killed mid-way and resumed, once
with trials in their own process (`--workers 0`) and once as Ray Train runs (`--workers 1`):
ASHA stops trials early, a diverging trial is recorded as failed while the study goes on,
finished trials are not repeated, every epoch is recorded once. With `--workers 0` a trial
whose process dies is restarted from its checkpoint, the best configuration is retrained over
a second seed, and the initial weights get their row."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fgray.results.report import leaderboard
from fgray.results.tables import latest_trials, load
from fgray.train.cluster import free_port
from fgray.train.trainer import ERROR_FILE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("cub_sweep.py", "cars_sweep.py", "aircraft_sweep.py", "compare_methods.py")
PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
EPOCHS = 4


def _script(name: str) -> str:
    return str(REPO / "studies" / name)


def _run_script(name: str, args: list[str], monkeypatch) -> int:
    """Run a study script as `python studies/NAME ARGS` would, in this process."""
    monkeypatch.setattr(sys, "argv", [_script(name), *args])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(_script(name), run_name="__main__")
    return exit_info.value.code


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_answer_help(name, monkeypatch, capsys):
    assert _run_script(name, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    for flag in ("--data-root", "--synthetic", "--preset", "--methods", "--epochs",
                 "--backbone", "--image-size", "--storage", "--resume"):
        assert flag in out
    assert ("--trials" in out) == (name != "compare_methods.py")


def test_help_as_a_subprocess():
    out = subprocess.run([PYTHON, _script("cub_sweep.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--synthetic" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--preset", "smoke"], "expected --data-root ROOT or --synthetic"),
    (["--synthetic", "--preset", "huge"], "argument --preset: invalid choice"),
    (["--synthetic", "--methods", "moco,byol"], "--methods 'moco,byol'"),
    (["--resume", "--storage", "/nonexistent/x"], "--resume: no study at /nonexistent/x"),
    (["--synthetic", "--more-seeds", "2"], "--more-seeds 2: expected a number >= 1 given "
                                           "with --resume"),
    (["--resume", "--more-seeds", "-1"], "--more-seeds -1: expected a number >= 1"),
])
def test_user_errors_are_one_line(args, message, monkeypatch, capsys):
    assert _run_script("cub_sweep.py", args, monkeypatch) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("cub_sweep.py")


# ---------------------------------------------------------------- a real local head


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _session_pids(temp_dir: str, token: str) -> set[int]:
    """The processes of our head: those whose command line names its temp dir or whose
    environment holds its auth token (GCS, raylet, dashboard, agents, the client server that
    `ray start` leaves behind), and everything they started (Ray's workers)."""
    marks = (temp_dir.encode(), f"RAY_AUTH_TOKEN={token}".encode())
    roots = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if any(mark in text for mark in marks):
            roots.add(int(proc.name))
    kids, found, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(kids.get(pid, []))
    return found - {os.getpid()}


def _stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.3)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` on free ports with token auth; stopped by PID, never `ray stop`."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    # Every port free, not Ray's defaults: other Rays may run on this machine (the dashboard
    # agent's fixed default, 52365, would clash and leave the head unable to take jobs).
    port, dash, client, agent = free_port(), free_port(), free_port(), free_port()
    token = uuid.uuid4().hex
    env = {**os.environ,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # Processes of this head find it (not another Ray on this machine) through this.
           "RAY_ADDRESS": f"127.0.0.1:{port}",
           "FGRAY_CACHE": str(tmp_path_factory.mktemp("fgray-cache")),
           "PATH": f"{Path(PYTHON).parent}:{os.environ.get('PATH', '')}"}
    start = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=300)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir}
    finally:
        _stop(_session_pids(temp_dir, token))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_job_submit_smoke_study(head, tmp_path):
    storage = tmp_path / "studies"
    out = subprocess.run(
        [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO),
         "--", PYTHON, "studies/cub_sweep.py", "--synthetic", "--preset", "smoke",
         "--methods", "moco", "--trials", "1", "--epochs", "1", "--seeds", "1",
         "--image-size", "64", "--storage", str(storage), "--name", "job",
         "--protocols", "retrieval,knn"],
        env=head["env"], capture_output=True, text=True, timeout=900)
    (tmp_path / "job.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-8000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    assert "overhead ratio" in out.stdout
    study = str(storage / "job")
    trials = latest_trials(load(study, "trials").to_pylist())
    by_method = {t["method"]: t for t in trials}
    assert sorted(by_method) == ["init", "moco"]
    assert by_method["moco"]["status"] == "completed"
    assert by_method["moco"]["test_rank1"] is not None  # the final test evaluation ran
    # The smoke preset's weights, recorded: lite0 from ImageNet, for the run and the init row.
    for row in trials:
        assert (row["backbone"], row["init"]) == ("tf_efficientnet_lite0.in1k", "imagenet")
    assert by_method["init"]["test_rank1"] is not None
    assert json.loads((storage / "job" / "study.json").read_text())["methods"] == ["moco"]


def _study_args(synth_root: Path, storage: Path, points: Path, workers: int) -> list[str]:
    extra = (["--seeds", "2", "--protocols", "retrieval,localisation"] if workers == 0
             else ["--seeds", "1", "--protocols", "retrieval"])
    return [PYTHON, _script("cub_sweep.py"), "--data-root", str(synth_root), "--preset",
            "smoke", "--methods", "moco", "--trials", "5", "--epochs", str(EPOCHS),
            "--backbone", "test_resnet", "--init", "random", "--image-size", "32",
            "--set", "queue_size=64", "--set", "mlp_hidden=32", "--workers", str(workers),
            "--grace-period", "1", "--reduction-factor", "2", "--concurrency", "1",
            "--batch-size", "16", "--val-fraction", "0.5", "--points", str(points),
            *extra, "--storage", str(storage), "--name", "asha"]


def _finished(study: str) -> list[dict]:
    try:
        rows = latest_trials(load(study, "trials").to_pylist())
    except Exception:  # noqa: BLE001 - nothing written yet
        return []
    # Trials only: the init row, evaluated first, is complete before any trial is.
    return [r for r in rows if r.get("status") in ("completed", "stopped", "failed")
            and r["method"] != "init"]


def _resumed_study(head, synth_root, tmp_path_factory, exit_once, workers: int) -> dict:
    """A 5-trial ASHA study (one point diverges), its driver killed once the first trial has
    finished, then resumed with --resume. With `--workers 0`, the first trial's process also
    dies once, after training its second epoch and before reporting it."""
    tmp = tmp_path_factory.mktemp(f"asha{workers}")
    storage = tmp / "studies"
    points = tmp / "points.json"
    # Strongly different learning rates after the recipe's (0.03); 1e30 diverges.
    points.write_text(json.dumps([{"lr": 1e30}, {"lr": 3.0}, {"lr": 1e-4}, {"lr": 0.3}]))
    args = _study_args(synth_root, storage, points, workers)
    study = str(storage / "asha")
    first, marker = list(args), None
    if workers == 0:  # the first trial that trains epoch 2 dies before reporting it, once
        fault, marker = exit_once(at_epoch=2, on_rank=0)
        first += ["--epoch-hook", json.dumps(fault)]
    log = open(tmp / "first.log", "w")
    # From the repository root: Ray gives the trials the driver's working directory on their
    # sys.path, where they import the fault hook (`tests.faults`).
    driver = subprocess.Popen(first, env=head["env"], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own group: we kill only it
    deadline = time.time() + 900
    while time.time() < deadline and driver.poll() is None and not _finished(study):
        time.sleep(2)
    assert driver.poll() is None, (tmp / "first.log").read_text()[-4000:]
    before = {r["trial_id"]: r for r in _finished(study)}
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(60)
    log.close()
    epochs_before = load(study, "epochs").to_pylist()
    second = subprocess.run([*args, "--resume"], env=head["env"], capture_output=True,
                            text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return {"study": study, "before": before, "epochs_before": epochs_before,
            "stdout": second.stdout, "workers": workers, "marker": marker}


@pytest.fixture(scope="module")
def in_trial_study(head, synth_root, tmp_path_factory, exit_once):
    return _resumed_study(head, synth_root, tmp_path_factory, exit_once, workers=0)


@pytest.fixture(scope="module")
def train_study(head, synth_root, tmp_path_factory, exit_once):
    return _resumed_study(head, synth_root, tmp_path_factory, exit_once, workers=1)


BOTH = pytest.mark.parametrize("which", ["in_trial_study", "train_study"])


def _search_trials(study: str) -> list[dict]:
    """The searched trials (not the final seeds' retrains, not the init row), without those
    lost by the kill: started after Tune's last snapshot, they are closed as failed and their
    configuration runs again."""
    from fgray.tune.study import LOST

    rows = latest_trials(load(study, "trials").to_pylist())
    assert not [t for t in rows if t["status"] == "running"]  # every trial closed
    return [t for t in rows if t["method"] == "moco" and t.get("param.seed") is None
            and t.get("error") != LOST]


@pytest.mark.slow
@BOTH
def test_resume_does_not_repeat_finished_trials(which, request):
    resumed_study = request.getfixturevalue(which)
    study = resumed_study["study"]
    rows = load(study, "trial_events").to_pylist()  # every state each trial went through
    trials = _search_trials(study)
    assert len(trials) == 5  # no extra trials after the restore
    assert all(t["status"] in ("completed", "stopped", "failed") for t in trials)
    for trial_id, first in resumed_study["before"].items():
        # One terminal row (plus, for the best trial, its copy with the test metrics).
        terminal = [r for r in rows if r["trial_id"] == trial_id and r["status"] != "running"
                    and r["test_rank1"] is None]
        assert len(terminal) == 1 and terminal[0]["status"] == first["status"]
        # Its epochs were recorded once, before the kill, and never again.
        epochs = [e["epoch"] for e in load(study, "epochs").to_pylist()
                  if e["trial_id"] == trial_id]
        assert sorted(epochs) == sorted(e["epoch"] for e in resumed_study["epochs_before"]
                                        if e["trial_id"] == trial_id)
        assert len(epochs) == len(set(epochs))
    from fgray.tune.study import LOST

    for t in latest_trials(rows):
        if t.get("error") == LOST:  # closed by the resumed study, its epochs not counted
            continue
        epochs = [e["epoch"] for e in load(study, "epochs").to_pylist()
                  if e["trial_id"] == t["trial_id"]]
        # Every epoch recorded once, one row per epoch from 1 to the last one run.
        assert sorted(epochs) == list(range(1, (t["epochs_run"] or 0) + 1)), t["trial_id"]


@pytest.mark.slow
@BOTH
def test_asha_stops_trials_early(which, request):
    resumed_study = request.getfixturevalue(which)
    trials = _search_trials(resumed_study["study"])
    stopped = [t for t in trials if t["status"] == "stopped"]
    completed = [t for t in trials if t["status"] == "completed"]
    assert stopped, [(t["trial_id"], t["status"], t["epochs_run"]) for t in trials]
    assert all(t["epochs_run"] < EPOCHS for t in stopped)
    assert completed and all(t["epochs_run"] == EPOCHS for t in completed)
    assert "stopped early by ASHA" in resumed_study["stdout"]


@pytest.mark.slow
@BOTH
def test_diverging_trial_is_failed_and_the_study_goes_on(which, request):
    resumed_study = request.getfixturevalue(which)
    trials = _search_trials(resumed_study["study"])
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["error"].startswith("FloatingPointError: non-finite loss")
    assert json.loads(failed[0]["params_json"])["lr"] == 1e30
    assert len([t for t in trials if t["status"] != "failed"]) == 4
    board = {r["method"]: r for r in leaderboard(resumed_study["study"])}
    tested = [t for t in trials if t["trial_id"] == board["moco"]["best_trial"]]
    assert tested[0]["test_rank1"] is not None  # the best config was evaluated on test


@pytest.mark.slow
def test_train_trials_share_a_process_and_asha_stops_abort_nothing(train_study):
    """`--workers 1`: Tune hands a trial's process to the next trial (`reuse_actors`), which
    it can only do once a stopped trial's Train run has ended (`fgray.train.run_stop`);
    otherwise the next trial is aborted ("Trainable runner reuse requires reset_config()")."""
    study = train_study["study"]
    tune = Path(study) / "tune" / "search"
    trials = _search_trials(study)
    pids = {}
    for t in trials:
        rows = [json.loads(line) for line in (tune / t["trial_id"] / "result.json").open()]
        pids[t["trial_id"]] = {row["pid"] for row in rows}
    # Five trials over two driver runs (killed once), one at a time: fewer processes than
    # trials, and among them a process that ran a stopped trial and then another trial.
    assert len(set().union(*pids.values())) < len(trials), pids
    stopped = [t["trial_id"] for t in trials if t["status"] == "stopped"]
    assert any(pids[s] & pids[o] for s in stopped for o in pids if o != s), pids
    assert "reset_config" not in train_study["stdout"]
    assert not [t for t in trials if t["status"] == "failed" and "reset" in (t["error"] or "")]


@pytest.mark.slow
def test_in_trial_study_restarts_a_dead_trial_from_its_checkpoint(in_trial_study):
    study = in_trial_study["study"]
    assert in_trial_study["marker"].is_file()  # a trial's process did exit hard once
    trials = {t["trial_id"]: t for t in _search_trials(study)}
    tune = Path(study) / "tune" / "search"  # the study's one search experiment
    # Tune's record of the crash: the trial's folder holds its error, and the trial went on.
    crashed = [tid for tid in trials if (tune / tid / "error.txt").is_file()
               and trials[tid]["status"] != "failed"]
    assert len(crashed) == 1, crashed
    assert trials[crashed[0]]["epochs_run"] >= 2
    # Its checkpoints, kept as a Train run's: the best by val kNN top-1 and the latest.
    kept = sorted(p.name for p in (Path(study) / "train" / crashed[0]).glob("epoch-*"))
    last = f"epoch-{trials[crashed[0]]['epochs_run']:04d}"
    assert last in kept and 1 <= len(kept) <= 3, kept
    assert all((Path(study) / "train" / crashed[0] / k / "metrics.json").is_file() for k in kept)
    # The diverging trial trained once and recorded its error in its run folder; Tune's
    # FailureConfig retried it and the retry raised the recorded error at once, without
    # training. When the driver was killed between those failures and Tune's next snapshot of
    # the experiment (taken at most every 10 s), the resumed experiment runs the retry again:
    # one more failure, again without training. When it was killed after the trial raised
    # and before Tune wrote the failure down, Tune's file has only the resumed re-raises.
    (failed,) = [t for t in trials.values() if t["status"] == "failed"]
    recorded = json.loads((Path(study) / "train" / failed["trial_id"] / ERROR_FILE).read_text())
    assert recorded["type"] == "FloatingPointError", recorded
    assert recorded["message"].startswith("non-finite loss at epoch 1"), recorded
    text = (tune / failed["trial_id"] / "error.txt").read_text()
    attempts = re.split(r"^Failure # \d+ ", text, flags=re.M)[1:]
    trained = [a for a in attempts if "in worker_loop" in a]
    reraised = [a for a in attempts if 'failure.get("message"' in a
                or 'known.get("error")' in a]
    assert len(trained) <= 1, text
    assert all("FloatingPointError: non-finite loss" in a for a in attempts), text
    assert len(reraised) == len(attempts) - len(trained) and len(attempts) in (2, 3), text


@pytest.mark.slow
def test_in_trial_study_seeds_and_init_row(in_trial_study):
    study = in_trial_study["study"]
    board = leaderboard(study)
    assert [r["method"] for r in board] == ["init", "moco"]  # the init row first
    init, moco = board
    assert init["best_trial"] == "init" and init["val_knn_top1"] is not None
    assert init["test_rank1"] is not None and init["backbone"] == "test_resnet"
    # The best configuration over two seeds (the search's trial and one retrain).
    assert moco["test_rank1_n"] == 2 and moco["test_rank1_std"] is not None
    assert moco["test_loc_box_mass"] is not None  # localisation of the activation-norm map
    assert moco["vs_init"]["test_rank1"] is not None
    evals = load(study, "evals").to_pylist()
    assert {e["protocol"] for e in evals if e["method"] == "init"} == {
        "retrieval", "localisation", "knn"}  # knn: its val top-1
    assert "in its own process" in in_trial_study["stdout"]
