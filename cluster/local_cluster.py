"""A Ray cluster of several nodes on one machine, with an optional local S3 server: fgray's
cluster path (`ray job submit`, results in a bucket) tried on a laptop before a cloud.

    python cluster/local_cluster.py up [--nodes 2] [--cpus-per-node 1] [--s3] [--dir DIR]
    eval "$(python cluster/local_cluster.py env)"          # in each shell that submits
    ray job submit --working-dir . -- python studies/cub_sweep.py --synthetic --preset smoke \\
        --storage s3://fgray/studies
    fgray results s3://fgray/studies/cub_sweep-smoke
    python cluster/local_cluster.py status
    python cluster/local_cluster.py down

`up` starts a head (`ray start --head`) and `--nodes`-1 more nodes (`ray start --address`),
each with `--cpus-per-node` CPUs, and with `--s3` a moto S3 server (`moto_server`, from
`pip install "moto[server]"`) holding one bucket (`fgray`). It then prints the variables a
shell needs to submit jobs and read the bucket (`env` prints them again).

Private by construction:
* Every port listens on 127.0.0.1 only. Each node is started with
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes Ray take the loopback address as the node's
  IP (`--node-ip-address=127.0.0.1` does not: Ray swaps a loopback address for the routable
  one); the dashboard with its jobs API binds 127.0.0.1 too. Every port is chosen free and
  given explicitly, from 20000-32767 (below Linux's ephemeral ports): GCS, dashboard, client
  server, and per node object manager, node manager, dashboard agent (HTTP and gRPC), metrics
  export, runtime-env agent and a range of 100 worker ports; the autoscaler's and the
  dashboard's metrics ports, fixed at 44217 and 44227 unless set, through
  AUTOSCALER_METRIC_PORT and DASHBOARD_METRIC_PORT. So this cluster shares no port with
  another Ray on the machine, and uses none of Ray's defaults (6379, 8265, 10001, 52365,
  10002-19999, 44217, 44227).
* Token authentication is on (RAY_AUTH_MODE=token) with a token of its own, DIR/auth_token
  (mode 600; ~/.ray/auth_token is neither read nor written): every Ray API, the jobs API
  included, asks for it.

What each node carries (the environment of its `ray start`, which all its processes inherit,
the drivers and workers of jobs included): RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH=DIR/auth_token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
RAY_worker_niceness=0 (unless the caller set it: Ray's default, 15, would let every daemon
preempt the training), the two metrics ports
above, and with `--s3` the bucket's AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
(testing/testing), AWS_DEFAULT_REGION/AWS_REGION (us-east-1) and
AWS_EC2_METADATA_DISABLED=true, so a job reaches `s3://fgray/...` from every node; otherwise
the rest of the caller's own environment (RAY_ADDRESS and RAY_AUTH_TOKEN left out).

A shell that talks to the cluster needs the lines `env` prints: RAY_ADDRESS (the dashboard's
URL, for `ray job ...`), RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH, and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for `ray.init(address="127.0.0.1:<GCS port>")` and
`ray status --address ...` (with the switch on, the client swaps 127.0.0.1 for the routable
address too); with `--s3`, the AWS variables for `fgray results s3://...`.

Everything lives under DIR (default /tmp/fgray-cluster; short, because Ray's unix socket paths
below it must stay under ~104 characters): Ray's temp dir DIR/ray (sessions, logs), the
token, the logs of `ray start` and of the S3 server, and the state file DIR/cluster.json
(ports, environment, and the pid and start time of every process seen). Each `ray start`
and the S3 server run in a session of their own, which every process they spawn stays in.
`down` stops, by pid, the recorded processes, those whose command line names DIR/ray, the
members of their sessions and the descendants of all these (a job's driver and whatever it
spawned): SIGTERM, then SIGKILL after 15 s, raylets first and the GCS last, as `ray stop`
does. It never runs `ray stop`, which would stop every Ray of the user on the machine. A
failed `up` stops what it started. Exit status 2: bad input, already up, or a missing tool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

DEFAULT_DIR = "/tmp/fgray-cluster"
STATE = "cluster.json"
LOOPBACK = "127.0.0.1"
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
NICENESS = "RAY_worker_niceness"  # read by each raylet at start
BUCKET = "fgray"
REGION = "us-east-1"
# Ray's unix sockets live at DIR/rayN/session_<date>_<time>_<pid>/sockets/<name>: up to 75
# characters below DIR (node numbers up to 99), and a socket path may have 103 (macOS) or 107
# (Linux).
MAX_DIR_CHARS = 28
MAX_NODES = 99
WORKER_PORTS = 100  # per node: one per worker process
PORT_BAND = (20000, 32768)  # below Linux's ephemeral ports, above Ray's default worker range
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0

# `ray start` itself (the `ray` command is exactly `ray.scripts.scripts.main()`), run with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in its environment so that the node, and every process it
# starts, takes 127.0.0.1 as its IP. `ray start` refuses to start a non-head node with that
# switch off (a guard meant for Windows and macOS), while with it on, Ray swaps the head's
# address 127.0.0.1 for the machine's routable one, where the head does not listen. So for a
# non-head node the launcher lets only that guard see the switch on.
LAUNCHER = """
import sys
import ray._private.ray_constants as constants
from ray.scripts import scripts

