"""Connecting to Ray: a cluster address (`--address` or RAY_ADDRESS) or a local Ray started
for the duration of a command.

Under `ray job submit` the job's environment carries RAY_ADDRESS, so the same script joins
the cluster it was submitted to; run directly, it starts local Ray and shuts it down at exit.
"""

from __future__ import annotations

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


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                temp_dir: str | None = None, log_to_driver: bool = True) -> Iterator[None]:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray; disconnect on exit.

    Reuses a connection already open in this process and then leaves it open.
    `log_to_driver=False` keeps the workers' output in Ray's session logs only.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address:
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
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    # Ray's own helpers inside workers (Train's placement-group cleaner uses the state API)
    # find "the" cluster from RAY_ADDRESS, or by scanning for local instances, which fails
    # when another Ray runs on the same machine. So the local head gets a known GCS port and
    # every process it starts inherits RAY_ADDRESS pointing at it.
    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{_node_ip()}:{port}"
    try:
        ray.init(address="local", num_cpus=cpus, _temp_dir=temp, **kwargs)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


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
