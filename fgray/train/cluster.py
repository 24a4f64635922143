"""Connecting to Ray: a cluster address (`--address` or RAY_ADDRESS) or a local Ray started
for the duration of a command.

Under `ray job submit` the job's environment carries RAY_ADDRESS, so the same script joins
the cluster it was submitted to; run directly, it starts local Ray and shuts it down at exit.
A local Ray is private: every process of it listens on 127.0.0.1 only (its dashboard too,
which also asks for Ray's token), so nothing on the network reaches it. Its workers run at
niceness 0, not Ray's default 15, Ray Train's controller polls its workers every 0.25 s,
not 2 s, Train starts no preemption watcher (a RAY_worker_niceness,
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S or RAY_TRAIN_ENABLE_PREEMPTION_WATCHER the user set is kept;
a driver joining a cluster hands the poll interval to its job's processes), and its workers
start with fgray's malloc settings (`fgray.allocator`; a driver joining a cluster hands them
to its job too; MALLOC_* variables the user set win). The dashboard
stays on by default because Ray Train needs the state API it serves (see `ray_session`);
FGRAY_RAY_DASHBOARD=0 turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fgray.errors import UserError

# A short temp root for a local Ray (its unix socket paths must stay under ~107 characters).
TEMP_DIR_ENV = "FGRAY_RAY_TEMP_DIR"
# Logical CPUs of a local Ray; by default Ray counts the machine's cores.
NUM_CPUS_ENV = "FGRAY_RAY_NUM_CPUS"
# "0": a local Ray starts no dashboard (by default it has one, on 127.0.0.1).
DASHBOARD_ENV = "FGRAY_RAY_DASHBOARD"
LOOPBACK = "127.0.0.1"
# The niceness of a node's worker processes, read by its raylet at start. Ray's default is 15
# (its daemons stay responsive under load); fgray's workers are the training itself, and at
# 15 every Ray daemon, the driver and any other process on the node preempt them: a 1-worker
# Ray Train epoch ran 18 % slower than the same loop in-process (benchmarks/ray_overhead.py).
WORKER_NICENESS_ENV = "RAY_worker_niceness"
# How often Ray Train's controller polls its workers (Ray's default 2 s). A worker's report
# waits until the controller has taken the one before it (Train's result queue holds one),
# and the end of a run is noticed at a poll: with the default, a run of short epochs lost up
# to 2 s per epoch and 2 s at its end (benchmarks/ray_overhead.py, the "reports" and
# "finish" phases). A poll is one small actor call per worker.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"
# Ray Train's preemption watcher: an actor per run that polls for nodes a cloud is about to
# take back (spot instances) and logs which ranks they hold. A local Ray is one machine that
# no cloud drains, so there it only costs a process start during the first epoch and a poll
# a second through every epoch, on the cores the worker trains on. Off on a local Ray; a
# cluster keeps Ray's default (on).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray takes a node's IP from this switch: "0" (meant for Windows and macOS) makes it the
# loopback address instead of the address of the interface with the default route.
_LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                temp_dir: str | None = None, log_to_driver: bool = True,
                dashboard: bool | None = None) -> Iterator[None]:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray; disconnect on exit.

    Reuses a connection already open in this process and then leaves it open.
    `log_to_driver=False` keeps the workers' output in Ray's session logs only.
    A local Ray listens on 127.0.0.1 only; `dashboard` (default: on unless
    FGRAY_RAY_DASHBOARD=0) starts its dashboard there too. Joining a cluster changes nothing
    of it.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address:
        forwarded = job_env()
        if forwarded:
            kwargs["runtime_env"] = {"env_vars": forwarded}
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise UserError(f"cannot reach the Ray cluster at {address!r} ({exc}); expected the "
                            "address of a running head (ray start --head, or RAY_ADDRESS)"
                            ) from None
        try:
            yield
        finally:
            ray.shutdown()
        return
    cpus = num_cpus if num_cpus is not None else _env_int(NUM_CPUS_ENV)
    temp = temp_dir or os.environ.get(TEMP_DIR_ENV) or None
    if dashboard is None:
        dashboard = os.environ.get(DASHBOARD_ENV, "").strip() != "0"
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT",
                                            _LOOPBACK_NODE_ENV, WORKER_NICENESS_ENV,
                                            TRAIN_POLL_ENV, PREEMPTION_WATCHER_ENV)}
    # Workers at the driver's priority, Train's controller polling every TRAIN_POLL_S and no
    # preemption watcher, unless the user chose otherwise (every Ray process inherits this
    # environment).
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # Ray's own helpers inside workers (Train's placement-group cleaner uses the state API)
    # find "the" cluster from RAY_ADDRESS, or by scanning for local instances, which fails
    # when another Ray runs on the same machine. So the local head gets a known GCS port and
    # every process it starts inherits RAY_ADDRESS pointing at it.
    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
    # Every server of a node (GCS, raylet, workers, agents, metrics) binds the node's IP.
    # Ray makes that the loopback address only while this switch is off; it reads it once, at
    # import, so it is turned off here and in the environment the Ray processes inherit.
    # (`_node_ip_address="127.0.0.1"` does not do it: Ray swaps a loopback address for the
    # routable one.)
    os.environ[_LOOPBACK_NODE_ENV] = "0"
    from ray._private import ray_constants as constants

    enable_cluster = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    # Without a dashboard there is no state API (its HTTP server is the dashboard's): Ray
    # Train's placement-group cleaner then warns every second or two that it cannot ask
    # whether the run's controller lives, which is why the dashboard is on by default (on
    # 127.0.0.1, behind Ray's token like every other API). On or off, Ray publishes
    # `127.0.0.1:<dashboard port>` as the state API's address: a free port, never the shared
    # default 8265, keeps it from asking another Ray's dashboard on this machine, which knows
    # none of our actors and would call a live run's controller dead.
    dashboard_port = free_port()
    try:
        ray.init(address="local", num_cpus=cpus, _temp_dir=temp, include_dashboard=dashboard,
                 dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                 runtime_env={"env_vars": worker_allocator_env()}, **kwargs)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        yield
    finally:
        ray.shutdown()
        constants.ENABLE_RAY_CLUSTER = enable_cluster
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# The variables through which pyarrow's S3 and GCS clients find a store and its credentials.
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_")
STORAGE_ENV_NAMES = ("CLOUD_STORAGE_EMULATOR_ENDPOINT",)


def _job_runtime_env_vars() -> set[str]:
    """The variables the submitted job's own runtime_env sets (Ray refuses to merge a
    driver's env_vars with them)."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return set(((json.loads(job) if job else {}).get("runtime_env") or {})
                   .get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def job_env() -> dict[str, str]:
    """What a driver joining a cluster hands to every task and actor of its job (runtime_env
    env_vars): its storage variables (`storage_env`), Train's poll interval
    (TRAIN_POLL_ENV: this process's value, else TRAIN_POLL_S) and the allocator settings,
    each unless the submitted job's runtime_env sets it already."""
    taken = _job_runtime_env_vars()
    out = storage_env()
    if TRAIN_POLL_ENV not in taken:
        out[TRAIN_POLL_ENV] = os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_S)
    return {**out, **{k: v for k, v in worker_allocator_env().items() if k not in taken}}


