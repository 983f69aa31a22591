"""What a trial asks Ray for: CPUs, a GPU share sized from its backbone, batch and image size, and the check that
some node can ever run it."""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError
from cxr_search.space import SearchSpec
from cxr_search.tuning.cluster import may_autoscale

# GPU memory one training trial's process holds, GiB (benchmarks/RESULTS.md, "GPU memory per trial": training
# defaults, 128 px, the larger of batch 32 and 64, CUDA context included, rounded up to 0.5). Beyond the context, activations grow with the batch and the pixels: `gpu_peak_gib` scales that
# part by batch / 64 (from 64 up) and (size / 128)^2, which over-counts weights and optimizer state (safe side).
# Bookkeeping only: Ray uses the fraction to decide how many trials share a GPU, it does not enforce it.
GPU_PEAK_GIB: dict[str, float] = {
    "cnn3": 2.0, "alexnet": 1.5, "vgg16": 3.0, "vgg19": 3.5, "resnet34": 2.0,
    "resnet50": 2.5, "inception_v3": 2.5, "xception": 3.5, "densenet121": 2.5,
}


GPU_CONTEXT_GIB = 0.5  # CUDA context and cuDNN/cuBLAS handles: held before the first tensor, whatever the model


TRIAL_GPU_SHARE_MAX = 4  # never pack more than 4 trials on a GPU: four gained little over one (DESIGN.md)


DRIVER_CPUS = 0.1  # a data-parallel trial's own process waits on its Ray Train run: a slice of a CPU


def gpu_peak_gib(backbone: str, batch_size: int = 32, image_size: int = 128) -> float:
    """Estimated peak GPU memory of one trial, GiB (GPU_PEAK_GIB scaled to its batch and image size)."""
    measured = GPU_PEAK_GIB.get(backbone, 8.0)
    grow = max(1.0, batch_size / 64) * (image_size / 128) ** 2
    return GPU_CONTEXT_GIB + (measured - GPU_CONTEXT_GIB) * grow


def gpu_fraction(backbone: str, gpu_memory_gib: float, batch_size: int = 32, image_size: int = 128) -> float:
    """GPU fraction for one trial: its peak memory share, at least 1/TRIAL_GPU_SHARE_MAX, at most 1."""
    share = gpu_peak_gib(backbone, batch_size, image_size) * 1.5 / max(gpu_memory_gib, 1.0)  # 1.5: allocator slack
    return round(min(1.0, max(1.0 / TRIAL_GPU_SHARE_MAX, share)), 3)


class TrialResources:
    """Per-trial resource request (a picklable callable for `tune.with_resources`).

    With `workers` > 1 the trial's own process only drives a Ray Train run (`DRIVER_CPUS`); Train reserves
    `cpus`/`gpus` for each of its workers itself.
    """

    def __init__(self, cpus: float, gpus: str | float, gpu_memory_gib: float = 0.0, workers: int = 1,
                 image_size: int = 128):
        self.cpus, self.gpus, self.gpu_memory_gib, self.workers = cpus, gpus, gpu_memory_gib, workers
        self.image_size = image_size

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        if self.workers > 1:
            return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}])
        return tune.PlacementGroupFactory([self.worker_bundle(config.get("backbone", TrialConfig.backbone),
                                                              config.get("batch_size", TrialConfig.batch_size))])

    def worker_bundle(self, backbone: str, batch_size: int = TrialConfig.batch_size) -> dict[str, float]:
        """What one training process of a trial holds: CPUs, and GPUs if any."""
        bundle = {"CPU": self.cpus}
        gpus = self.gpus_for(backbone, batch_size)
        if gpus > 0:
            bundle["GPU"] = gpus
        return bundle

    def gpus_for(self, backbone: str, batch_size: int = TrialConfig.batch_size) -> float:
        if self.gpus == "auto":
            return (gpu_fraction(backbone, self.gpu_memory_gib, batch_size, self.image_size)
                    if self.gpu_memory_gib > 0 else 0.0)
        return float(self.gpus)

    @property
    def uses_gpu(self) -> bool:
        return self.gpus_for(TrialConfig.backbone) > 0


