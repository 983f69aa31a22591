"""Bytes a trial writes for its checkpoints, before (one full checkpoint per epoch) and after (lean model folders).

Not a test. Trains a backbone for a few epochs into a model folder (training.loop.fit(checkpoint_dir=...)) and counts
every byte the run writes (best-weights files, resume states, history lines); compares with what the previous
format wrote every epoch: one file with the model, the optimizer state and a float32 copy of the best weights
(two kept per trial by Ray).

    python benchmarks/checkpoint_io.py                       # inception_v3 at 128 px, 3 epochs
    python benchmarks/checkpoint_io.py --backbone cnn3 --size 32 --epochs 2    # seconds
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="inception_v3")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-images", type=int, default=96, help="training images (the size of an epoch does not "
                                                                "change a checkpoint's size)")
    args = p.parse_args()

    import numpy as np
    import torch

    from cxr_search.config import TrialConfig
    from cxr_search.data.prepare import PreparedData, SplitArrays
    from cxr_search.io import storage
    from cxr_search.training.loop import fit
    from cxr_search.training.optim import create_optimizer
    from cxr_search.training.runtime import model_from_config

    rng = np.random.default_rng(0)

    def split(n: int) -> SplitArrays:
        labels = np.arange(n) % 3
        return SplitArrays(rng.integers(0, 255, (n, args.size, args.size), dtype=np.uint8), labels.astype(np.int64),
                           np.array([f"p{i}" for i in range(n)]), np.array([f"{i}.png" for i in range(n)]))

    data = PreparedData(split(args.n_images), split(32), split(32), image_size=args.size)
    cfg = TrialConfig(backbone=args.backbone, max_epochs=args.epochs, patience=args.epochs, device="cpu",
                      optimizer="rmsprop", batch_size=32)
    written: list[tuple[str, int]] = []
    real_atomic, real_append = storage.atomic_write, storage.append_record

    def counting_atomic(path, write):
        out = real_atomic(path, write)
        written.append((Path(path).name, Path(path).stat().st_size))
        return out

    def counting_append(path, record):
        real_append(path, record)
        written.append((Path(path).name, len(json.dumps(record, separators=(",", ":"), default=str)) + 1))

    storage.atomic_write, storage.append_record = counting_atomic, counting_append
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(cfg, data, checkpoint_dir=Path(tmp) / "trial")
        seconds = time.perf_counter() - t0
        kept = sum(f.stat().st_size for f in (Path(tmp) / "trial").iterdir() if f.is_file())
    storage.atomic_write, storage.append_record = real_atomic, real_append

    # The previous format, every epoch: model + optimizer + a float32 copy of the best weights (+ history).
    model = model_from_config(cfg.replace(pretrained="none"))
    optimizer = create_optimizer(model, cfg)
    model(torch.zeros(2, 1, max(args.size, model.min_input_size), max(args.size, model.min_input_size))).sum().backward()
    optimizer.step()  # materialise the optimizer's state
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "early_stopping": {"best_weights": {k: v.clone() for k, v in model.state_dict().items()}}}, buffer)
    before = buffer.tell()
    after = sum(n for _, n in written)
    by_kind: dict[str, int] = {}
    for name, n in written:
        kind = "best weights" if name.startswith("best-") else name
        by_kind[kind] = by_kind.get(kind, 0) + n
    result = {"backbone": args.backbone, "size": args.size, "epochs": args.epochs, "seconds": round(seconds, 1),
              "before_bytes_per_epoch": before, "before_bytes_kept_per_trial": 2 * before,
              "after_bytes_per_epoch": round(after / args.epochs), "after_bytes_kept_per_trial": kept,
              "after_by_file": by_kind}
    print(json.dumps(result, indent=2))
    mb = 2**20
    print("\n| backbone | px | written per epoch, before | after | kept per finished trial, before | after |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.backbone} | {args.size} | {before / mb:.0f} MB | {after / args.epochs / mb:.0f} MB | "
          f"{2 * before / mb:.0f} MB | {kept / mb:.0f} MB |")


if __name__ == "__main__":
    main()
