"""Storage on a real S3 API (moto's server, tests/s3server.py): every artifact of a run goes to
the bucket and is read back from there; a URI with pyarrow's query options works like one
reached through AWS_ENDPOINT_URL; a bucket that cannot be written is one line, exit 2, found
before anything starts, and nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import pretrain_argv

from fgray import storage
from fgray.cli import main
from fgray.errors import UserError
from fgray.storage import (
    Mirror,
    absolute,
    as_location,
    check_writable,
    display,
    join,
    local_copy,
    read_json,
    resolve,
    write_text,
)


def _pretrain(root, tmp, storage, *, epochs: int = 1, workers: int = 0) -> list[str]:
    return pretrain_argv("moco", root, tmp, "queue_size=64", "mlp_hidden=64", "dim=32",
                         "knn_k=10", name="w0", storage=storage, epochs=epochs,
                         workers=workers, val_fraction=0.25)


def test_locations_keep_a_uris_query_at_its_end():
    uri = "s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join(uri, "runs", "w0") == \
        "s3://bucket/x/runs/w0?endpoint_override=127.0.0.1:9000&scheme=http"
    assert absolute("s3://bucket/x/?scheme=http") == "s3://bucket/x?scheme=http"
    assert as_location(uri, "bucket/x/plots/a.png") == \
        "s3://bucket/x/plots/a.png?endpoint_override=127.0.0.1:9000&scheme=http"
    assert display(join(uri, "a")) == "s3://bucket/x/a"
    assert join("/runs/", "a", "b") == "/runs/a/b"
    fs, path = resolve(uri)
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/x"
    assert resolve(join(uri, "y"))[0] is fs  # one filesystem per store and process
    with pytest.raises(UserError, match="cannot open this storage location"):
        resolve("nosuchscheme://bucket/x")


def test_pretrain_in_process_writes_every_artifact_to_the_bucket_and_resumes_from_it(
        s3, synth_root, tmp_path, monkeypatch, capsys):
    server, bucket = s3
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    storage = f"s3://{bucket}/runs"
    assert main(_pretrain(synth_root, tmp_path, storage)) == 0
    out = capsys.readouterr().out
    assert f"run folder: s3://{bucket}/runs/w0" in out
    keys = server.keys(bucket, "runs/w0/")
    for name in ("config.json", "splits.json", "metrics.jsonl",
                 "checkpoints/epoch-0001/checkpoint.pt", "checkpoints/best/checkpoint.pt"):
        assert f"runs/w0/{name}" in keys, keys
    assert list(work.iterdir()) == []  # nothing local: no ./s3:/bucket/... folder
    # The results tables and TensorBoard are in the same bucket, one trial row.
    assert any(k.startswith("runs/tables/trials/") for k in server.keys(bucket))
    # Two more epochs continue the run from the bucket's checkpoint: one metrics line each.
    assert main(_pretrain(synth_root, tmp_path, storage, epochs=3)) == 0
    client = server.client()
    lines = client.get_object(Bucket=bucket, Key="runs/w0/metrics.jsonl")["Body"].read()
    epochs = [json.loads(line)["epoch"] for line in lines.decode().splitlines()]
    assert epochs == [1, 2, 3]
    keys = server.keys(bucket, "runs/w0/checkpoints/")
    kept = sorted({k.split("/")[3] for k in keys})
    assert "epoch-0003" in kept and "epoch-0001" not in kept  # pruned in the bucket too
    # The checkpoint is read back from the bucket by `fgray eval`.
    assert main(["eval", join(storage, "w0", "checkpoints", "best"), "--dataset", "cub",
                 "--data-root", str(synth_root), "--protocols", "knn",
                 "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.25"]) == 0
    assert "runs/w0/checkpoints/best/eval-test.json" in server.keys(bucket, "runs/w0/")


def test_a_uri_with_pyarrows_query_options_reaches_the_same_store(s3, synth_root, tmp_path,
                                                                   monkeypatch):
    server, bucket = s3
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the URI names the endpoint now
    storage = (f"s3://{bucket}/q?endpoint_override=127.0.0.1:{server.port}&scheme=http"
               "&region=us-east-1")
    monkeypatch.chdir(tmp_path)
    assert main(_pretrain(synth_root, tmp_path, storage)) == 0
    keys = server.keys(bucket, "q/")
    assert "q/w0/checkpoints/epoch-0001/checkpoint.pt" in keys, keys
    assert not (tmp_path / "s3:").exists()


def test_mirror_uploads_changes_and_deletes_what_the_folder_lost(s3, tmp_path):
    server, bucket = s3
    local = tmp_path / "run"
    (local / "a").mkdir(parents=True)
    (local / "a" / "x.bin").write_bytes(b"1")
    (local / "metrics.jsonl").write_text("{}\n")
    mirror = Mirror(local, f"s3://{bucket}/m")
    mirror.sync(last="metrics.jsonl")
    assert server.keys(bucket, "m/") == ["m/a/x.bin", "m/metrics.jsonl"]
    shutil.rmtree(local / "a")  # a pruned checkpoint folder: gone whole, no marker left
    (local / "b.txt").write_text("b")
    mirror.sync()
    assert server.keys(bucket, "m/") == ["m/b.txt", "m/metrics.jsonl"]
    again = tmp_path / "again"
    assert Mirror(again, f"s3://{bucket}/m").pull() == 2
    assert (again / "b.txt").read_text() == "b"
    with local_copy(f"s3://{bucket}/m") as folder:
        assert sorted(p.name for p in folder.iterdir()) == ["b.txt", "metrics.jsonl"]
    assert not folder.exists()


def test_a_large_object_comes_down_in_a_few_requests(s3, tmp_path):
    """pyarrow's S3 stream sends one ranged GET per read: read in 64 KiB pieces, a 20 MiB
    checkpoint was 320 requests (a round trip each on a real bucket)."""
    server, bucket = s3
    data = os.urandom(20 * 2**20)
    fs, path = resolve(f"s3://{bucket}/run/checkpoint.pt")
    with fs.open_output_stream(path) as out:
        out.write(data)
    with local_copy(f"s3://{bucket}/run/checkpoint.pt") as copy:
        assert copy.read_bytes() == data
    assert server.gets(bucket, "run/checkpoint.pt") <= 2
    assert Mirror(tmp_path / "pulled", f"s3://{bucket}/run").pull() == 1
    assert (tmp_path / "pulled" / "checkpoint.pt").read_bytes() == data
    assert server.gets(bucket, "run/checkpoint.pt") <= 4


def test_a_missing_bucket_is_one_line_before_anything_starts(s3, synth_root, tmp_path,
                                                             monkeypatch, capsys):
    server, bucket = s3
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    for workers in (0, 1):
        code = main(_pretrain(synth_root, tmp_path, "s3://no-such-bucket/runs",
                              workers=workers))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and "--storage s3://no-such-bucket/runs: cannot write there" \
            in err[0] and "bucket" in err[0], err
    assert set(os.listdir(tmp_path)) == before  # nothing started, nothing written
    assert not (tmp_path / "cache").exists()


def test_a_study_refuses_a_missing_bucket_before_ray_starts(s3, tmp_path, monkeypatch, capsys):
    import ray

    from fgray.tune.cli import study_main

    monkeypatch.chdir(tmp_path)
    code = study_main(["--synthetic", "--preset", "smoke", "--storage",
                       "s3://no-such-bucket/studies"], prog="cub_sweep.py",
                      description="t", dataset="cub")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write there" in err[0], err
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def s3_auth(tmp_path_factory):
    """An S3 server that checks credentials and IAM policies, a bucket, and two users: one
    allowed to read and write, one to read only."""
    from s3server import S3Server

    # Set-up actions before checks begin: the bucket, then per user create_user,
    # put_user_policy and create_access_key.
    server = S3Server(tmp_path_factory.mktemp("moto-auth"), auth=True, setup_actions=7)
    try:
        bucket = server.bucket()
        writer = server.user("writer", ["s3:*"], bucket)
        reader = server.user("reader", ["s3:GetObject", "s3:ListBucket"], bucket)
        yield server, bucket, writer, reader
    finally:
        server.stop()


def test_credentials_and_permissions_are_checked_before_anything_is_written(s3_auth,
                                                                             monkeypatch):
    server, bucket, writer, reader = s3_auth
    location = f"s3://{bucket}/study"
    for key, value in server.env(**writer).items():
        monkeypatch.setenv(key, value)
    check_writable(location, "--storage")  # allowed: passes, and leaves nothing
    write_text(join(location, "ok.txt"), "written by the writer")
    for keys, reason in ((reader, "read-only policy"),
                         ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN0000000000",
                           "AWS_SECRET_ACCESS_KEY": "wrong"}, "unknown key")):
        for key, value in server.env(**keys).items():
            monkeypatch.setenv(key, value)
        storage.location._filesystem.cache_clear()  # new credentials, new client
        with pytest.raises(UserError, match=r"--storage s3://.*/study: cannot write there "
                                            r"\(.*\); expected an existing bucket and "
                                            r"credentials allowed to write") as err:
            check_writable(location, "--storage")
        assert "\n" not in str(err.value), reason
    storage.location._filesystem.cache_clear()
    for key, value in server.env(**writer).items():
        monkeypatch.setenv(key, value)
    assert read_json(join(location, "missing.json")) is None
    # Only the writer's file is there: the probes were deleted, the refused ones never made.
    assert server.keys(bucket, **writer) == ["study/ok.txt"]