if "--head" not in sys.argv:
    class _GuardSeesClusterOn:
        ENABLE_RAY_CLUSTER = True

        def __getattr__(self, name):
            return getattr(constants, name)

    scripts.ray_constants = _GuardSeesClusterOn()
sys.argv[0] = "ray"
sys.exit(scripts.main())
"""

EXAMPLE_SUBMIT = ("ray job submit --working-dir . -- python studies/cub_sweep.py --synthetic "
                  "--preset smoke --storage s3://{bucket}/studies")
EXAMPLE_RESULTS = "fgray results s3://{bucket}/studies/cub_sweep-smoke"


class Failure(Exception):
    """A one-line error for the user; exit status `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- ports ----------------------------------------------------------------------------------

class Ports:
    """Free TCP ports, each handed out once: in PORT_BAND minus the kernel's ephemeral range,
    not listened on by anything (any address), and bindable on every address right now."""

    def __init__(self) -> None:
        low, high = PORT_BAND
        eph = _ephemeral_range()
        candidates = [p for p in range(low, high) if not (eph and eph[0] <= p <= eph[1])]
        if len(candidates) < 2000:  # an unusual ephemeral range: use what is left anywhere
            candidates = [p for p in range(20000, 65536) if not (eph and eph[0] <= p <= eph[1])]
        self._candidates = candidates
        self._taken = _listening_ports()

    def _free(self, port: int) -> bool:
        if port in self._taken:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
        return True

    def one(self) -> int:
        for port in random.sample(self._candidates, min(len(self._candidates), 500)):
            if self._free(port):
                self._taken.add(port)
                return port
        raise Failure("no free TCP port found")

    def block(self, count: int) -> tuple[int, int]:
        pool = set(self._candidates)
        for _ in range(200):
            start = random.choice(self._candidates)
            block = range(start, start + count)
            if all(p in pool and self._free(p) for p in block):
                self._taken.update(block)
                return start, start + count - 1
        raise Failure(f"no {count} consecutive free TCP ports found")


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def _listening_ports() -> set[int]:
    try:
        return {c.laddr.port for c in psutil.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}
    except (psutil.Error, OSError):  # not allowed to list them (macOS without root)
        return set()


# --- processes ------------------------------------------------------------------------------

def _record(proc: psutil.Process, role: str) -> dict:
    return {"pid": proc.pid, "create_time": proc.create_time(), "role": role}


def _note(state: dict, pid: int, role: str) -> None:
    with contextlib.suppress(psutil.Error):  # already ended: nothing to stop
        state["processes"].append(_record(psutil.Process(pid), role))


def _same(entry: dict) -> psutil.Process | None:
    """The recorded process if it still runs: same pid and same start time (a pid reused by
    an unrelated process is left alone)."""
    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["create_time"]) < 1.0 and _running(proc):
            return proc
    except (psutil.Error, KeyError, TypeError):
        pass
    return None


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _cluster_processes(root: str, recorded: list[dict]) -> list[psutil.Process]:
    """Every running process of the cluster, found three ways, all limited to this user:

    * the recorded ones (pid and start time) and those whose command line names the
      cluster's folder, which holds every node's temp dir (GCS, raylets, dashboard,
      monitors);
    * every member of their sessions: each `ray start` (and the S3 server) was started in a
      session of its own, which every process it spawns stays in, agents and workers
      included, though these retitle themselves (`ray::IDLE`: no path left in their command
      line, and their environment overwritten by the new title);
    * the descendants of all these (a job's driver runs in a session of its own).

    Never this process or its ancestors."""
    uid = os.getuid()
    me = psutil.Process()
    spare = {me.pid, *(p.pid for p in me.parents())}
    prefix = root.rstrip("/") + "/"
    found: dict[int, psutil.Process] = {}
    for entry in recorded:
        proc = _same(entry)
        if proc is not None:
            found[proc.pid] = proc
    everyone = []
    for proc in psutil.process_iter(["uids", "cmdline"]):
        try:
            if proc.pid in spare or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
        except (TypeError, AttributeError):
            continue
        everyone.append(proc)
        if any(prefix in arg for arg in proc.info["cmdline"] or []):
            found.setdefault(proc.pid, proc)
    # A session is ours if its leader is one of ours or has ended (a pid stays allocated
    # while any process uses it as a session id, so the session is still the one started
    # here); not if its leader is some other live process (a shell that ran `ray start`).
    sessions = set()
    for proc in found.values():
        sid = _sid(proc.pid)
        if sid is None or sid in spare or sid <= 1:
            continue
        try:
            leader_ended = not _running(psutil.Process(sid))
        except psutil.Error:
            leader_ended = True
        if sid in found or leader_ended:
            sessions.add(sid)
    for proc in everyone:
        if proc.pid not in found and _sid(proc.pid) in sessions:
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                if child.pid not in spare:
                    found.setdefault(child.pid, child)
    return [p for p in found.values() if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(find, timeout: float = STOP_TIMEOUT) -> int:
    """Stop every process `find()` returns, in the order `ray stop` uses: raylets first (so
    that their agents and workers do not complain), then the rest, the GCS last. Each batch
    gets SIGTERM, and SIGKILL if it has not ended after `timeout`. Everything found is known
    from its first sighting, so a process whose parent ends first is not lost; `find()` is
    asked again until nothing is left (Ray may start more while it stops). Returns how many
    processes were stopped."""
    known: dict[int, tuple[psutil.Process, str]] = {}

    def left() -> list[tuple[psutil.Process, str]]:
        for proc in find():
            if proc.pid not in known:
                with contextlib.suppress(psutil.Error):
                    known[proc.pid] = (proc, proc.name())
        return [(p, name) for p, name in known.values() if _running(p)]

    stages = (lambda name: name == "raylet", lambda name: name != "gcs_server",
              lambda name: True)
    for stage in stages:
        _stop_batch([p for p, name in left() if stage(name)], timeout)
    for _ in range(3):
        rest = [p for p, _ in left()]
        if not rest:
            return len(known)
        _stop_batch(rest, timeout)
    raise Failure("processes " + ", ".join(str(p.pid) for p, _ in left())
                  + " are still running")


def _stop_batch(procs: list[psutil.Process], timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        procs = [p for p in procs if _running(p)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait
        # Polled, not waited for: a stopped process may stay a zombie for a while (its
        # parent, often init in a container, reaps it late), which counts as stopped.
        while procs and time.monotonic() < deadline:
            time.sleep(0.1)
            procs = [p for p in procs if _running(p)]
        if not procs:
            return


# --- the cluster ----------------------------------------------------------------------------

class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Each node gets a temp dir of its own, as each machine of a real cluster has its own
        # disk. Nodes sharing one would share `runtime_resources/`: a node setting up a job's
        # working_dir for its first task there deletes and unpacks the folder again, under
        # the driver that another node started in it (its cwd gone, `os.getcwd()` fails).
        self.temp_dir = str(root / "ray")
        self.state_path = root / STATE
        self.token_path = root / "auth_token"

    def node_temp_dir(self, index: int) -> str:
        """The head's is DIR/ray (its logs: DIR/ray/session_latest/logs); node i's DIR/ray<i>."""
        return self.temp_dir if index == 0 else f"{self.temp_dir}{index}"

    # state
    def load(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Failure(f"{self.state_path}: unreadable state file ({exc})") from None

    def save(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)

    def alive(self, state: dict | None) -> list[psutil.Process]:
        return _cluster_processes(str(self.root), (state or {}).get("processes", []))

    # up
    def up(self, nodes: int, cpus: int, s3: bool, bucket: str) -> dict:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise Failure(f"Ray is not installed for {sys.executable}: python -m pip install "
                          "'ray[default]'", 2)
        moto = None
        if s3:
            moto = _tool("moto_server")
            try:
                import boto3  # noqa: F401
            except ImportError:
                moto = None
            if moto is None:
                raise Failure("--s3 needs moto_server and boto3: python -m pip install "
                              "'moto[server]' boto3", 2)
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root):
            state = self.load()
            running = self.alive(state)
            if running:
                raise Failure(f"a local cluster is already up in {self.root} "
                              f"({len(running)} processes); `down --dir {self.root}` first", 2)
            state = {"dir": str(self.root), "temp_dir": self.temp_dir, "nodes": nodes,
                     "cpus_per_node": cpus, "processes": [], "ports": {}, "env": {},
                     "ready": False}
            self.save(state)
            try:
                self._start(state, moto, nodes, cpus, bucket)
            except BaseException:
                self._stop(state)
                self.state_path.unlink(missing_ok=True)
                raise
            state["ready"] = True
            self.save(state)
            return state

    def _start(self, state: dict, moto: str | None, nodes: int, cpus: int,
               bucket: str) -> None:
        ports = Ports()
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        os.chmod(self.token_path, 0o600)

        node_env = {LOOPBACK_SWITCH: "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                    # workers (the training) at niceness 0, not Ray's default 15
                    NICENESS: os.environ.get(NICENESS, "0")}
        if moto:
            s3_port = ports.one()
            endpoint = f"http://{LOOPBACK}:{s3_port}"
            aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                   "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
            node_env.update(aws)
            state["ports"]["s3"] = s3_port
            state["s3"] = {"endpoint": endpoint, "bucket": bucket}
            _say(f"starting the S3 server on {endpoint}")
            log = open(self.root / "moto.log", "wb")  # noqa: SIM115 (the server keeps it)
            proc = subprocess.Popen([moto, "-H", LOOPBACK, "-p", str(s3_port)],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **aws})
            log.close()
            _note(state, proc.pid, "s3")
            self.save(state)
            _wait_port(s3_port, proc, self.root / "moto.log", "the S3 server")
            _make_bucket(endpoint, bucket)
        # Two metrics servers of the head have fixed default ports (44217, 44227) that only
        # these variables change: two Rays on one machine would otherwise share them.
        head = {"port": ports.one(), "dashboard": ports.one(), "client_server": ports.one(),
                "autoscaler_metrics": ports.one(), "dashboard_metrics": ports.one()}
        node_env.update({"AUTOSCALER_METRIC_PORT": str(head["autoscaler_metrics"]),
                         "DASHBOARD_METRIC_PORT": str(head["dashboard_metrics"])})
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(node_env)
        state["env"] = node_env

        gcs = f"{LOOPBACK}:{head['port']}"
        state["ports"].update(head)
        state["gcs_address"] = gcs
        state["dashboard_url"] = f"http://{LOOPBACK}:{head['dashboard']}"
        state["ports"]["nodes"] = []
        for i in range(nodes):
            node_ports = {"object_manager": ports.one(), "node_manager": ports.one(),
                          "dashboard_agent_listen": ports.one(),
                          "dashboard_agent_grpc": ports.one(), "metrics_export": ports.one(),
                          "runtime_env_agent": ports.one()}
            node_ports["min_worker"], node_ports["max_worker"] = ports.block(WORKER_PORTS)
            state["ports"]["nodes"].append(node_ports)
            args = [sys.executable, "-c", LAUNCHER, "start",
                    f"--temp-dir={self.node_temp_dir(i)}",
                    f"--num-cpus={cpus}", "--disable-usage-stats",
                    f"--object-manager-port={node_ports['object_manager']}",
                    f"--node-manager-port={node_ports['node_manager']}",
                    f"--min-worker-port={node_ports['min_worker']}",
                    f"--max-worker-port={node_ports['max_worker']}",
                    f"--dashboard-agent-listen-port={node_ports['dashboard_agent_listen']}",
                    f"--dashboard-agent-grpc-port={node_ports['dashboard_agent_grpc']}",
                    f"--metrics-export-port={node_ports['metrics_export']}",
                    f"--runtime-env-agent-port={node_ports['runtime_env_agent']}"]
            if i == 0:
                args += ["--head", f"--port={head['port']}", "--include-dashboard=true",
                         f"--dashboard-host={LOOPBACK}", f"--dashboard-port={head['dashboard']}",
                         f"--ray-client-server-port={head['client_server']}"]
            else:
                args += [f"--address={gcs}"]
            what = "the head" if i == 0 else f"node {i + 1}"
            _say(f"starting {what} ({cpus} CPU)")
            log_path = self.root / f"ray-start-{i}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                _note(state, proc.pid, "ray start")
                self.save(state)
                try:
                    code = proc.wait(timeout=START_TIMEOUT)
                except subprocess.TimeoutExpired:
                    code = None
            self._note_processes(state)
            if code != 0:
                raise Failure(f"`ray start` for {what} failed"
                              f"{'' if code is None else f' (exit {code})'}: "
                              f"{_last_line(log_path)} (log: {log_path})")
        self._wait_nodes(state, nodes)
        self._note_processes(state)

    def _note_processes(self, state: dict) -> None:
        known = {e["pid"] for e in state["processes"]}
        for proc in self.alive(state):
            if proc.pid not in known:
                with contextlib.suppress(psutil.Error):
                    state["processes"].append(_record(proc, "ray"))
        self.save(state)

    def _wait_nodes(self, state: dict, nodes: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        seen: list[str] | str = "no answer"
        while time.monotonic() < deadline:
            try:
                seen = self.alive_nodes(state)
                if len(seen) >= nodes:
                    return
            except OSError as exc:  # the dashboard is still starting
                seen = str(exc)
            time.sleep(1.0)
        raise Failure(f"the cluster did not come up: {nodes} nodes expected, alive: {seen} "
                      f"(logs: {self.temp_dir}/session_latest/logs)")

    def alive_nodes(self, state: dict) -> list[str]:
        """Ids of the alive nodes, from the dashboard's state API (with the token)."""
        request = urllib.request.Request(
            f"{state['dashboard_url']}/api/v0/nodes?limit=1000",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
        rows = body["data"]["result"]["result"]
        return [r["node_id"] for r in rows if r.get("state") == "ALIVE"]

    # down
    def down(self) -> int:
        if not self.root.exists():
            return 0
        with _locked(self.root):
            state = self.load()
            count = self._stop(state)
            self.state_path.unlink(missing_ok=True)
            return count

    def _stop(self, state: dict | None) -> int:
        return _terminate(lambda: self.alive(state))

    # env
    def env_lines(self, state: dict) -> list[str]:
        lines = [f"export RAY_ADDRESS={shlex.quote(state['dashboard_url'])}",
                 "export RAY_AUTH_MODE=token",
                 f"export RAY_AUTH_TOKEN_PATH={shlex.quote(str(self.token_path))}",
                 "unset RAY_AUTH_TOKEN  # it would take precedence over the token file",
                 # Without it, Ray swaps the address 127.0.0.1 of `ray.init(address=...)` and
                 # `ray status --address` for the machine's routable one, where nothing listens.
                 f"export {LOOPBACK_SWITCH}=0"]
        for key, value in state["env"].items():
            if key.startswith("AWS_"):
                lines.append(f"export {key}={shlex.quote(value)}")
        bucket = state.get("s3", {}).get("bucket", "BUCKET")
        lines += [f"# Ray GCS (ray status --address, ray.init): {state['gcs_address']}",
                  f"# submit:  {EXAMPLE_SUBMIT.format(bucket=bucket)}",
                  f"# results: {EXAMPLE_RESULTS.format(bucket=bucket)}",
                  f"# stop:    python cluster/local_cluster.py down --dir {self.root}"]
        return lines


@contextlib.contextmanager
def _locked(root: Path):
    """One `up`/`down` at a time per DIR."""
    import fcntl

    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise Failure(f"{what} did not start on port {port}: {_last_line(log)}")
        time.sleep(0.1)


def _make_bucket(endpoint: str, bucket: str) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        client.create_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:  # one line; `up` stops what it started
        raise Failure(f"cannot create the bucket {bucket} on {endpoint}: {exc}") from None


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, instead of usage + error
        print(f"local_cluster.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _node_count(text: str) -> int:
    value = _at_least_one(text)
    if value > MAX_NODES:  # the node's temp dir name, DIR/ray<i>, is sized for two digits
        raise argparse.ArgumentTypeError(f"{value}: at most {MAX_NODES} nodes")
    return value


def _directory(text: str) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if len(str(path)) > MAX_DIR_CHARS:
        raise argparse.ArgumentTypeError(
            f"{path} is {len(str(path))} characters: at most {MAX_DIR_CHARS} (Ray's unix "
            "socket paths under it must stay short)")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a folder")
    return path


def _bucket(text: str) -> str:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid bucket name")
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="local_cluster.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    dir_help = f"the cluster's folder (default {DEFAULT_DIR}; at most {MAX_DIR_CHARS} chars)"
    parser.add_argument("--dir", type=_directory, default=Path(DEFAULT_DIR), help=dir_help)
    parser.add_argument("--print-env", action="store_true",
                        help="print the shell variables of the running cluster (as `env`)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    up = sub.add_parser("up", help="start the cluster")
    up.add_argument("--nodes", type=_node_count, default=2,
                    help=f"Ray nodes (default 2, at most {MAX_NODES})")
    up.add_argument("--cpus-per-node", type=_at_least_one, default=1,
                    help="logical CPUs of each node (default 1)")
    up.add_argument("--s3", action="store_true", help="also a local S3 server with a bucket")
    up.add_argument("--bucket", type=_bucket, default=BUCKET,
                    help=f"the bucket --s3 creates (default {BUCKET})")
    for name, text in (("up", None), ("down", "stop everything `up` started"),
                       ("status", "is it up, how many nodes are alive"),
                       ("env", "print the shell variables again (eval \"$(... env)\")")):
        p = up if name == "up" else sub.add_parser(name, help=text)
        p.add_argument("--dir", type=_directory, default=argparse.SUPPRESS, help=dir_help)
    args = parser.parse_args(argv)
    if args.command is None:
        if not args.print_env:
            parser.error("a command is needed: up, down, status or env")
        args.command = "env"
    return args


def _interrupt(*_signal):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cluster = Cluster(args.dir)
    # A SIGTERM (a timeout, a closed terminal) interrupts `up` like Ctrl-C: what it started
    # is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "up":
            state = cluster.up(args.nodes, args.cpus_per_node, args.s3, args.bucket)
            _say(f"up: {args.nodes} nodes, dashboard {state['dashboard_url']}, state "
                 f"{cluster.state_path}; paste these lines (or eval \"$(python "
                 f"cluster/local_cluster.py env --dir {cluster.root})\"):")
            print("\n".join(cluster.env_lines(state)))
            return 0
        if args.command == "down":
            count = cluster.down()
            _say(f"down: stopped {count} processes" if count
                 else f"nothing runs in {cluster.root}")
            return 0
        state = cluster.load() if cluster.root.exists() else None
        if state is None or not state.get("ready"):
            raise Failure(f"no local cluster is up in {cluster.root}", 1)
        if args.command == "env":
            print("\n".join(cluster.env_lines(state)))
            return 0
        running = cluster.alive(state)
        try:
            nodes = f"{len(cluster.alive_nodes(state))}/{state['nodes']} nodes alive"
        except (OSError, ValueError, KeyError) as exc:
            nodes = f"dashboard not answering ({exc})"
        s3 = f", S3 {state['s3']['endpoint']} bucket {state['s3']['bucket']}" \
            if state.get("s3") else ""
        print(f"up: {nodes}, {len(running)} processes, dashboard {state['dashboard_url']}, "
              f"GCS {state['gcs_address']}{s3}")
        return 0 if running else 1
    except Failure as exc:
        print(f"local_cluster.py: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("local_cluster.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