def trial_resources(spec: SearchSpec) -> TrialResources:
    return TrialResources(spec.cpus_per_trial, spec.gpus_per_trial, cluster_gpu_memory_gib(), spec.workers_per_trial,
                          int(spec.data.get("size", 128)))


def check_trial_resources(spec: SearchSpec, *, address: str | None) -> list[str]:
    """Refuse, before any trial or file, a plan whose trials this Ray can never run; returns notes to print.

    A trial is one placement-group bundle, so it must fit on one node: a request larger than every node (more
    CPUs than the machine has, a GPU where there is none) would leave every trial PENDING forever. On a cluster
    that may autoscale (`ray up` with workers to add) such a request is allowed and only noted: a new node may
    fit it, and `PendingWatch` says why trials wait.

    Args:
        spec: the effective space (per-trial `resources`; `gpu: auto` resolves per backbone).
        address: the cluster address (None: the local Ray this process started, which never grows).

    Raises:
        CxrError: one line naming the resource, what the largest node has and the fix.
    """
    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    largest = {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}
    resources = trial_resources(spec)
    where = "this machine's Ray" if address is None else f"the cluster at {address}"
    notes = []
    for backbone, batch_size in sorted(spec.combinations("backbone", "batch_size")):
        want = {"CPU": float(spec.cpus_per_trial), "GPU": resources.gpus_for(backbone, batch_size)}
        if any(all(n.get(k, 0.0) >= v for k, v in want.items()) for n in nodes):
            continue
        if address is not None and may_autoscale():
            notes.append(f"no node of {where} fits a {backbone} trial ({fmt_resources(want)}) yet: its trials wait for the "
                         "autoscaler to add one (`ray status` on the head shows it).")
            continue
        if want["GPU"] > 0 and largest["GPU"] == 0:
            raise CxrError(f"each {backbone} trial asks for {want['GPU']:g} GPU (--gpus-per-trial or resources.gpu "
                           f"in {spec.source}) but {where} has no GPU, so no trial could ever start; use "
                           "--gpus-per-trial 0, or gpu: auto (a GPU share only where there is one).")
        short = [k for k in ("CPU", "GPU") if want[k] > largest[k]]
        if not short:  # each fits somewhere, not both on one node
            most = max(n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) >= want["GPU"])
            raise CxrError(f"each {backbone} trial asks for {want['CPU']:g} CPUs and {want['GPU']:g} GPU on one node "
                           f"(resources in {spec.source}) but the nodes of {where} with that GPU share have at most "
                           f"{most:g} CPUs, so no trial could ever start; set resources.cpu to {most:g} or less.")
        key = short[0]
        option = "resources.cpu" if key == "CPU" else "--gpus-per-trial or resources.gpu"
        raise CxrError(f"each {backbone} trial asks for {want[key]:g} {key}s ({option} in {spec.source}) but the "
                       f"largest node of {where} has {largest[key]:g}, so no trial could ever start; ask for "
                       f"{largest[key]:g} or less" + ("." if address else ", or run on a cluster with --address."))
    slots = sum(int(n.get("CPU", 0.0) // max(spec.cpus_per_trial, 1e-9)) for n in nodes)
    if spec.scheduler.kind == "asha" and 0 < min(slots, spec.max_concurrent_trials or slots) < 2 and not notes:
        notes.append(f"one trial at a time ({largest['CPU']:g} CPUs, resources.cpu {spec.cpus_per_trial:g} per "
                     "trial): ASHA can only compare a trial with finished ones; lower resources.cpu to run trials "
                     "side by side.")
    return notes


def fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v > 0)


def cluster_gpu_memory_gib() -> float:
    """Memory of one GPU of this machine, GiB (0 without a GPU); used for `gpu: auto` bookkeeping."""
    if not ray.is_initialized() or ray.cluster_resources().get("GPU", 0) <= 0:
        return 0.0
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 80.0  # a cluster whose driver has no GPU: assume an 80 GiB card
