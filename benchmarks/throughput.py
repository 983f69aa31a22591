"""Training throughput (img/s) of the engine's data path versus a direct port of the study's input pipeline.

Per backbone, on the same images and the same architecture, measured in one run:
  direct  the study ported as is: a torch DataLoader whose workers augment one PIL image at a time (random
          rotation/shear/zoom as a PIL affine), float32 NCHW batches of 32 copied to the device, fp32 model.
  engine  cxr_search.training's path: the uint8 images resident on the device, index-slice batches, one batched
          affine warp on the device, channels_last; on a GPU also bf16 autocast and cudnn.benchmark.
  step    the engine's train step alone on one fixed, already prepared batch: the model's ceiling.
Warm-up steps (worker start, cuDNN autotuning, allocator growth) are excluded; CUDA is synchronised around
the timed region. Prints a table and writes JSON.

    python benchmarks/throughput.py --backbones cnn3,resnet34 --size 128
    python benchmarks/throughput.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr_search.config import TrialConfig
from cxr_search.data.prepare import SplitArrays
from cxr_search.training.compiling import TrainingModel, compile_mode
from cxr_search.training.loop import train_step
from cxr_search.training.optim import create_optimizer
from cxr_search.training.runtime import (
    PIXEL_MEAN,
    PIXEL_STD,
    DeviceSplit,
    Runtime,
    model_from_config,
    model_input,
    resolve_device,
)

STUDY_BATCH = 32  # the study's batch size; the direct port always uses it


class StudyDataset(torch.utils.data.Dataset):
    """The study's per-image pipeline: PIL affine augmentation, then a float32 [C, H, W] tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, cfg: TrialConfig):
        self.images, self.labels, self.cfg = images, labels, cfg

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i])
        w, h = img.size
        # Keras' rotation @ shear @ zoom, output->input, about the centre (PIL's AFFINE convention).
        # python `random` is reseeded in every DataLoader worker, so workers draw different transforms.
        theta = math.radians(random.uniform(-self.cfg.rotation_deg, self.cfg.rotation_deg))
        phi = math.radians(random.uniform(-self.cfg.shear_deg, self.cfg.shear_deg))
        zx, zy = (random.uniform(1 - self.cfg.zoom, 1 + self.cfg.zoom) for _ in range(2))
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        shear = np.array([[1, -math.sin(phi)], [0, math.cos(phi)]])
        m = rot @ shear @ np.diag([zx, zy])
        centre = np.array([w / 2, h / 2])
        offset = centre - m @ centre
        img = img.transform(
            (w, h),
            Image.Transform.AFFINE,
            (m[0, 0], m[0, 1], offset[0], m[1, 0], m[1, 1], offset[1]),
            resample=Image.Resampling.BILINEAR,
        )
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = ((x - PIXEL_MEAN) / PIXEL_STD)[None].expand(self.cfg.in_chans, -1, -1).contiguous()
        return x, int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device, warmup: int, steps: int, batch: int) -> float:
    """img/s of `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _fresh_model(cfg: TrialConfig, device: torch.device, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bench_direct(cfg, images, labels, device, workers, warmup, steps) -> float:
    """The study's pipeline: DataLoader + PIL per image, fp32, NCHW, batch 32."""
    model = _fresh_model(cfg, device, channels_last=False).train()
    optimizer = create_optimizer(model, cfg)
    loader = torch.utils.data.DataLoader(
        StudyDataset(images, labels, cfg),
        batch_size=STUDY_BATCH,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    batches = iter(())

    def step() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:  # a new epoch of the DataLoader, as in training
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, device, warmup, steps, STUDY_BATCH)  # the workers end with the loader on return


def bench_engine(cfg, images, labels, device, warmup, steps, *, step_only: bool, compile_model: bool = False) -> float:
    """The engine's path (or, with step_only, its train step on one prepared batch).

    compile_model trains as the engine does under `compile: always` (`training.compiling.TrainingModel`: CUDA graphs on a GPU);
    its compile time falls in the warm-up. A model that failed to compile raises (the figure would be eager's).
    """
    model = _fresh_model(cfg, device, channels_last=True).train()
    mode = compile_mode(cfg.replace(compile="always"), device, 0) if compile_model else None
    trains = TrainingModel(model, mode)
    optimizer = create_optimizer(model, cfg)
    rt = Runtime.for_model(model, cfg, device)
    split = DeviceSplit(SplitArrays(images, labels, labels.astype(str), labels.astype(str)), device)
    fixed = model_input(split.images[: cfg.batch_size], rt, cfg, augment=True)

    def step() -> None:
        idx = torch.randint(0, len(split), (cfg.batch_size,), device=device)
        x = fixed if step_only else model_input(split.images[idx], rt, cfg, augment=True)
        y = split.labels[: cfg.batch_size] if step_only else split.labels[idx]
        trains.step(train_step, optimizer, x, y, rt, cfg)

    rate = _timed(step, device, warmup, steps, cfg.batch_size)
    if compile_model and trains.compiled is None:
        raise RuntimeError(f"{cfg.backbone} did not compile (the log says why)")
    return rate


