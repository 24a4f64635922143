"""A real S3 API for the tests: moto's server (`moto_server`) on 127.0.0.1 on a free port.

fgray reaches it exactly as it reaches AWS: through the standard variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), which
`S3Server.env` holds and which a test puts in `os.environ` (and so in every process it starts,
Ray nodes included). Buckets are made with boto3, as an administrator would.

With `auth=True` the server checks credentials and IAM policies (moto's
`INITIAL_NO_AUTH_ACTION_COUNT`): the first few requests, the set-up, go unchecked; then only
the keys `S3Server.user` made are accepted, each with the rights its policy gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ADMIN = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_server() -> str:
    found = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(found).exists():
        raise RuntimeError("moto_server not found: install the test extra (moto[server])")
    return found


class S3Server:
    """One moto server process; `stop()` ends it (by its pid, nothing else)."""

    def __init__(self, log_dir: Path, *, auth: bool = False, setup_actions: int = 0) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(setup_actions)
        self.log_path = log_dir / f"moto-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on {self.endpoint}")
            time.sleep(0.1)

    def env(self, **keys: str) -> dict[str, str]:
        """The variables a client (and every Ray node) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true", **ADMIN, **keys}

    def client(self, service: str = "s3", **keys: str):
        import boto3

        creds = {**ADMIN, **keys}
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])

    def bucket(self, name: str | None = None) -> str:
        name = name or f"fgray-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "", *, markers: bool = False,
             **creds: str) -> list[str]:
        """Every key under `prefix` of `bucket`, sorted; without the empty `folder/` markers
        pyarrow leaves for folders (it keeps a folder's parent when deleting it) unless
        `markers`."""
        pages = self.client(**creds).get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", [])
                      if markers or not o["Key"].endswith("/"))

    def gets(self, bucket: str, key: str) -> int:
        """How many GET requests for `bucket/key` the server has answered (from its log)."""
        self._log.flush()
        needle = f"GET /{bucket}/{key} HTTP".encode()
        return self.log_path.read_bytes().count(needle)

    def user(self, name: str, actions: list[str], bucket: str) -> dict[str, str]:
        """An IAM user allowed `actions` on `bucket` only; its keys as AWS_* variables."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": actions,
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy",
                            PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def stop(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()
