"""The GPU suite (benchmarks/gpu_suite.sh) runs end to end on a CPU with --smoke, so it is ready for a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_smoke_suite_measures_every_part_and_projects_the_study(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), str(tmp_path / "out"), "--smoke",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert (tmp_path / "out" / "gpu_suite.log").read_text().strip()
    assert report["errors"] == {} and report["smoke"] is True

    batches = report["sizes"]["engine_batches"]
    for row in report["throughput"]["rows"]:
        assert row["direct_img_per_s"] > 0
        for batch in batches:
            assert row[f"engine_b{batch}_img_per_s"] > 0
            assert row[f"ratio_b{batch}"] == pytest.approx(  # both sides rounded: 2 decimals for the ratio
                row[f"engine_b{batch}_img_per_s"] / row["direct_img_per_s"], rel=0.02, abs=0.006)
    for row in report["startup"]["rows"]:
        phases = row["interpreter_and_imports_s"] + row["data_s"] + row["model_weights_device_first_step_s"]
        assert row["process_to_first_step_s"] > 0 and phases == pytest.approx(row["process_to_first_step_s"], abs=0.05)
        assert row["gpu_mib_left_after_trial"] == 0  # no GPU here: nothing held
    ray = report["ray"]
    assert ray["trials"] == report["sizes"]["ray_trials"] and ray["overhead_ratio"] > 0 and not ray["reuse_actors"]

    for row in report["compile"]["rows"]:  # the engine's compiled path trained, and was timed both ways
        assert row["eager_img_per_s"] > 0 and row["compiled_cold_img_per_s"] > 0 and row["compiled_warm_img_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["compiled_warm_img_per_s"] / row["eager_img_per_s"], rel=0.02,
                                               abs=0.006)

    study = report["study"]
    measured = study["measured"]
    assert study["search_trials_run"] == report["sizes"]["study_variants"]
    assert study["retrain_seeds_run"] == report["sizes"]["study_seeds"]
    assert study["full"]["trials"] == {"search": 19, "retrain": 50}  # study.yaml's 19 grid points, 50 seeds
    assert set(study["projected_s_by_epochs"]) == {str(e) for e in report["sizes"]["full_epochs"]}
    assert "D_t = w_t + (E*k - e_t) * epoch_t" in study["formula"]
    assert {c["check"].split(",")[0] for c in report["checks"]} >= {
        "cnn3 trial start-up s", "Ray overhead", "whole study projected s", "cnn3 compile won back within steps (warm cache)"}

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_suite import project
    finally:
        sys.path.remove(str(BENCHMARKS))
    # projecting the reduced run onto itself gives back its measured wall time ...
    same = {**measured, "data_s": measured["prepare_s"]}
    run_trials = {name: len(s["trials"]) for name, s in measured["stages"].items()}
    itself = project(same, full_images=measured["n_images"], full_trials=run_trials,
                     epochs=report["sizes"]["study_epochs"])
    assert itself == pytest.approx(measured["wall_s"], rel=1e-9)
    # ... and the full study costs more with more images, runs and epochs
    low, high = (project(measured, full_images=6432, full_trials={"search": 19, "retrain": 50}, epochs=e)
                 for e in (20, 100))
    assert measured["wall_s"] < low < high
