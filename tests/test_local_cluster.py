"""cluster/local_cluster.py: a 2-node Ray cluster on this machine with a local S3 server.

`up --nodes 2 --s3` in a subprocess; with only the variables it prints, Ray sees two alive
nodes, both on 127.0.0.1; a job submitted with `ray job submit` (the submitting shell has no
AWS variable) writes an object to the bucket from each node, so the nodes' environment
reaches the bucket; every socket the cluster listens on is on the loopback address; `down`
leaves no process of the cluster and no listener on its ports. Bad input is one line, exit
2, and starts nothing. Other Rays may run on this machine: the test never touches them (no
`ray stop`, processes are told apart by pid)."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.py"

# Runs on the cluster, as the job's driver: one task pinned to each alive node writes an
# object to the bucket through pyarrow, which finds the endpoint in AWS_ENDPOINT_URL.
PROBE = r"""
import os

import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# The driver runs in the job's working_dir, which Ray unpacked on the head. Its tasks on the
# other node must not unpack it again over the driver (Tune later needs `os.getcwd()`).
started_in = os.stat(".").st_ino
ray.init()


@ray.remote(num_cpus=1)
def write(node_id):
    fs, _ = pafs.FileSystem.from_uri("s3://fgray/x")
    here = ray.get_runtime_context().get_node_id()
    with fs.open_output_stream(f"fgray/probe/{node_id}") as f:
        f.write(here.encode())
    return here


nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
done = ray.get([write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote(n) for n in nodes])
assert done == nodes, (done, nodes)
assert os.stat(os.getcwd()).st_ino == started_in and os.path.exists("probe.py"), os.getcwd()
print("PROBE-OK", len(nodes))
"""

NODES = r"""
import json, sys
import ray

ray.init(address=sys.argv[1], logging_level="ERROR")
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"]}
                  for n in ray.nodes()]))
"""


def _short_dir() -> Path:
    # Ray's unix socket paths below it must stay short: /tmp/fgcXXXXXXXX.
    return Path(tempfile.mkdtemp(prefix="fgc", dir="/tmp"))


def _clean_env() -> dict[str, str]:
    """This environment without anything that points at a Ray or an S3 endpoint."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "AWS_")) or k == "AWS_CA_BUNDLE"}


def _script(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=_clean_env(), cwd=ROOT)


def _parse_env(text: str) -> dict[str, str | None]:
    """The `export K=V` and `unset K` lines a user pastes (None: unset)."""
    env: dict[str, str | None] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            key, _, value = words[1].partition("=")
            env[key] = value
        elif words[:1] == ["unset"]:
            env.update({key: None for key in words[1:]})
    return env


