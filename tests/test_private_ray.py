"""A local Ray is private: every process that `ray_session()` starts (GCS, raylet, workers,
agents, the driver's own core worker, the dashboard) listens on the loopback address only;
with FGRAY_RAY_DASHBOARD=0 there is no dashboard at all. Its workers run at niceness 0
(Ray's default, 15, let every daemon preempt the training), or at the user's
RAY_worker_niceness, and Ray Train's controller polls every 0.25 s (or the user's
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).

The session runs in a child process, so that its Ray processes are exactly the child's
descendants (other Rays may run on this machine) and `ray` is imported before the session
starts, as fgray's own modules do."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from fgray.allocator import ENV

SESSION = r"""
import json, os, sys

import psutil
import ray  # imported before the session: Ray reads some settings once, at import

from fgray.train.cluster import ray_session

KEYS = ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "RAY_worker_niceness", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
before = {k: os.environ.get(k) for k in KEYS}
with ray_session(num_cpus=1, temp_dir=sys.argv[1], log_to_driver=False):
    address = os.environ["RAY_ADDRESS"]

    @ray.remote
    def worker_pid():
        # The environment the process started with (what glibc's malloc reads, once).
        started = dict(kv.split(b"=", 1) for kv in open("/proc/self/environ", "rb").read()
                       .split(b"\0") if kv.startswith(b"MALLOC_"))
        return (os.getpid(), os.nice(0), os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"),
                os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
                {k.decode(): v.decode() for k, v in started.items()})

    worker, niceness, poll, preemption, malloc = ray.get(worker_pid.remote())
    # Where Ray tells clients (the state and job APIs) its dashboard's HTTP server is.
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    api_server = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                  namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    me = psutil.Process()
    processes, listening = {}, []
    for proc in [me, *me.children(recursive=True)]:
        try:
            cmdline = " ".join(proc.cmdline())
            sockets = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        processes[proc.pid] = cmdline
        listening += [[proc.pid, s.laddr.ip, s.laddr.port]
                      for s in sockets if s.status == psutil.CONN_LISTEN]
after = {k: os.environ.get(k) for k in KEYS}
print(json.dumps({"address": address, "worker": worker, "niceness": niceness, "poll": poll,
                  "preemption": preemption, "malloc": malloc,
                  "api_server": api_server.decode(), "processes": processes,
                  "listening": listening, "before": before, "after": after}))
"""


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _run_session(dashboard: bool, niceness: str | None = None, poll: str | None = None,
                 arenas: str | None = None) -> dict:
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths stay short
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "FGRAY_RAY_DASHBOARD", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                        "RAY_worker_niceness", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
           and not k.startswith("MALLOC_")}
    if arenas is not None:
        env["MALLOC_ARENA_MAX"] = arenas
    if not dashboard:
        env["FGRAY_RAY_DASHBOARD"] = "0"
    if niceness is not None:
        env["RAY_worker_niceness"] = niceness
    if poll is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = poll
    child = subprocess.Popen([sys.executable, "-c", SESSION, temp_dir], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's group: our Ray, nobody else's
        out, err = child.communicate()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert child.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _kinds(session: dict) -> dict[str, list[list]]:
    """The listening sockets by the kind of process that holds them."""
    kinds: dict[str, list[list]] = {}
    for pid, ip, port in session["listening"]:
        cmdline = session["processes"][str(pid)]
        kind = next((k for k in ("gcs_server", "raylet", "dashboard.py", "DashboardAgent",
                                 "RuntimeEnvAgent", "monitor.py") if k in cmdline), cmdline[:40])
        if pid == session["worker"]:
            kind = "worker"
        kinds.setdefault(kind, []).append([pid, ip, port])
    return kinds


def _check_private(session: dict) -> dict[str, list[list]]:
    kinds = _kinds(session)
    # The servers were found at all: the GCS, the raylet, the agents and the task's worker.
    for kind in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "worker"):
        assert kind in kinds, kinds
    public = {kind: socks for kind, socks in kinds.items()
              if any(not _loopback(ip) for _, ip, _ in socks)}
    assert not public, f"listening beyond the loopback address: {public}"
    assert session["address"].startswith("127.0.0.1:"), session["address"]
    assert session["after"] == session["before"], "the session's environment stays behind"
    return kinds


def _dashboard_port(session: dict) -> int:
    host, port = session["api_server"].rsplit(":", 1)
    assert _loopback(host), session["api_server"]
    return int(port)


@pytest.mark.slow
def test_a_local_ray_without_dashboard_listens_on_loopback_only():
    session = _run_session(dashboard=False)
    _check_private(session)
    assert session["niceness"] == 0  # not Ray's default 15
    # What Ray Train's controller reads: every 0.25 s, not Ray's default 2 s.
    assert session["poll"] == "0.25"
    # No preemption watcher on a local Ray: no cloud drains this machine's only node.
    assert session["preemption"] == "0"
    # Workers start with fgray's malloc settings (training runs in a thread of theirs).
    assert session["malloc"] == ENV
    # Ray still starts its API server process (with its metrics port) and publishes a
    # dashboard address, but nothing serves HTTP there: not ours, and not another Ray's.
    port = _dashboard_port(session)
    assert port not in {p for _, _, p in session["listening"]}, session
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something answers on {port}"


@pytest.mark.slow
def test_a_local_ray_and_its_dashboard_listen_on_loopback_only():
    session = _run_session(dashboard=True, niceness="7", poll="1.5", arenas="4")
    assert session["niceness"] == 7 and session["poll"] == "1.5"  # the user's choices kept
    assert session["malloc"] == {**ENV, "MALLOC_ARENA_MAX": "4"}
    kinds = _check_private(session)
    port = _dashboard_port(session)
    assert port in {p for _, _, p in kinds.get("dashboard.py", [])}, kinds


def test_a_driver_joining_a_cluster_hands_its_job_the_storage_and_poll_settings(monkeypatch):
    """`job_env`: what `ray_session(address)` puts in its job's runtime_env -- the storage
    variables and Train's poll interval (0.25 s, or this process's), never a variable the
    submitted job's own runtime_env sets (Ray refuses to merge the two)."""
    from fgray.train.cluster import job_env

    for key in [k for k in os.environ if k.startswith(("AWS_", "GOOGLE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert job_env() == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                         "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", **ENV}
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert job_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1"
    assert job_env()["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {
        "AWS_ENDPOINT_URL": "x", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3", **ENV}}}))
    assert job_env() == {}
