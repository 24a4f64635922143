"""A simulated multi-node Ray cluster on this machine, for tests that need more than one node
(a Train run with one rank per node, a study on two nodes, a node lost mid-run).

`ray_cluster(nodes=2, cpus=1)` starts `nodes` Ray nodes with `ray.cluster_utils.Cluster`
(the first is the head, with a dashboard on a free port: Ray Train's placement-group cleaner
needs the state API), connects this process to the head as the driver and yields a
`LocalCluster`; on exit the driver disconnects, every node it started or added is stopped (by
the pids Ray recorded for that node, nothing else) and the temp dir is removed::

    from twonode import ray_cluster

    with ray_cluster(nodes=2, cpus=1) as cluster:
        cluster.node_ids()              # live node ids, head first
        worker = cluster.workers[0]     # a ray._private.node.Node
        cluster.remove(worker)          # its raylet and every process on it die
        new = cluster.add(cpus=1)       # a fresh node with a new node id
        new.node_id

(The `two_nodes` fixture in conftest.py yields one for a test.)

What it takes care of, all undone on exit:

- Every node binds 127.0.0.1: Ray takes a node's IP from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER,
  which it reads once at import, so it is set to "0" in the environment the node processes
  inherit and patched in the already imported `ray_constants` (as
  `fgray.train.cluster.ray_session` does). All nodes share an IP, so they all report
  `node_rank` 0 and the same IP: tell them apart by node id
  (`ray.get_runtime_context().get_node_id()`; the `record_node` hook below records it).
- A short temp dir (`/tmp/rXXXX`: Ray's unix socket paths must stay under ~107 characters),
  and the cluster's address written there, not to the machine-wide `/tmp/ray` file that
  `ray.init(address="auto")` of other Ray instances on this machine reads.
- RAY_ADDRESS points at this cluster (Ray's own helpers inside workers look it up there), and
  the head's GCS listens on a free port, never a shared default.
- Every node process inherits this process's environment *when the node starts*: set what
  the workers need (the `s3` fixture's AWS_* variables, ...) before `ray_cluster` or `add`.

The driver is connected with `ray.init`, so `fgray.train.cluster.ray_session` (hence
`ray_pretrain`, `run_study`, ...) reuses the connection. Never remove the head: the driver
is attached to it (and Ray Train's controller runs on the driver's node).

Epoch hooks for runs on the cluster (`epoch_hooks=[...]` of `fgray.train.trainer`; named by
dotted path, so every worker imports this module): `record_node` appends one JSON line per
(epoch, rank) with the rank's node id; `hold_on_node` keeps a rank on a given node inside
its hook (a test then removes that node) once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
_LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RECORD_NODE = "tests.twonode:record_node"
HOLD_ON_NODE = "tests.twonode:hold_on_node"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class LocalCluster:
    """A running `ray.cluster_utils.Cluster` with this process connected as its driver."""

    def __init__(self, cluster, temp_dir: str) -> None:
        self.cluster = cluster
        self.temp_dir = temp_dir
        self._workers: list = []  # the live non-head nodes, oldest first

    @property
    def address(self) -> str:
        """The head's GCS address (`127.0.0.1:port`), as RAY_ADDRESS holds it."""
        return self.cluster.address

    @property
    def head(self):
        return self.cluster.head_node

    @property
    def workers(self) -> list:
        """The live non-head nodes, oldest first."""
        return list(self._workers)

    def add(self, cpus: float = 1, **node_args):
        """Start one more (non-head) node with `cpus` CPUs and wait until it is registered;
        returns its `ray._private.node.Node` (`.node_id` is its id)."""
        node = self.cluster.add_node(num_cpus=cpus, temp_dir=self.temp_dir, **node_args)
        self._workers.append(node)
        self.cluster.wait_for_nodes()
        return node

    def remove(self, node, graceful: bool = False) -> None:
        """Stop a non-head node: its raylet and every process on it (workers included) die,
        as when a machine is lost (`graceful=False`: SIGKILL at once). Ray notices the node
        is dead within seconds."""
        if node is self.head:
            raise ValueError("the driver is attached to the head: remove a worker node")
        self.cluster.remove_node(node, allow_graceful=graceful)
        self._workers.remove(node)

    def node_ids(self) -> list[str]:
        """The ids of the live nodes as Ray's GCS sees them, the head's first."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ours = [self.head, *self.workers]
        return [n.node_id for n in ours if n.node_id in alive]

    def wait_dead(self, node_id: str, timeout: float = 60) -> None:
        """Wait until the GCS marks `node_id` dead."""
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"node {node_id} still alive after {timeout} s")


# The head's `_system_config` by default. The GCS calls a silent node dead after 5 missed
# health checks, one a second (Ray's default, 3 s x 5 after a 5 s delay, takes ~20 s to
# notice a node removed by SIGKILL). Ray's memory monitor is off: on a shared test machine it
# kills our workers for memory other processes hold (the kernel's OOM killer still acts).
TEST_SYSTEM_CONFIG = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                      "health_check_failure_threshold": 5, "memory_monitor_refresh_ms": 0}


@contextmanager
def ray_cluster(nodes: int = 2, cpus: float = 1, *, dashboard: bool = True,
                log_to_driver: bool = False, system_config: Mapping[str, Any] | None = None
                ) -> Iterator[LocalCluster]:
    """`nodes` Ray nodes with `cpus` CPUs each (the head included) on 127.0.0.1, this process
    connected to the head as the driver; everything stopped and restored on exit (module
    docstring). `log_to_driver=True` shows the workers' output here. `system_config` is the
    head's Ray `_system_config` (default `TEST_SYSTEM_CONFIG`; `{}` for Ray's defaults)."""
    import ray
    import ray._private.utils as ray_utils
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("ray_cluster: this process is already connected to a Ray instance")
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    saved_env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", _LOOPBACK_NODE_ENV)}
    saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    saved_write_address = ray_utils.write_ray_address
    port = _free_port()
    os.environ[_LOOPBACK_NODE_ENV] = "0"
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Cluster writes the head's address to the machine-wide /tmp/ray file; keep it in ours.
    ray_utils.write_ray_address = lambda address, _temp=None: saved_write_address(
        address, temp_dir)
    cluster = Cluster(shutdown_at_exit=True)
    try:
        head_args: dict[str, Any] = {"include_dashboard": dashboard, "_system_config": dict(
            TEST_SYSTEM_CONFIG if system_config is None else system_config)}
        if dashboard:
            head_args.update(dashboard_host=LOOPBACK, dashboard_port=_free_port())
        cluster.add_node(num_cpus=cpus, temp_dir=temp_dir, gcs_server_port=port, **head_args)
        local = LocalCluster(cluster, temp_dir)
        for _ in range(nodes - 1):
            local.add(cpus=cpus)
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 log_to_driver=log_to_driver)
        os.environ["RAY_ADDRESS"] = cluster.address
        yield local
    finally:
        try:
            ray.shutdown()
            cluster.shutdown()
        finally:
            ray_utils.write_ray_address = saved_write_address
            ray_constants.ENABLE_RAY_CLUSTER = saved_cluster_flag
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------- epoch hooks


def record_node(epoch: int, rank: int, run_uri: str, metrics: Mapping[str, Any], *,
                path: str) -> None:
    """Append `{"epoch", "rank", "node_id", "pid", "loss", "run_uri"}` as one JSON line to
    `path` (a local file: every node of a simulated cluster shares this machine's disk)."""
    import ray

    row = {"epoch": epoch, "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
           "pid": os.getpid(), "loss": metrics.get("loss"), "run_uri": run_uri}
    with open(path, "a") as f:  # one short append per line: atomic enough between ranks
        f.write(json.dumps(row) + "\n")


def hold_on_node(epoch: int, rank: int, run_uri: str, metrics: Mapping[str, Any], *,
                 at_epoch: int, node_id: str, marker: str, timeout: float = 180) -> None:
    """On the rank that runs on node `node_id`, after training epoch `at_epoch` (before
    reporting it): write `marker` (JSON: epoch, rank, pid) and wait there, so the test can
    remove that node while the rank is known to be inside this epoch. Once only: a marker
    that exists already lets every later call through. Raises after `timeout` s (the node
    was never removed) so a broken test fails instead of hanging."""
    import ray

    if epoch != at_epoch or ray.get_runtime_context().get_node_id() != node_id:
        return
    path = Path(marker)
    if path.exists():
        return
    path.write_text(json.dumps({"epoch": epoch, "rank": rank, "pid": os.getpid()}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
    raise RuntimeError(f"hold_on_node: node {node_id} was not removed within {timeout} s")
