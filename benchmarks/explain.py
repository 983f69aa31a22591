"""Time the explanation and prediction paths against the issue's CPU targets.

- Grad-CAM (and HiResCAM) per image for inception_v3 at 128 px (target <= 0.5 s), batched and one at a time;
- LIME with 1,000 samples per image for inception_v3 at 128 px (target <= 15 s);
- ``predict`` throughput for one cnn3 member at 128 px, decoding of ~256 px phantom files included
  (target >= 100 images/s).

Usage:
    python benchmarks/explain.py                    # the issue's settings
    python benchmarks/explain.py --quick            # fewer images and LIME samples (a smoke run)

Weights do not change the cost of a forward/backward pass: the models are freshly initialised (the cnn3 member
is trained for one epoch so that ``predict`` loads a real checkpoint folder). Everything runs in one process on
the CPU with torch's default thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="model input side in pixels")
    parser.add_argument("--lime-samples", type=int, default=1000, help="LIME samples per image")
    parser.add_argument("--lime-images", type=int, default=2, help="images explained with LIME")
    parser.add_argument("--cam-images", type=int, default=16, help="images explained with Grad-CAM")
    parser.add_argument("--predict-images", type=int, default=600, help="phantom files for predict")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each timing (best and median)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 LIME samples, 4 CAM, 120 files")
    args = parser.parse_args()
    if args.quick:
        args.lime_samples, args.lime_images, args.cam_images, args.predict_images = 100, 1, 4, 120

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-explain-"))
    try:
        rows = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{platform.node()}: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f}, {date.today()}")
    print("| measurement | best | median | unit |\n|---|---|---|---|")
    for name, best, median, unit in rows:
        digits = 3 if unit == "s/image" else 0
        print(f"| {name} | {best:,.{digits}f} | {median:,.{digits}f} | {unit} |")


def timed(fn) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float, float, str]]:
    """Every timing, as (what, best, median, unit)."""
    import numpy as np
    import torch

    from cxr_search import CLASSES, explain, predict
    from cxr_search.config import TrialConfig
    from cxr_search.data import phantoms
    from cxr_search.data.decode import decode
    from cxr_search.data.prepare import prepare
    from cxr_search.data.preprocess import Preprocessing
    from cxr_search.training.loop import fit
    from cxr_search.training.runtime import model_from_config

    rows: list[tuple[str, float, float, str]] = []
    os.environ["CXR_SEARCH_CACHE"] = str(tmp / "cache")
    data_dir = tmp / "phantoms"
    phantoms.generate(data_dir, n_images=args.predict_images, size=256, seed=0, progress=False)
    files = sorted(p for p in data_dir.glob("t*/*/*") if p.suffix in (".png", ".jpg"))
    prep = Preprocessing.build(args.size, "hist")
    images = np.stack([prep(decode(p)) for p in files[: max(args.cam_images, args.lime_images)]])

    def per_image(name: str, fn, n: int) -> None:
        fn()  # warm-up: oneDNN builds its kernels per input shape
        times = [timed(fn) / n for _ in range(args.repeats)]
        rows.append((name, min(times), statistics.median(times), "s/image"))

    # inception_v3: one member, weights 1, temperature 1
    torch.manual_seed(0)
    cfg = TrialConfig.from_dict({"backbone": "inception_v3", "device": "cpu"})
    model = model_from_config(cfg).eval()
    inception = predict.Predictor(Path("."), "checkpoint", [predict.Member("inception_v3", model, cfg, 1.0, Path("."))],
                                  1.0, CLASSES, prep, "cpu")
    cams = images[: args.cam_images]
    for method in ("gradcam", "hirescam"):
        per_image(f"{method}, inception_v3 {args.size} px, batch of {len(cams)}",
                  lambda m=method: explain.gradcam_maps(inception, cams, [0] * len(cams), method=m), len(cams))
        per_image(f"{method}, inception_v3 {args.size} px, one image",
                  lambda m=method: explain.gradcam_maps(inception, cams[:1], [0], method=m), 1)
    batch = images[: min(len(images), explain.LIME_BATCH)].repeat(-(-explain.LIME_BATCH // len(images)), 0)
    batch = batch[: explain.LIME_BATCH]
    per_image(f"inception_v3 {args.size} px forward alone, fp32, batches of {len(batch)} (what LIME pays per sample)",
              lambda: inception.predict_arrays(batch), len(batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # for reference only: explanations run in float32
        per_image("  the same in bf16 autocast (not used)", lambda: inception.predict_arrays(batch), len(batch))
    lime_times = [timed(lambda k=k: explain.lime_map(inception, images[k], 0, samples=args.lime_samples, seed=0))
                  for k in range(args.lime_images)]
    rows.append((f"LIME {args.lime_samples} samples, inception_v3 {args.size} px, {args.lime_images} image(s)",
                 min(lime_times), statistics.median(lime_times), "s/image"))

    # predict: one cnn3 member trained one epoch, files decoded from disk
    data = prepare(data_dir, size=args.size, progress=False)
    ckpt = tmp / "cnn3"
    cnn_cfg = TrialConfig.from_dict({"backbone": "cnn3", "device": "cpu", "max_epochs": 1})
    fit(cnn_cfg, data, checkpoint_dir=ckpt)
    predictor = predict.load(ckpt, device="cpu")
    predict.predict_files(predictor, files[:16], progress=False)  # warm-up
    runs = [len(files) / timed(lambda: predict.predict_files(predictor, files, progress=False))
            for _ in range(args.repeats)]
    rows.append((f"predict, cnn3 {args.size} px, {len(files)} files of ~256 px (decode + preprocess + model)",
                 max(runs), statistics.median(runs), "images/s"))
    decoded, _, _ = predict.decode_files(files, predictor.preprocessing)
    runs = [len(files) / timed(lambda: predict.decode_files(files, predictor.preprocessing))
            for _ in range(args.repeats)]
    rows.append(("  of which decode + preprocess alone", max(runs), statistics.median(runs), "images/s"))
    runs = [len(files) / timed(lambda: predictor.predict_arrays(decoded)) for _ in range(args.repeats)]
    rows.append(("  of which the model alone", max(runs), statistics.median(runs), "images/s"))

    return rows

if __name__ == "__main__":
    main()