def worker_allocator_env() -> dict[str, str]:
    """glibc's malloc settings for every worker of a job (`fgray.allocator.ENV`: one arena,
    freed memory kept for the next step), as this process's environment sets them, if it
    does: Ray runs training in a thread of its worker, where glibc's defaults fault the
    step's memory in afresh every step."""
    from fgray.allocator import ENV

    return {k: os.environ.get(k, v) for k, v in ENV.items()}


def storage_env() -> dict[str, str]:
    """The storage variables of this process (endpoint, region, credentials: `AWS_*`,
    `GOOGLE_*`) that a job on a cluster hands to every task and actor it starts, through its
    runtime_env: a bucket this driver reaches is then reached by every trial and worker, on
    any node, whatever environment that node was started with. A variable the submitted
    job's own runtime_env already sets is left to it (Ray refuses to merge the two)."""
    taken = _job_runtime_env_vars()
    return {k: v for k, v in os.environ.items()
            if (k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV_NAMES) and k not in taken}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: expected a whole number of CPUs") from None


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float

    @classmethod
    def current(cls) -> ClusterResources:
        import ray

        total = ray.cluster_resources()
        return cls(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)))


def ray_storage(location: str) -> dict:
    """`storage_path` (and `storage_filesystem` for object storage) of a Ray Train or Tune
    `RunConfig` for `location`, from fgray's own resolution of it (`fgray.storage.resolve`):
    Ray then writes where fgray reads, for a local path, an `s3://`/`gs://` URI and a URI
    with pyarrow's query options alike."""
    from fgray.storage import is_local, resolve

    fs, path = resolve(location)
    return {"storage_path": path} if is_local(fs) else {"storage_path": path,
                                                        "storage_filesystem": fs}
