"""`fgray results STUDY --html`: the one-page report (checked in a headless browser), and the
viewers it points to (optuna-dashboard opening the study's journal with its own loader)."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
import torch
from PIL import Image

from fgray.engine.spec import DataSpec, build_spec
from fgray.results.records import EpochRecorder, record_init, record_test
from fgray.results.report import html_report, leaderboard, results_command, viewer_commands
from fgray.results.tensorboard import latest_images

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _spec(method: str, seed: int, lr: float):
    sets = {"lr": lr, "queue_size": 64, "mlp_hidden": 32} if method == "moco" else {"lr": lr}
    return build_spec(method, DataSpec(format="cub", root="/data/cub"), backbone="test_resnet",
                      train={"epochs": 3, "batch_size": 16, "image_size": 32, "seed": seed},
                      sets=sets)


def _write_journal(study: str) -> None:
    """One Optuna study per method, as the study driver writes them."""
    import optuna

    from fgray.tune.journal import Journal

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = Journal(study).storage()
    for method in ("moco", "lcr"):
        record = optuna.create_study(study_name=method, storage=storage, direction="maximize",
                                     sampler=optuna.samplers.RandomSampler(seed=0))
        record.set_user_attr("method", method)
        record.optimize(lambda t: 50 - abs(t.suggest_float("lr", 1e-3, 1, log=True) - 0.1)
                        * 100, n_trials=4)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> str:
    """A small finished study: two methods x (a search trial that stopped, a best
    configuration over two seeds) with scalars and maps in TensorBoard, test metrics, the
    init row and the Optuna journal."""
    path = str(tmp_path_factory.mktemp("html") / "cub-smoke")
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    images = torch.stack([torch.stack([xx * 8, yy * 8, (xx + yy) * 4]) for _ in range(8)])
    images = images.clamp(0, 255).to(torch.uint8)
    trials = [("moco", "m1", 0, 0.3, "stopped"), ("moco", "m2", 0, 0.1, "completed"),
              ("moco", "m3", 1, 0.1, "completed"), ("lcr", "l1", 0, 0.05, "completed"),
              ("lcr", "l2", 1, 0.05, "completed")]
    for i, (method, trial_id, seed, lr, status) in enumerate(trials):
        recorder = EpochRecorder(path, trial_id, _spec(method, seed, lr), study="cub-smoke",
                                 params={"lr": lr})
        recorder.finish([], "running")
        history = []
        for epoch in range(1, (1 if status == "stopped" else 3) + 1):
            metrics = {"epoch": epoch, "loss": 3.0 - epoch / 2 - i / 10, "lr": lr,
                       "val_knn_top1": 20.0 + 5 * epoch + i}
            recorder(metrics)
            centre = torch.zeros(8, 4, 4)
            centre[:, 1 + epoch % 2, 2] = 1.0
            recorder.visuals(epoch, images, {"attention": centre + 0.1 * torch.rand(
                8, 4, 4, generator=gen)}, {"views": (images, images.flip(-1))})
            history.append(metrics)
        recorder.finish(history, status)
        if status == "completed":
            base = 60.0 if method == "lcr" else 55.0
            record_test(path, method, trial_id, {"rank1": base + 2 * seed, "rank5": 80.0,
                                                 "map": 30.0 + seed, "knn_top1": base + seed,
                                                 "loc_box_mass": 0.4}, seed=seed)
    record_init(path, "init", _spec("moco", 0, 0.1), {"rank1": 30.0, "knn_top1": 28.0,
                                                      "val_knn_top1": 25.0})
    _write_journal(path)
    return path


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.text: list[str] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "a") and attrs.get("href"):
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained(study):
    notes: list[str] = []
    path = html_report(study, notes=notes)
    assert path == f"{study}/report/index.html"
    page = _Page()
    page.feed(Path(path).read_text())
    text = " ".join(page.text)

    # Every image is inline, a PNG that decodes; no other resource is fetched.
    assert page.images and all(i["src"].startswith("data:image/png;base64,")
                               for i in page.images)
    for image in page.images:
        data = base64.b64decode(image["src"].split(",", 1)[1])
        assert data.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(data)).verify()
    assert page.links == ["data:,"] and page.scripts == 0
    alts = [i["alt"] for i in page.images]
    assert {"best_so_far.png", "cost_vs_accuracy.png", "val_vs_epoch_moco.png",
            "val_vs_epoch_lcr.png", "param_importance_moco.png"} <= set(alts)

    # The leaderboard with mean ± std over the best configuration's seeds.
    board = {r["method"]: r for r in leaderboard(study)}
    moco = board["moco"]
    assert moco["best_trial"] in ("m2", "m3") and moco["test_rank1_n"] == 2
    assert f"{moco['test_rank1']:.2f} ± {moco['test_rank1_std']:.2f}" in text
    assert "56.00 ± 1.41" in text and "61.00 ± 1.41" in text  # rank-1 of moco and lcr
    rows = re.findall(r'<tr(?: class="init")?><td>([^<]+)</td>', Path(path).read_text())
    assert rows == ["init", "lcr", "moco"]

    # Each method's best trial: its last maps and pairs from its TensorBoard run.
    for method in ("moco", "lcr"):
        best = board[method]["best_trial"]
        assert f"{method} — trial {best}" in text
        logged = latest_images(study, f"{method}/{best}")
        assert [(t, s) for t, s, _ in logged] == [("maps/attention", 3), ("pairs/views", 3)]
        for _, _, data in logged:
            assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in \
                Path(path).read_text()
    assert "maps/attention, epoch 3" in text

    # The commands that open the study's viewers.
    commands = viewer_commands(study)
    assert commands["tensorboard"] == f"tensorboard --logdir {shlex.quote(study)}/tensorboard"
    assert commands["optuna_dashboard"] == (
        f"optuna-dashboard {shlex.quote(study)}/optuna/journal.log")
    assert commands["tensorboard"] in text and commands["optuna_dashboard"] in text
    assert notes == []


def test_results_command_html(study):
    out = results_command(study, "table", html=True)
    assert out.rstrip().splitlines()[-1] == f"report: {study}/report/index.html"
    data = json.loads(results_command(study, "json", html=True, plots=True))
    assert data["report"] == f"{study}/report/index.html"
    assert any(p.endswith("best_so_far.png") for p in data["plots"])


def test_html_report_of_a_study_without_maps_or_journal(tmp_path):
    study = str(tmp_path / "bare")
    recorder = EpochRecorder(study, "t1", _spec("moco", 0, 0.1))
    recorder({"epoch": 1, "loss": 1.0, "val_knn_top1": 10.0})
    recorder.finish([{"epoch": 1, "val_knn_top1": 10.0}], "completed")
    notes: list[str] = []
    raw = Path(html_report(study, notes=notes)).read_text()
    page = _Page()
    page.feed(raw)
    text = " ".join(page.text)
    assert "(no maps logged by the best trials)" in text
    assert any("best trial t1 logged no maps/* or pairs/* images" in n for n in notes)
    assert any("no Optuna journal" in n for n in notes)
    assert raw.count("<pre>") == 1 and "<pre>tensorboard --logdir" in raw
    assert "Notes" in text and all(html.escape(n) in raw for n in notes)


def _wsgi_get(app, path: str) -> tuple[str, dict]:
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = {}

    def start_response(code, headers, exc_info=None):
        status["code"] = code

    body = b"".join(app(environ, start_response))
    return status["code"], json.loads(body)


def test_optuna_dashboard_opens_the_study_journal(study):
    """The command the report prints, run through optuna-dashboard's own storage loading
    (the path the `optuna-dashboard` CLI turns into a storage) and its HTTP API."""
    import optuna_dashboard
    from optuna.storages import JournalStorage
    from optuna_dashboard._storage_url import get_storage

    argv = shlex.split(viewer_commands(study)["optuna_dashboard"])
    assert argv[0] == "optuna-dashboard" and len(argv) == 2
    storage = get_storage(argv[1])
    assert isinstance(storage, JournalStorage)
    names = {s.study_name: s for s in storage.get_all_studies()}
    assert set(names) == {"moco", "lcr"}
    assert names["moco"].user_attrs["method"] == "moco"

    app = optuna_dashboard.wsgi(argv[1])
    code, studies = _wsgi_get(app, "/api/studies")
    assert code.startswith("200")
    summaries = {s["study_name"]: s for s in studies["study_summaries"]}
    assert set(summaries) == {"moco", "lcr"}
    code, detail = _wsgi_get(app, f"/api/studies/{summaries['moco']['study_id']}")
    assert code.startswith("200") and len(detail["trials"]) == 4
    assert {t["state"] for t in detail["trials"]} == {"Complete"}
    assert [p["name"] for p in detail["trials"][0]["params"]] == ["lr"]


# ---------------------------------------------------------------- in a real browser

_CHECK = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push("error: " + (e.message || (e.target && e.target.outerHTML || "?")
                                    .slice(0, 80)));
}, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var out = document.createElement("pre");
  out.id = "fgray-check";
  out.textContent = JSON.stringify({images: imgs.length, broken: broken.length,
    widths: imgs.map(function (i) { return i.naturalWidth; }),
    tables: document.querySelectorAll("table tbody tr").length,
    errors: window.__errors, height: document.body.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(binary: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _console_errors(stderr: str) -> list[str]:
    """Page console messages at error level (`CONSOLE` lines Chromium logs at ERROR) and
    uncaught errors; Chromium's own noise about the sandbox, D-Bus or GPU is not the page's."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_html_report_renders_in_a_headless_browser(study, tmp_path):
    binary = _chromium()
    report = Path(html_report(study))
    # The report has no script; a copy with the checker injected reports back into the DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</head>", _CHECK + "</head>", 1))
    dumped = _browser(binary, "--dump-dom", probe.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    match = re.search(r'<pre id="fgray-check">(.*?)</pre>', dumped.stdout, re.S)
    assert match, dumped.stdout[-2000:]
    check = json.loads(html.unescape(match.group(1)))
    assert check["images"] >= 9 and check["broken"] == 0 and min(check["widths"]) > 0
    assert check["tables"] == 3  # init, lcr, moco
    assert check["errors"] == [] and check["height"] > 1500
    assert _console_errors(dumped.stderr) == []

    # The report itself, unmodified: renders without console errors; a screenshot to look at.
    shot = tmp_path / "report.png"
    shown = _browser(binary, f"--screenshot={shot}", "--window-size=1400,3200",
                     report.resolve().as_uri())
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert _console_errors(shown.stderr) == []
    image = Image.open(shot)
    assert image.size == (1400, 3200)
    # Not a blank page: the screenshot has many colours (plots, maps, text).
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 500
    if os.environ.get("FGRAY_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["FGRAY_REPORT_SCREENSHOT"])