def random_images(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 [N, size, size] images and balanced labels: throughput does not depend on pixel values."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, size, size), dtype=np.uint8)
    return images, (np.arange(n_images) % 3).astype(np.int64)


def measure_backbone(
    backbone: str,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    *,
    engine_batches: tuple[int, ...] = (STUDY_BATCH,),
    in_chans: int = 3,
    workers: int = 1,
    warmup: int = 5,
    steps: int = 30,
    step_only: bool = False,
) -> dict:
    """img/s of the direct port (batch 32) and of the engine at each batch size, on the same images.

    Returns:
        {"backbone", "direct_img_per_s", "engine_img_per_s": {batch: img/s}, and with step_only
        "train_step_img_per_s": {batch: img/s}}.
    """
    common = dict(images=images, labels=labels, device=device, warmup=warmup, steps=steps)
    cfg = TrialConfig(backbone=backbone, in_chans=in_chans, optimizer="sgd", device=str(device))
    row = {"backbone": backbone,
           "direct_img_per_s": bench_direct(cfg.replace(batch_size=STUDY_BATCH), workers=workers, **common),
           "engine_img_per_s": {}}
    for batch in engine_batches:
        row["engine_img_per_s"][batch] = bench_engine(cfg.replace(batch_size=batch), step_only=False, **common)
        if step_only:
            step = bench_engine(cfg.replace(batch_size=batch), step_only=True, **common)
            row.setdefault("train_step_img_per_s", {})[batch] = step
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", default="cnn3,resnet34", help="comma-separated backbone names")
    p.add_argument("--size", type=int, default=128, help="image side, pixels (the study used 128)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    p.add_argument("--batch-size", type=int, default=STUDY_BATCH, help="engine batch size (direct port: 32)")
    p.add_argument(
        "--in-chans", type=int, default=3, choices=(1, 3), help="3 = gray replicated, as the study"
    )
    p.add_argument("--n-images", type=int, default=1024, help="images in the resident set / the dataset")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (direct)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default: print only)")
    p.add_argument("--smoke", action="store_true", help="cnn3 at 32 px, a few steps: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.backbones, args.size, args.steps, args.warmup, args.n_images = "cnn3", 32, 3, 1, 128
        args.workers = min(args.workers, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training.loop.fit does on a GPU (the direct port benefits too)

    images, labels = random_images(args.n_images, args.size)
    rows = []
    for backbone in args.backbones.split(","):
        m = measure_backbone(
            backbone.strip(), images, labels, device, engine_batches=(args.batch_size,), in_chans=args.in_chans,
            workers=args.workers, warmup=args.warmup, steps=args.steps, step_only=True,
        )
        direct = m["direct_img_per_s"]
        eng, step = m["engine_img_per_s"][args.batch_size], m["train_step_img_per_s"][args.batch_size]
        rows.append(
            {
                "backbone": m["backbone"],
                "direct_img_per_s": direct,
                "engine_img_per_s": eng,
                "train_step_img_per_s": step,
                "ratio": eng / direct,
            }
        )
        print(
            f"{m['backbone']:>12}  direct {direct:9.1f}  engine {eng:9.1f}  step-only {step:9.1f}  "
            f"ratio {eng / direct:5.2f}",
            flush=True,
        )

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    result = {
        "device": str(device),
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "size": args.size,
        "in_chans": args.in_chans,
        "engine_batch": args.batch_size,
        "direct_batch": STUDY_BATCH,
        "workers": args.workers,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": rows,
    }
    print()
    print(f"| backbone | direct port | engine | ratio | train step only |  ({device_name}, {args.size} px)")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['direct_img_per_s']:,.0f} | {r['engine_img_per_s']:,.0f} | "
            f"{r['ratio']:.2f} | {r['train_step_img_per_s']:,.0f} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
