"""Ray Tune's overhead on a search: wall time / (sum of trial times / concurrency). Not a test.

A ratio of 1.0 means Tune adds nothing beyond the trials themselves; the target is <= 1.2 for trials of a
few seconds. Trial time is the sum of each trial's epoch times (training and validation); the search wall
time also pays for trial process start-up, model building, scheduling and experiment snapshots.
Run both actor modes: reused processes (our CPU default) and a
fresh process per trial (our GPU default, so a stopped trial's GPU memory is freed).

    python benchmarks/ray_overhead.py            # 8 trials x 3 epochs, cnn3, 48 px, 2 slots
    python benchmarks/ray_overhead.py --smoke    # 4 trials x 2 epochs
    python benchmarks/ray_overhead.py --device cuda --backbone resnet34 --size 128 --concurrency 4 \
        --gpus-per-trial 0.25 --cpus-per-trial 2   # 4 trials packed on one GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray

from cxr_search.experiment.plan import DataConfig, Objective
from cxr_search.experiment.results import build_results
from cxr_search.tuning.cluster import init_ray
from cxr_search.tuning.resources import TrialResources
from cxr_search.tuning.searcher import trial_key
from cxr_search.tuning.stages import StageOptions, run_planned_stage


def measure(data, trials: int, epochs: int, concurrency: int, reuse: bool, root: Path, *, backbone: str = "cnn3",
            device: str = "cpu", cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
            batch_size: int = 32) -> dict:
    """Run `trials` grid trials of `backbone` with `concurrency` slots; the overhead ratio and the trials' img/s.

    Args:
        data: PreparedData every trial trains on.
        trials, epochs, concurrency: grid size, epochs per trial, trials running at once.
        reuse: reuse trial processes (Tune's reuse_actors) or start a fresh one per trial.
        root: folder for the experiment (removed first).
        backbone, device, batch_size: the trials' settings.
        cpus_per_trial, gpus_per_trial: each trial's resource request (a GPU fraction packs trials on one GPU).
    """
    exp = root / f"overhead-{backbone}-reuse{int(reuse)}"
    shutil.rmtree(exp, ignore_errors=True)
    runs = {trial_key(i): {"backbone": backbone, "max_epochs": epochs, "patience": epochs, "device": device,
                                 "batch_size": batch_size, "lr": 1e-3 * (i + 1)} for i in range(trials)}
    options = StageOptions(objective=Objective(),
                                 resources=TrialResources(cpus_per_trial, gpus_per_trial),
                                 max_concurrent_trials=concurrency, verbose=0, reuse_actors=reuse)
    t0 = time.perf_counter()
    run_planned_stage(exp, runs, data, options)
    wall = time.perf_counter() - t0
    df = build_results(exp, Objective())
    trial_sum = float(df["wall_time_s"].sum())
    return {"backbone": backbone, "device": device, "reuse_actors": reuse, "trials": trials, "epochs": epochs,
            "concurrency": concurrency, "gpus_per_trial": gpus_per_trial, "wall_s": round(wall, 2),
            "sum_trial_s": round(trial_sum, 2), "mean_trial_s": round(trial_sum / trials, 2),
            "mean_trial_img_per_s": round(float(df["img_per_s"].mean()), 1),
            "overhead_ratio": round(wall / (trial_sum / concurrency), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--n-images", type=int, default=240)
    p.add_argument("--backbone", default="cnn3")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="0.25: four trials share one GPU")
    p.add_argument("--smoke", action="store_true", help="4 trials x 2 epochs")
    args = p.parse_args()
    if args.smoke:
        args.trials, args.epochs = 4, 2
    data = DataConfig(n_images=args.n_images, size=args.size).prepare(progress=False)
    init_ray(num_cpus=int(args.concurrency * args.cpus_per_trial))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        for reuse in (True, False):
            rows.append(measure(data, args.trials, args.epochs, args.concurrency, reuse, Path(tmp),
                                backbone=args.backbone, device=args.device, cpus_per_trial=args.cpus_per_trial,
                                gpus_per_trial=args.gpus_per_trial))
            print(json.dumps(rows[-1]))
    ray.shutdown()
    print("\n| actors | trials x epochs | slots | wall s | sum of trial s | mean trial s | overhead ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        actors = "reused" if r["reuse_actors"] else "fresh per trial"
        print(f"| {actors} | {r['trials']} x {r['epochs']} | {r['concurrency']} | {r['wall_s']} | {r['sum_trial_s']} "
              f"| {r['mean_trial_s']} | {r['overhead_ratio']} |")


if __name__ == "__main__":
    main()
