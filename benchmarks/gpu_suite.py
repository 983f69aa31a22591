"""The GPU suite: one prepared run that measures what the whole study on one GPU depends on. Not a test.

Parts, in order (each guarded: a part that fails is recorded and the others still run; the JSON is rewritten
after every part, so a run cut short keeps what it measured):
  throughput  per backbone, img/s of the direct port of the study's pipeline (batch 32) and of the engine at
              batch 32 and 256 (`throughput.measure_backbone`), random 128 px images
  startup     a fresh process per trial, as Ray starts one for each GPU trial: process start -> first training
              step finished (imports, data, model + ImageNet weights, to the GPU, cuDNN autotune)
  ray         Ray Tune overhead with 4 trials packed on the GPU (`ray_overhead.measure`, fresh process per trial)
  study       a reduced whole study through `run_pipeline` (study: the nine-backbone table and the fine-tuning
              grid, retrain of the best over seeds, ensemble), measured end to end, and its projection to the
              full study (19 runs + 50 seeds on 6,432 images); the formula and its inputs are in the JSON
  compile     batch 32 trained as `compile: always` trains it (CUDA graphs) and eagerly, the compile's cost cold
              and from the cache, and the steps that win it back (against `compile: auto`'s threshold);
              inception_v3 by default, `--compile A,B` for others (30-90 s each)
ImageNet weights cannot be downloaded on an offline GPU host: the suite stages placeholder weights (random
values, the real shapes) in its own folder; speed does not depend on the values.

    bash benchmarks/gpu_suite.sh OUTDIR                  # on one H100/H200: under 8 minutes
    python benchmarks/gpu_suite.py --smoke --out x.json  # CPU, tiny sizes, about a minute: checks it runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STUDY_IMAGES = 6432  # the Kaggle set the study used
STUDY_SEEDS = 50  # the study retrained its best model 50 times
# issue 13's targets; the whole-study target depends on the card
TARGETS = {"ratio_b32": 3.0, "ratio_b256": 10.0, "startup_s": 3.0, "ray_overhead": 1.2,
           "study_s_h200": 15 * 60, "study_s_other": 20 * 60}


@dataclass(frozen=True)
class Sizes:
    """How much each part measures."""

    backbones: tuple[str, ...]
    image_size: int  # px, throughput and study (the study used 128)
    throughput_images: int
    warmup: int  # untimed steps per throughput measurement
    steps: int  # timed steps per throughput measurement
    engine_batches: tuple[int, ...]
    workers: int  # DataLoader workers of the direct port
    startup_backbones: tuple[str, ...]
    startup_runs: int  # processes per backbone (the first pays cold file caches)
    ray_backbone: str
    ray_trials: int
    ray_epochs: int
    ray_concurrency: int
    ray_cpus_per_trial: float
    ray_gpus_per_trial: float
    study_space: str
    study_images: int  # phantoms in the reduced study (scaled to STUDY_IMAGES in the projection)
    study_epochs: int
    study_seeds: int
    study_variants: int  # first N variants of the space (0: all)
    study_backbone: str  # "" keeps the space's backbones; smoke forces a tiny one (random weights)
    full_epochs: tuple[int, ...]  # epochs per full-study run the projection is given for
    budget_s: float  # a part that would start later than this is skipped
    compile_backbones: tuple[str, ...]  # measured compiled and eager at batch 32 (`--compile` replaces them)
    compile_backend: str  # Inductor; the smoke run only checks the part's code (no minutes of C++ compiling)


GPU = Sizes(
    backbones=("cnn3", "alexnet", "vgg16", "vgg19", "resnet34", "resnet50", "inception_v3", "xception",
               "densenet121"),
    image_size=128, throughput_images=1024, warmup=6, steps=30, engine_batches=(32, 256), workers=8,
    startup_backbones=("inception_v3", "resnet34"), startup_runs=2,
    ray_backbone="resnet34", ray_trials=8, ray_epochs=3, ray_concurrency=4, ray_cpus_per_trial=2,
    ray_gpus_per_trial=0.25,
    study_space="study", study_images=1608, study_epochs=2, study_seeds=4, study_variants=0, study_backbone="",
    full_epochs=(20, 40, 100), budget_s=420, compile_backbones=("inception_v3",), compile_backend="inductor",
)
SMOKE = Sizes(
    backbones=("cnn3",), image_size=32, throughput_images=64, warmup=1, steps=2, engine_batches=(8, 16),
    workers=0, startup_backbones=("cnn3",), startup_runs=1,
    ray_backbone="cnn3", ray_trials=2, ray_epochs=1, ray_concurrency=2, ray_cpus_per_trial=1, ray_gpus_per_trial=0,
    study_space="study", study_images=120, study_epochs=1, study_seeds=2, study_variants=3, study_backbone="cnn3",
    full_epochs=(20, 100), budget_s=600, compile_backbones=("cnn3",), compile_backend="aot_eager",
)


# ---------------------------------------------------------------- part 1: throughput


def part_throughput(sizes: Sizes, device, report: dict) -> dict:
    import throughput
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training.loop.fit does on a GPU (the direct port benefits too)
    images, labels = throughput.random_images(sizes.throughput_images, sizes.image_size)
    rows = []
    for backbone in sizes.backbones:
        m = throughput.measure_backbone(backbone, images, labels, device, engine_batches=sizes.engine_batches,
                                        workers=sizes.workers, warmup=sizes.warmup, steps=sizes.steps)
        row = {"backbone": backbone, "direct_img_per_s": round(m["direct_img_per_s"], 1)}
        for batch, ips in m["engine_img_per_s"].items():
            row[f"engine_b{batch}_img_per_s"] = round(ips, 1)
            row[f"ratio_b{batch}"] = round(ips / m["direct_img_per_s"], 2)
        rows.append(row)
        print("throughput " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"size": sizes.image_size, "in_chans": 3, "direct_batch": 32, "rows": rows}


# ---------------------------------------------------------------- part 2: trial start-up


class _FirstStepDone(Exception):
    pass


def startup_child(payload: dict) -> None:
    """In a fresh process: what a trial does up to its first training step, with timestamps (time.time())."""
    t_main = time.time()
    import numpy as np
    import torch

    from cxr_search.config import TrialConfig
    from cxr_search.data.prepare import PreparedData, SplitArrays
    from cxr_search.training import loop

    t_imports = time.time()
    with np.load(payload["npz"], allow_pickle=False) as z:  # as a trial reads the arrays from Ray's object store
        splits = {}
        for name in ("train", "val", "test"):
            images, labels = z[f"{name}_images"], z[f"{name}_labels"]
            blank = np.full(len(labels), "", dtype=str)
            splits[name] = SplitArrays(images, labels, blank, blank)
    data = PreparedData(**splits, image_size=int(payload["size"]))
    t_data = time.time()
    cfg = TrialConfig(backbone=payload["backbone"], pretrained=payload["pretrained"], device=payload["device"],
                      max_epochs=1)
    first: dict[str, float] = {}
    original = loop.train_step

    def first_step(*args, **kwargs):  # measuring hook: fit calls loop.train_step by its module name
        original(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        first["t"] = time.time()
        raise _FirstStepDone

    loop.train_step = first_step
    with contextlib.suppress(_FirstStepDone):
        loop.fit(cfg, data)
    # What a reused trial process would inherit from this trial (Tune's reuse_actors): GPU memory still held by
    # tensors once fit() has returned; 0 proves the next trial in this process starts with the whole GPU share.
    gc.collect()
    left = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"t_main": t_main, "t_imports": t_imports, "t_data": t_data, "t_first_step": first["t"],
                      "gpu_bytes_left": left}))


def part_startup(sizes: Sizes, device, data_npz: Path, pretrained_of, report: dict) -> dict:
    rows = []
    for backbone in sizes.startup_backbones:
        for run in range(1, sizes.startup_runs + 1):
            payload = {"backbone": backbone, "pretrained": pretrained_of(backbone), "device": device.type,
                       "npz": str(data_npz), "size": sizes.image_size}
            t_spawn = time.time()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--startup-child",
                                   json.dumps(payload)], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"start-up child failed: {proc.stderr.strip().splitlines()[-1:]}")
            t = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"backbone": backbone, "pretrained": payload["pretrained"], "run": run,
                   "process_to_first_step_s": round(t["t_first_step"] - t_spawn, 2),
                   "interpreter_and_imports_s": round(t["t_imports"] - t_spawn, 2),
                   "data_s": round(t["t_data"] - t["t_imports"], 2),
                   "model_weights_device_first_step_s": round(t["t_first_step"] - t["t_data"], 2),
                   "gpu_mib_left_after_trial": round(t["gpu_bytes_left"] / 2**20, 1)}
            rows.append(row)
            print("startup " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return {"rows": rows, "note": "a fresh Python process per trial (Ray's default for GPU trials); the first run of "
                                  "a backbone also pays cold file caches; gpu_mib_left_after_trial is what a reused "
                                  "process (reuse_actors) would inherit"}


# ---------------------------------------------------------------- part 3: Ray overhead


def part_ray(sizes: Sizes, device, data, work: Path, report: dict) -> dict:
    import ray_overhead

    row = ray_overhead.measure(
        data, sizes.ray_trials, sizes.ray_epochs, sizes.ray_concurrency, False, work / "ray-overhead",
        backbone=sizes.ray_backbone, device=device.type, cpus_per_trial=sizes.ray_cpus_per_trial,
        gpus_per_trial=sizes.ray_gpus_per_trial,
    )
    single = next((r.get("engine_b32_img_per_s") for r in report.get("throughput", {}).get("rows", [])
                   if r["backbone"] == sizes.ray_backbone), None)
    if single:
        # the packed trials' summed img/s over one engine alone at batch 32 (throughput part; random images)
        row["packing_gain_approx"] = round(sizes.ray_concurrency * row["mean_trial_img_per_s"] / single, 2)
    print("ray " + json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------- part 4: reduced whole study + projection

PROJECTION_FORMULA = (
    "T_full(E) = T_fixed + k*(T_data + T_ensemble) + sum over stages s in {search, retrain} of "
    "[ W_s * r_s * (sum_t D_t / sum_t w_t) + k * r_s * F_s ],  D_t = w_t + (E*k - e_t) * epoch_t;  "
    "k = full images / run images, r_s = full trials / run trials of stage s (search: the space's grid points; "
    "retrain: 50 seeds), W_s = measured stage wall (Tune), F_s = its finalize (predict val+test), "
    "w_t = trial t's measured time (Tune time_total_s), e_t = its epochs, epoch_t = its median epoch time "
    "after the first (the first pays cuDNN autotune), T_data = cold data preparation, T_fixed = the run's wall "
    "minus stages, finalize, data and ensemble (Ray start, planning, report). Assumes every full run trains E epochs "
    "(the study: up to 100, early stopping with patience 10) and the same packing as the reduced run."
)


def project(measured: dict, *, full_images: int, full_trials: dict[str, int], epochs: int) -> float:
    """Projected seconds of the full study (PROJECTION_FORMULA) from a reduced run's measurements.

    Args:
        measured: {"wall_s", "data_s", "prepare_s", "ensemble_s", "n_images", "stages": {name: {"wall_s",
            "finalize_s", "trials": [{"wall_s", "epochs", "epoch_s"}]}}}.
        full_images: images of the full study's data set.
        full_trials: trials of each stage in the full study.
        epochs: epochs every full run trains (E).
    """
    k = full_images / measured["n_images"]
    stages = measured["stages"]
    fixed = measured["wall_s"] - measured["prepare_s"] - measured["ensemble_s"] - sum(
        s["wall_s"] + s["finalize_s"] for s in stages.values())
    total = fixed + k * (measured["data_s"] + measured["ensemble_s"])
    for name, s in stages.items():
        trials = s["trials"]
        if not trials:
            continue
        r = full_trials[name] / len(trials)
        work_run = sum(t["wall_s"] for t in trials)
        work_full = sum(t["wall_s"] + (epochs * k - t["epochs"]) * t["epoch_s"] for t in trials)
        total += s["wall_s"] * r * work_full / max(work_run, 1e-9) + k * r * s["finalize_s"]
    return total


def _reduced_space(sizes: Sizes, out: Path, gpu: bool) -> tuple[Path, int]:
    """The study space cut to the suite's size (file written to `out`), and the full space's search trial count."""
    import yaml

    from cxr_search.space import load_space, resolve

    full = load_space(sizes.study_space)
    full_trials = full.num_samples if full.searcher == "optuna" else len(full.planned_trials())
    raw = yaml.safe_load(resolve(sizes.study_space).read_text())
    raw.pop("cpu_budget", None)
    raw["name"] = "study-reduced"
    raw["data"] = {**(raw.get("data") or {}), "size": sizes.image_size}
    if sizes.study_variants and raw.get("variants"):
        raw["variants"] = raw["variants"][: sizes.study_variants]
    if sizes.study_backbone:  # smoke: one tiny backbone with random weights everywhere
        raw["trial"] = {**(raw.get("trial") or {}), "backbone": sizes.study_backbone, "pretrained": "none"}
        raw["variants"] = [{k: v for k, v in item.items() if k not in ("backbone", "pretrained")}
                           for item in raw.get("variants") or []] or None
        if raw["variants"] is None:
            raw.pop("variants")
    if not gpu:
        raw["resources"] = {"cpu": 1, "gpu": 0}
    path = out / "study_reduced.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, full_trials


def _pairs(space_path: Path) -> set[tuple[str, str]]:
    from cxr_search.space import load_space

    return load_space(space_path).backbone_pairs()


@contextlib.contextmanager
def _timed_calls(targets: list[tuple[Any, str]], log: list[dict]):
    """Measuring hook: wrap module functions so each call's duration lands in `log` ({"what", "arg", "s"})."""
    saved = [(module, name, getattr(module, name)) for module, name in targets]

    def wrap(fn, what):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                log.append({"what": what, "arg": str(args[0]) if args else "", "s": time.perf_counter() - t0})
        return timed

    for module, name, fn in saved:
        setattr(module, name, wrap(fn, name))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _trial_measures(stage_dir: Path) -> list[dict]:
    from cxr_search.experiment.trials import trial_dirs, trial_history

    out = []
    for trial in trial_dirs(stage_dir):
        hist = trial_history(trial.path)
        if hist.empty or "epoch_time_s" not in hist:
            continue
        epoch_times = list(hist["epoch_time_s"])
        steady = epoch_times[1:] or epoch_times  # the first epoch pays cuDNN autotuning
        out.append({"trial": trial.trial_id, "wall_s": float(sum(epoch_times)),
                    "epochs": len(epoch_times), "epoch_s": float(sorted(steady)[len(steady) // 2])})
    return out


def part_study(sizes: Sizes, gpu: bool, phantom_dir: Path, data_s: float, work: Path, report: dict) -> dict:
    from rich.console import Console

    from cxr_search import ensemble, pipeline
    from cxr_search.experiment.plan import DataConfig
    from cxr_search.tuning import stages

    space, full_search_trials = _reduced_space(sizes, work, gpu)
    calls: list[dict] = []
    hooks = [(stages, "run_planned_stage"), (stages, "run_optuna_stage"), (pipeline, "finalize"), (stages, "finalize"),
             (DataConfig, "prepare"), (ensemble, "build_ensemble")]
    t0 = time.perf_counter()
    with _timed_calls(hooks, calls):
        exp = pipeline.run_pipeline(space, data_dir=phantom_dir, name="study", num_samples=1,
                                    max_epochs=sizes.study_epochs, seeds=sizes.study_seeds, top_k=1,
                                    storage=str(work / "experiments"), console=Console(width=160))
    wall = time.perf_counter() - t0

    def seconds(what: str, where: Path | None = None, exact: bool = False) -> float:
        """Time spent in the hooked function `what`, on `where` (exactly, or any folder below it)."""
        return sum(c["s"] for c in calls if c["what"] in what.split("|") and (
            where is None or (Path(c["arg"]) == where if exact else Path(c["arg"]).is_relative_to(where))))

    runs = "run_planned_stage|run_optuna_stage"
    per_stage = {
        "search": {"wall_s": seconds(runs, exp, exact=True), "finalize_s": seconds("finalize", exp, exact=True),
                   "trials": _trial_measures(exp)},
        "retrain": {"wall_s": seconds(runs, exp / "retrain"), "finalize_s": seconds("finalize", exp / "retrain"),
                    "trials": _trial_measures(exp / "retrain")},
    }
    measured = {"wall_s": wall, "data_s": data_s, "prepare_s": seconds("prepare"),
                "ensemble_s": seconds("build_ensemble"), "n_images": sizes.study_images, "stages": per_stage}
    full_trials = {"search": full_search_trials, "retrain": STUDY_SEEDS}
    projections = {str(e): round(project(measured, full_images=STUDY_IMAGES, full_trials=full_trials, epochs=e), 1)
                   for e in sizes.full_epochs}
    result = {
        "space": str(space), "experiment": str(exp), "epochs_per_run": sizes.study_epochs,
        "search_trials_run": len(per_stage["search"]["trials"]), "retrain_seeds_run": len(per_stage["retrain"]["trials"]),
        "measured": measured, "full": {"images": STUDY_IMAGES, "trials": full_trials},
        "projected_s_by_epochs": projections, "formula": PROJECTION_FORMULA,
    }
    print(f"study: reduced run {wall:.1f} s end to end; projected full study (s) by epochs per run: {projections}",
          flush=True)
    return result


# ---------------------------------------------------------------- part 5: launch overhead, compiled both ways


def part_compile(sizes: Sizes, backbones: list[str], device, work: Path, report: dict) -> dict:
    """Batch 32 trained as `compile: always` trains it (CUDA graphs on a GPU) and eagerly, with the compile's cost
    from an empty cache (a machine's first trial) and from the cache (every later trial of that backbone; measured
    in this process after `torch._dynamo.reset()`, so a new process adds Inductor's imports), and the steps a trial
    needs to win the compile back: `compiling.COMPILE_MIN_STEPS` is what `compile: auto` assumes."""
    import throughput
    import torch

    from cxr_search.config import TrialConfig
    from cxr_search.training import compiling
    from cxr_search.training.compiling import (
        COMPILE_MAX_BATCH,
        COMPILE_MIN_STEPS,
        compile_mode,
    )

    compiling.COMPILE_BACKEND = sizes.compile_backend
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")  # empty: the first compile is cold
    images, labels = throughput.random_images(sizes.throughput_images, sizes.image_size)
    rows = []
    for backbone in backbones:
        cfg = TrialConfig(backbone=backbone, in_chans=3, optimizer="sgd", device=str(device), batch_size=32)
        common = dict(images=images, labels=labels, device=device, warmup=sizes.warmup, steps=sizes.steps,
                      step_only=False)
        row: dict[str, Any] = {"backbone": backbone, "batch": cfg.batch_size, "backend": sizes.compile_backend,
                               "mode": compile_mode(cfg.replace(compile="always"), device, 0)}
        eager_runs = [throughput.bench_engine(cfg, **common)]
        for cache in ("cold", "warm"):
            torch._dynamo.reset()  # as a new trial process: nothing compiled in memory, only the cache on disk
            t0 = time.perf_counter()
            compiled = throughput.bench_engine(cfg, compile_model=True, **common)
            steady = (sizes.warmup + sizes.steps) * cfg.batch_size / compiled  # the same steps, once compiled
            row[f"compile_{cache}_s"] = round(time.perf_counter() - t0 - steady, 1)
            row[f"compiled_{cache}_img_per_s"] = round(compiled, 1)
        eager_runs.append(throughput.bench_engine(cfg, **common))  # before and after: drift shows, and averages
        eager = sum(eager_runs) / 2
        row["eager_img_per_s"] = round(eager, 1)
        row["eager_before_after_img_per_s"] = [round(r, 1) for r in eager_runs]
        compiled = row["compiled_warm_img_per_s"]
        saved_per_step = cfg.batch_size / eager - cfg.batch_size / compiled  # s
        row["speedup"] = round(compiled / eager, 2)
        for cache in ("cold", "warm"):
            row[f"break_even_steps_{cache}"] = (round(row[f"compile_{cache}_s"] / saved_per_step)
                                                if saved_per_step > 0 else None)  # None: compiling never pays
        rows.append(row)
        print("compile " + json.dumps(row), flush=True)
    return {"rows": rows, "auto_min_steps": COMPILE_MIN_STEPS, "auto_max_batch": COMPILE_MAX_BATCH}


# ---------------------------------------------------------------- driver


def checks(report: dict, device_name: str) -> list[dict]:
    """Each measured figure against issue 13's target."""
    out = []
    for row in report.get("throughput", {}).get("rows", []):
        for key in ("ratio_b32", "ratio_b256"):
            if key in row:
                out.append({"check": f"{row['backbone']} {key}", "value": row[key], "target": f">= {TARGETS[key]}",
                            "ok": row[key] >= TARGETS[key]})
    last_runs: dict[str, dict] = {}
    for row in report.get("startup", {}).get("rows", []):
        last_runs[row["backbone"]] = row
    for backbone, row in last_runs.items():
        value = row["process_to_first_step_s"]
        out.append({"check": f"{backbone} trial start-up s", "value": value, "target": f"<= {TARGETS['startup_s']}",
                    "ok": value <= TARGETS["startup_s"]})
        left = row["gpu_mib_left_after_trial"]
        out.append({"check": f"{backbone} GPU MiB held after its trial (reuse_actors safe at 0)", "value": left,
                    "target": "== 0", "ok": left == 0})
    if "overhead_ratio" in report.get("ray", {}):
        value = report["ray"]["overhead_ratio"]
        out.append({"check": "Ray overhead, packed trials", "value": value, "target": f"<= {TARGETS['ray_overhead']}",
                    "ok": value <= TARGETS["ray_overhead"]})
    compile_part = report.get("compile", {})
    for row in compile_part.get("rows", []):
        value = row["break_even_steps_warm"]
        out.append({"check": f"{row['backbone']} compile won back within steps (warm cache)", "value": value,
                    "target": f"<= {compile_part['auto_min_steps']} (compile: auto's threshold)",
                    "ok": value is not None and value <= compile_part["auto_min_steps"]})
    target = TARGETS["study_s_h200"] if "H200" in device_name else TARGETS["study_s_other"]
    for epochs, value in report.get("study", {}).get("projected_s_by_epochs", {}).items():
        out.append({"check": f"whole study projected s, {epochs} epochs per run", "value": value,
                    "target": f"<= {target}", "ok": value <= target})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=False, default=Path("gpu_suite.json"), help="JSON to write")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that every part runs")
    p.add_argument("--parts", default="throughput,startup,ray,study,compile", help="comma-separated parts to run")
    p.add_argument("--compile", default="", help="backbones the compile part measures (default: inception_v3)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--startup-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.startup_child is not None:
        startup_child(json.loads(args.startup_child))
        return

    t_start = time.perf_counter()
    sizes = SMOKE if args.smoke else GPU
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-suite-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # a private cache, weights folder and experiments root; Ray's workers inherit them
    for var, sub in (("CXR_SEARCH_CACHE", "cache"), ("CXR_SEARCH_WEIGHTS", "weights"),
                     ("CXR_SEARCH_EXPERIMENTS", "experiments")):
        os.environ[var] = str(work / sub)
    sys.path.insert(0, str(HERE))  # throughput.py and ray_overhead.py are reused, not copied

    import numpy as np
    import torch

    from cxr_search.data import phantoms
    from cxr_search.experiment.plan import DataConfig
    from cxr_search.training.runtime import resolve_device

    device = resolve_device("auto")
    gpu = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or "cpu")
    report: dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.py", "smoke": args.smoke, "date": dt.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device_name,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "sizes": dataclasses.asdict(sizes), "targets": TARGETS, "errors": {},
    }

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        report["checks"] = checks(report, device_name)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    # shared inputs, untimed: the phantom set (real data exists already), its cold preparation (timed: a real run
    # decodes its data once), placeholder ImageNet weights for the backbones that use them
    t0 = time.perf_counter()
    phantom_dir = phantoms.default_dataset(n_images=sizes.study_images, size=max(64, sizes.image_size), seed=0)
    report["phantoms_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    data = DataConfig(data_dir=str(phantom_dir), size=sizes.image_size).prepare(progress=False)
    data_s = time.perf_counter() - t0
    report["data_prep_cold_s"] = round(data_s, 2)
    data_npz = work / "data.npz"
    np.savez(data_npz, **{f"{n}_{k}": getattr(getattr(data, n), k) for n in ("train", "val", "test")
                          for k in ("images", "labels")})
    pretrained = _stage_placeholder_weights(sizes, work)
    save()

    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    compile_backbones = [b for b in args.compile.split(",") if b] or list(sizes.compile_backbones)
    runners = {
        "throughput": lambda: part_throughput(sizes, device, report),
        "startup": lambda: part_startup(sizes, device, data_npz, lambda b: pretrained.get(b, "none"), report),
        "ray": lambda: part_ray(sizes, device, data, work, report),
        "study": lambda: part_study(sizes, gpu, phantom_dir, data_s, work, report),
        "compile": lambda: part_compile(sizes, compile_backbones, device, work, report),
    }
    for part in parts:
        if time.perf_counter() - t_start > sizes.budget_s:
            report["errors"][part] = f"skipped: the suite's time budget ({sizes.budget_s:.0f} s) was spent"
            continue
        if part in ("ray", "study"):
            from cxr_search.tuning.cluster import init_ray

            init_ray(num_cpus=None if gpu else 2)
        print(f"== {part}", flush=True)
        try:
            report[part] = runners[part]()
        except Exception as e:  # noqa: BLE001 - one broken part must not lose the others' figures
            traceback.print_exc()
            report["errors"][part] = f"{type(e).__name__}: {e}"
        save()
    _print_summary(report)
    sys.exit(1 if any(not v.startswith("skipped") for v in report["errors"].values()) else 0)


def _stage_placeholder_weights(sizes: Sizes, work: Path) -> dict[str, str]:
    """Stage random weights of the real shapes for every backbone the study fine-tunes; {backbone: pretrained}."""
    from cxr_search.models import fetch as staging
    from cxr_search.models import weights
    from cxr_search.models.registry import create_model

    if sizes.study_backbone:  # smoke: random weights everywhere, nothing to stage
        return {}
    wanted = {b for b, p in _pairs(_reduced_space(sizes, work, True)[0]) if p == weights.IMAGENET}
    wanted |= {b for b in sizes.startup_backbones if weights.IMAGENET_SOURCES.get(b)}
    for backbone in sorted(wanted):
        state = create_model(backbone, in_chans=3).backbone.state_dict()
        staging.stage(backbone, state, origin="gpu_suite placeholder: random values, ImageNet shapes")
    return {b: weights.IMAGENET for b in wanted}


def _print_summary(report: dict) -> None:
    print(f"\n== gpu suite on {report['device']} ({report['date']}), {report['wall_s']} s"
          + (" [smoke: sizes too small for the figures to mean anything]" if report["smoke"] else ""))
    for row in report.get("throughput", {}).get("rows", []):
        print("  " + "  ".join(f"{k} {v}" for k, v in row.items()))
    for c in report["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'MISS'} {c['check']}: {c['value']} (target {c['target']})")
    if "study" in report:
        print(f"  projection formula: {report['study']['formula']}")
    for part, error in report["errors"].items():
        print(f"  {part}: {error}")


if __name__ == "__main__":
    main()
