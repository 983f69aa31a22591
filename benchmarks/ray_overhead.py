"""Ray Tune's overhead on a CPU search: wall time / (sum of trial times / concurrency). Not a test.

A ratio of 1.0 means Tune adds nothing beyond the trials themselves; the target is <= 1.2 for trials of a
few seconds. Trial time is the sum of each trial's epoch times (training and validation); the search wall time also pays for trial process start-up, scheduling,
checkpoint syncing and experiment snapshots. Run both actor modes: reused processes (our CPU default) and a
fresh process per trial (our GPU default, so a stopped trial's GPU memory is freed).

    python benchmarks/ray_overhead.py            # 8 trials x 3 epochs, cnn3, 48 px, 2 slots
    python benchmarks/ray_overhead.py --smoke    # 4 trials x 2 epochs
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import ray

from cxr_search import experiment
from cxr_search.search import tune as stage


def measure(data, trials: int, epochs: int, concurrency: int, reuse: bool, root: Path) -> dict:
    exp = root / f"overhead-reuse{int(reuse)}"
    shutil.rmtree(exp, ignore_errors=True)
    runs = {stage.trial_key(i): {"backbone": "cnn3", "max_epochs": epochs, "patience": epochs, "device": "cpu",
                                 "batch_size": 32, "lr": 1e-3 * (i + 1)} for i in range(trials)}
    options = stage.StageOptions(objective=experiment.Objective(), resources=stage.TrialResources(1, 0),
                                 max_concurrent_trials=concurrency, verbose=0, reuse_actors=reuse)
    t0 = time.perf_counter()
    stage.run_planned_stage(exp, runs, data, options)
    wall = time.perf_counter() - t0
    df = experiment.build_results(exp, experiment.Objective())
    trial_sum = float(df["wall_time_s"].sum())
    return {"reuse_actors": reuse, "trials": trials, "epochs": epochs, "concurrency": concurrency,
            "wall_s": round(wall, 2), "sum_trial_s": round(trial_sum, 2),
            "mean_trial_s": round(trial_sum / trials, 2), "overhead_ratio": round(wall / (trial_sum / concurrency), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--n-images", type=int, default=240)
    p.add_argument("--smoke", action="store_true", help="4 trials x 2 epochs")
    args = p.parse_args()
    if args.smoke:
        args.trials, args.epochs = 4, 2
    data = experiment.DataConfig(n_images=args.n_images, size=args.size).prepare(progress=False)
    stage.init_ray(num_cpus=args.concurrency)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        for reuse in (True, False):
            rows.append(measure(data, args.trials, args.epochs, args.concurrency, reuse, Path(tmp)))
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
