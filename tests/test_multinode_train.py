"""Ray Train across nodes (issue #23, 3b): a `--workers 2` run with one rank per node, its
storage on an S3 bucket, loses the node of one rank mid-run; the run resumes from the
bucket's checkpoint on a node added in its place and ends exactly as an uninterrupted run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from twonode import HOLD_ON_NODE, RECORD_NODE, ray_cluster

from fgray.engine.run import load_splits
from fgray.engine.spec import DataSpec, build_spec
from fgray.results import load
from fgray.storage import join, read_json
from fgray.train.recording import RANKS_DIR
from fgray.train.trainer import ray_pretrain

EPOCHS = 3
HOLD_AT = 2  # the worker node is removed while its rank is in epoch 2: epoch 1 is in the bucket
TINY = {"queue_size": "64", "mlp_hidden": "64", "dim": "32"}


def _spec(root, tmp_path):
    data = DataSpec(format="cub", root=str(root), val_fraction=0.25,
                    cache_dir=str(tmp_path / "cache"))
    return build_spec("moco", data, backbone="test_resnet",
                      train={"epochs": EPOCHS, "batch_size": 16, "image_size": 32,
                             "knn_k": 10, "visual_every": 0},
                      sets=dict(TINY))


def _wait(what: str, ready, timeout: float, failed=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        error = failed()
        if error is not None:
            raise AssertionError(f"while waiting for {what}: the run failed") from error
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def _rows(path: Path, run: str) -> list[dict]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return [row for row in map(json.loads, lines) if row["run_uri"].endswith(f"/{run}")]


def _ranks(storage: str, run: str) -> list[list[dict]]:
    out = [read_json(join(storage, run, RANKS_DIR, f"epoch-{e:04d}.json"))
           for e in range(1, EPOCHS + 1)]
    assert all(r is not None for r in out), f"{run}: an epoch's ranks/ file is missing"
    return out


@pytest.mark.slow
def test_two_node_run_resumes_from_the_bucket_on_a_new_node(s3, synth_root, tmp_path):
    """Head (1 CPU) + worker node (1 CPU), 2 workers of 1 CPU: one rank per node. The worker
    node dies while its rank is inside epoch 2 (epoch 1's checkpoint in the bucket); a new
    node joins, the group restarts on head + new node from epoch 1's checkpoint, records each
    epoch once, and its per-epoch losses equal those of an uninterrupted run on 2 nodes."""
    server, bucket = s3  # AWS_* variables set: every node started below inherits them
    spec = _spec(synth_root, tmp_path)
    load_splits(spec.data, spec.train.decoded_size, progress=False)  # one cache, built here
    storage = f"s3://{bucket}/runs"
    nodes_log, marker = tmp_path / "nodes.jsonl", tmp_path / "held"
    record = {"hook": RECORD_NODE, "kwargs": {"path": str(nodes_log)}}
    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = time.monotonic() - started

    with ray_cluster(nodes=2, cpus=1) as cluster:
        phase("cluster up")
        head, old = cluster.head.node_id, cluster.workers[0].node_id
        ray_pretrain(spec, name="full", storage=storage, workers=2, max_failures=0,
                     keep_best=1, echo=False, epoch_hooks=[record])
        phase("uninterrupted run")
        hold = {"hook": HOLD_ON_NODE, "kwargs": {"at_epoch": HOLD_AT, "node_id": old,
                                                 "marker": str(marker)}}
        outcome: dict = {}

        def run() -> None:
            try:
                ray_pretrain(spec, name="moved", storage=storage, workers=2, max_failures=2,
                             keep_best=1, echo=False, epoch_hooks=[record, hold])
            except BaseException as exc:  # noqa: BLE001 - raised again in the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        failed = lambda: outcome.get("error")  # noqa: E731
        _wait("the worker node's rank held in epoch 2", marker.is_file, 150, failed)
        # Epoch 1 reported by both ranks: its checkpoint registered and in the bucket.
        _wait("epoch 1 recorded in the bucket",
              lambda: f"runs/moved/{RANKS_DIR}/epoch-0001.json" in server.keys(
                  bucket, "runs/moved/"), 60, failed)
        phase("rank held in epoch 2")
        cluster.remove(cluster.workers[0])  # SIGKILL: the machine is lost
        new = cluster.add(cpus=1).node_id
        phase("node replaced")
        thread.join(timeout=240)
        phase("resumed run")
        assert not thread.is_alive(), "the moved run did not finish"
        if "error" in outcome:
            raise outcome["error"]
    phase("cluster down")
    elapsed = time.monotonic() - started
    print("\n" + ", ".join(f"{name} {t:.0f} s" for name, t in phases.items()))

    # Placement, from every rank's node id at every epoch (the hook's record).
    full_rows, moved_rows = _rows(nodes_log, "full"), _rows(nodes_log, "moved")
    assert len(full_rows) == 2 * EPOCHS
    for epoch in range(1, EPOCHS + 1):
        assert {r["node_id"] for r in full_rows if r["epoch"] == epoch} == {head, old}
    first_pids = {r["pid"] for r in moved_rows if r["epoch"] == 1}
    before = [r for r in moved_rows if r["pid"] in first_pids]
    after = [r for r in moved_rows if r["pid"] not in first_pids]
    held = json.loads(marker.read_text())
    assert held["epoch"] == HOLD_AT
    assert {(r["epoch"], r["node_id"]) for r in before} == {
        (1, head), (1, old), (2, head), (2, old)}
    assert sorted(r["epoch"] for r in after) == [2, 2, 3, 3]  # resumed at 2, not retrained 1
    for epoch in (2, 3):
        placed = {r["rank"]: r["node_id"] for r in after if r["epoch"] == epoch}
        assert sorted(placed.values()) == sorted([head, new]), placed
    assert (held["rank"], old) in {(r["rank"], r["node_id"]) for r in before}
    moved_rank = next(r["rank"] for r in after if r["node_id"] == new)

    # Every epoch recorded exactly once: epochs table and ranks/ in the bucket.
    epochs = load(storage, "epochs").to_pylist()
    for run in ("full", "moved"):
        assert sorted(e["epoch"] for e in epochs if e["trial_id"] == run) == [1, 2, 3], run
        keys = server.keys(bucket, f"runs/{run}/{RANKS_DIR}/")
        assert keys == [f"runs/{run}/{RANKS_DIR}/epoch-{e:04d}.json" for e in (1, 2, 3)]
    assert f"runs/moved/epoch-{EPOCHS:04d}/checkpoint.pt" in server.keys(bucket, "runs/moved/")

    # Loss by loss, rank by rank: the resumed run is the uninterrupted run, exactly.
    full, moved = _ranks(storage, "full"), _ranks(storage, "moved")
    name = {head: "head", old: "lost", new: "new"}
    placed = {("full", r["epoch"], r["rank"]): name[r["node_id"]] for r in full_rows}
    placed.update({("moved", r["epoch"], r["rank"]): name[r["node_id"]]
                   for r in before if r["epoch"] < HOLD_AT})
    placed.update({("moved", r["epoch"], r["rank"]): name[r["node_id"]] for r in after})
    print(f"2-node Ray Train (--workers 2, one rank per node), storage {storage}: the worker "
          f"node removed in epoch {HOLD_AT}, a new node added, resumed from epoch 1's "
          f"checkpoint\nnode ids: head {head}\n          lost {old}\n          new  {new}")
    print(f"{'epoch':>5}  {'term':<13} {'loss uninterrupted':>20} {'loss resumed':>20}"
          f"  {'rank0/rank1 on (uninterrupted | resumed)'}")
    for want, got in zip(full, moved):
        assert len(want) == len(got) == 2
        epoch = want[0]["epoch"]
        for rank in range(2):
            w, g = want[rank], got[rank]
            assert g["epoch"] == epoch
            terms = sorted(k for k in w if k.startswith("loss"))
            assert terms and terms == sorted(k for k in g if k.startswith("loss"))
            for term in terms:  # all-reduced: the same on both ranks
                assert g[term] == w[term] == want[0][term], (epoch, rank, term, w, g)
            assert g["param_checksum"] == w["param_checksum"], (epoch, rank)
            if "node_id" in g:  # each rank's report names its node: the same placement
                assert name[g["node_id"]] == placed[("moved", epoch, rank)]
        where = " | ".join("/".join(placed[(run, epoch, r)] for r in range(2))
                           for run in ("full", "moved"))
        for term in terms:
            print(f"{epoch:>5}  {term:<13} {want[0][term]:>20.17g} {got[0][term]:>20.17g}"
                  f"  {where}")
    print(f"param checksums equal on both ranks at every epoch; after the restart rank "
          f"{moved_rank} ran on the new node")
    assert elapsed < 240
