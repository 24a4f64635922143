"""What a trial asks Ray for: `WorkerResources` (Ray Train ranks and each one's CPUs and
GPUs, or with `--workers 0` the trial's own process) and the Train configs built from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig

from fgray.errors import UserError

DRIVER_MEMORY = 256 * 2**20  # what a Train-driving trial reserves: it needs no CPU


@dataclass(frozen=True)
class WorkerResources:
    """What one trial asks for: `workers` Ray Train ranks, each with these CPUs and GPUs, or
    with `workers=0` the trial's own process with one worker's share (no worker group)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: expected 0 (the engine loop in the "
                            "trial's own process) or more Ray Train workers")
        if self.cpus_per_worker <= 0:
            raise UserError(f"--cpus-per-worker {self.cpus_per_worker}: expected more than 0")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker}: expected 0 or more")
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker} with {self.workers} "
                            "workers: NCCL needs a whole GPU per rank; share GPUs between "
                            "single-worker trials instead")

    @property
    def in_trial(self) -> bool:
        """`--workers 0`: the loop runs in the Tune trial itself, no Ray Train."""
        return self.workers == 0

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def torch_threads(self) -> int:
        """The torch threads a worker trains with: one per whole CPU it holds, at least one
        (as Ray sets OMP_NUM_THREADS for its workers)."""
        return max(1, int(self.cpus_per_worker))

    @property
    def cpus(self) -> float:
        return max(self.workers, 1) * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return max(self.workers, 1) * self.gpus_per_worker

    def trial_resources(self) -> dict[str, float]:
        """What the Tune trial itself reserves: one worker's share when it runs the loop
        (`--workers 0`); otherwise nothing but a little memory, as it only drives its
        Train run, whose workers hold the CPUs and GPUs."""
        if self.in_trial:
            out = {"cpu": self.cpus_per_worker}
            if self.use_gpu:
                out["gpu"] = self.gpus_per_worker
            return out
        return {"cpu": 0, "memory": DRIVER_MEMORY}

    def device(self):
        """The trial's device with `--workers 0`: Ray sets CUDA_VISIBLE_DEVICES to the
        trial's GPU share, which is then `cuda:0`."""
        use_cuda = self.use_gpu and torch.cuda.is_available()
        return torch.device("cuda", 0) if use_cuda else torch.device("cpu")

    def scaling_config(self) -> ScalingConfig:
        per_worker = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            per_worker["GPU"] = self.gpus_per_worker
        return ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu,
                             resources_per_worker=per_worker)

    def torch_config(self) -> TorchConfig:
        return TorchConfig(backend="nccl" if self.use_gpu else "gloo")


def resolve_resources(workers: int, *, cpus_per_worker: float | None = None,
                      gpus_per_worker: float | None = None,
                      cluster_gpus: float | None = None) -> WorkerResources:
    """Fill unset per-worker resources: one CPU each, and one GPU each when the cluster has
    GPUs (`cluster_gpus`, read from the connected cluster when not given)."""
    if gpus_per_worker is None:
        if cluster_gpus is None:
            from fgray.train.cluster import ClusterResources

            cluster_gpus = ClusterResources.current().gpus
        gpus_per_worker = 1.0 if cluster_gpus >= 1 else 0.0
    return WorkerResources(workers=workers, cpus_per_worker=cpus_per_worker or 1.0,
                           gpus_per_worker=gpus_per_worker)