def _with(env: dict[str, str | None], keep=lambda key: True) -> dict[str, str]:
    out = _clean_env()
    for key, value in env.items():
        if not keep(key):
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _named(root: Path) -> list[psutil.Process]:
    """Running processes whose command line names the cluster's folder."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(root) + "/" in " ".join(proc.info["cmdline"] or []) and _running(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cluster_snapshot(root: Path, state: dict) -> dict[int, psutil.Process]:
    """The cluster's processes now: the recorded ones, those naming the folder, and all
    their descendants (agents and workers retitle themselves: `ray::IDLE`)."""
    procs: dict[int, psutil.Process] = {}
    for entry in state["processes"]:
        try:
            proc = psutil.Process(entry["pid"])
            if abs(proc.create_time() - entry["create_time"]) < 1 and _running(proc):
                procs[proc.pid] = proc
        except psutil.Error:
            continue
    procs.update({p.pid: p for p in _named(root)})
    for proc in list(procs.values()):
        try:
            procs.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return procs


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _ports(state: dict) -> set[int]:
    ports = {v for k, v in state["ports"].items() if isinstance(v, int)}
    for node in state["ports"]["nodes"]:
        ports |= {v for k, v in node.items() if not k.endswith("_worker")}
    return ports


def _listening() -> set[int]:
    return {c.laddr.port for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_bad_input_is_one_line_exit_2_and_starts_nothing():
    root = _short_dir()
    try:
        for args in (["up", "--nodes", "0"], ["up", "--nodes", "100"],
                     ["up", "--cpus-per-node", "-1"],
                     ["up", "--nodes", "two"], ["launch"], []):
            result = _script(*args, "--dir", str(root), timeout=60)
            assert result.returncode == 2, (args, result)
            assert result.stdout == ""
            assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        long_dir = "/tmp/" + "x" * 40
        result = _script("up", "--dir", long_dir, timeout=60)
        assert result.returncode == 2 and "at most" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not Path(long_dir).exists()
        assert list(root.iterdir()) == []  # no state, no token, no log
        assert _named(root) == []
        # Nothing up: `down` says so in one line, `env` and `status` fail.
        down = _script("down", "--dir", str(root), timeout=60)
        assert down.returncode == 0 and len(down.stderr.strip().splitlines()) == 1
        assert _script("env", "--dir", str(root), timeout=60).returncode == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_nodes_with_s3_run_a_job_that_writes_to_the_bucket(tmp_path):
    pytest.importorskip("boto3")
    if shutil.which("moto_server") is None and not Path(sys.executable).with_name(
            "moto_server").exists():
        pytest.skip("moto[server] is not installed")
    root = _short_dir()
    state = None
    try:
        up = _script("up", "--nodes", "2", "--cpus-per-node", "1", "--s3", "--dir", str(root))
        assert up.returncode == 0, up.stderr
        state = json.loads((root / "cluster.json").read_text())
        printed = _parse_env(up.stdout)
        assert printed == _parse_env(_script("env", "--dir", str(root), timeout=60).stdout)
        assert printed["RAY_AUTH_MODE"] == "token"
        assert printed["RAY_AUTH_TOKEN_PATH"] == str(root / "auth_token")
        assert printed["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        assert printed["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert "RAY_AUTH_TOKEN" in printed and printed["RAY_AUTH_TOKEN"] is None
        assert (root / "auth_token").stat().st_mode & 0o077 == 0
        assert "ray job submit --working-dir . -- python studies/cub_sweep.py" in up.stdout
        status = _script("status", "--dir", str(root), timeout=60)
        assert status.returncode == 0 and "2/2 nodes alive" in status.stdout, status
        # Already up: one line, exit 2, nothing else started.
        again = _script("up", "--dir", str(root), timeout=60)
        assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1

        # Two alive nodes, distinct, both on the loopback address: asked from a fresh
        # process with the printed variables only (the token among them).
        ray_env = _with(printed, lambda k: k.startswith("RAY_"))
        nodes = subprocess.run([sys.executable, "-c", NODES, state["gcs_address"]],
                               capture_output=True, text=True, timeout=60, env=ray_env,
                               cwd=tmp_path)
        assert nodes.returncode == 0, nodes.stderr
        listed = json.loads(nodes.stdout.strip().splitlines()[-1])
        alive = [n for n in listed if n["alive"]]
        assert len(alive) == 2 and len({n["id"] for n in alive}) == 2
        assert {n["ip"] for n in alive} == {"127.0.0.1"}
        # Without the token the jobs API refuses.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(printed["RAY_ADDRESS"] + "/api/jobs/", timeout=30)
        assert refused.value.code == 401

        # A job, submitted with the Ray variables only: the AWS ones it uses are the nodes'.
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "probe.py").write_text(PROBE)
        ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        job = subprocess.run([ray_cli, "job", "submit", "--working-dir", str(job_dir), "--",
                              "python", "probe.py"], capture_output=True, text=True,
                             timeout=120, env=ray_env, cwd=job_dir)
        assert job.returncode == 0 and "PROBE-OK 2" in job.stdout, job.stdout + job.stderr

        import boto3

        s3 = boto3.client("s3", endpoint_url=printed["AWS_ENDPOINT_URL"],
                          region_name=printed["AWS_DEFAULT_REGION"],
                          aws_access_key_id=printed["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=printed["AWS_SECRET_ACCESS_KEY"])
        objects = s3.list_objects_v2(Bucket="fgray", Prefix="probe/").get("Contents", [])
        assert sorted(o["Key"] for o in objects) == sorted(f"probe/{n['id']}" for n in alive)
        for node in alive:  # each object was written on the node it names
            body = s3.get_object(Bucket="fgray", Key=f"probe/{node['id']}")["Body"].read()
            assert body.decode() == node["id"]

        # Every socket the cluster listens on is on the loopback address.
        procs = _cluster_snapshot(root, state)
        assert len(procs) >= 10
        listeners = []
        for proc in procs.values():
            try:
                listeners += [(proc.pid, c.laddr.ip, c.laddr.port)
                              for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        assert listeners and all(_loopback(ip) for _, ip, _ in listeners), listeners
        assert _ports(state) <= {port for _, _, port in listeners}

        down = _script("down", "--dir", str(root), timeout=120)
        assert down.returncode == 0, down.stderr
        assert not (root / "cluster.json").exists()
        survivors = [p.pid for p in procs.values() if _running(p)]
        assert survivors == [] and _named(root) == []
        assert not (_ports(state) & _listening())
        again = _script("down", "--dir", str(root), timeout=60)
        assert again.returncode == 0 and again.stderr.startswith("nothing runs")
    finally:
        if (root / "cluster.json").exists():
            _script("down", "--dir", str(root), timeout=120)
        shutil.rmtree(root, ignore_errors=True)
