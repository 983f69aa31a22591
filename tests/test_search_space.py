"""Search-space files: the shipped ones load and reproduce the study's tables; mistakes fail before Ray starts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from ray import tune

from cxr_search.config import TrialConfig
from cxr_search.errors import CxrError
from cxr_search.io.paths import reference_dir
from cxr_search.space import known, load_space, trial_fields
from cxr_search.tuning.stages import tune_domain

GOOD = """
name: tiny
metric: val_macro_f1
mode: max
searcher: {type: optuna, seed: 3}
scheduler: {type: asha, max_t: 4, grace_period: 1, reduction_factor: 2}
num_samples: 5
max_concurrent_trials: 2
resources: {cpu: 1, gpu: auto}
data: {size: 64, equalize: hist, val_fraction: 0.2}
trial: {backbone: cnn3, max_epochs: 4}
params:
  lr: {loguniform: [1.0e-4, 1.0e-2]}
  optimizer: {choice: [sgd, adam]}
  batch_size: {randint: [8, 32]}
"""


def _write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", ["inception", "backbones", "study"])
def test_shipped_spaces_load_and_sample_valid_trial_configs(name):
    spec = load_space(name)
    assert spec.metric.startswith("val_")
    # Every grid point / sample resolves to a config the trainable accepts.
    if spec.searcher == "optuna":
        rng = np.random.default_rng(0)
        configs = [{**spec.trial, **{p.name: p.sample(rng) for p in spec.params}} for _ in range(30)]
    else:
        configs = spec.planned_trials()[:30]
    for config in configs:
        TrialConfig.from_dict(trial_fields(config))


def test_known_lists_the_shipped_spaces():
    assert {"inception", "backbones", "study"} <= set(known())


def test_the_study_space_reproduces_the_study_tables_point_by_point():
    spec = load_space("study")
    points = {cfg["variant"]: cfg for cfg in spec.planned_trials()}
    finetune = pd.read_csv(reference_dir() / "study_inception_finetuning.csv", dtype={"variant": str})
    for row in finetune.itertuples():
        name = row.variant if row.variant == "sgd_baseline" else f"variant_{row.variant}"
        cfg = points[name]
        assert cfg["backbone"] == "inception_v3"
        assert (cfg["optimizer"], cfg["freeze_fraction"], cfg["head"], cfg["regularizer"]) == (
            row.optimizer, row.freeze_fraction, row.head, row.regularizer), name
        if row.regularizer != "none":
            assert cfg["reg_strength"] == row.reg_strength
        if row.head == "dense_dropout":
            assert cfg["dropout"] == row.dropout
    backbones = pd.read_csv(reference_dir() / "study_backbones.csv")
    ours = {cfg["backbone"] for name, cfg in points.items() if name.startswith("backbone_")}
    assert ours == {"densenet121" if m == "densenet" else m for m in backbones["model"]}
    assert len(points) == len(finetune) + len(backbones)


def test_the_whole_study_is_one_plan_at_the_study_settings(monkeypatch):
    from cxr_search.experiment.plan import STAGES, plan_run
    from cxr_search.models import weights

    monkeypatch.setattr(weights, "require_available", lambda pairs: None)  # staged: see test_weights
    plan = plan_run("study", gpu_available=True)
    trials = plan.space.planned_trials()
    assert len(trials) == 19 and plan.space.scheduler.kind == "fifo"  # both tables, every point to its end
    assert plan.data.size == 128
    assert {(t["max_epochs"], t["patience"], t["batch_size"]) for t in trials} == {(100, 10, 32)}
    assert {t["pretrained"] for t in trials if t["backbone"] != "cnn3"} == {"imagenet"}
    # then the best configuration over 50 seeds, for as long as the study trained, and the ensemble
    assert (plan.top_k, plan.seeds, plan.retrain_max_epochs, plan.ensemble_members) == (1, 50, None, 3)
    assert plan.stages == STAGES
    assert "retrain top 1 x 50 seeds" in plan.notes[-1]
    # the command line and the CPU budget still decide over the file's pipeline section
    assert plan_run("study", gpu_available=True, seeds=5, top_k=2).seeds == 5
    cpu = plan_run("study")
    assert (cpu.seeds, cpu.retrain_max_epochs) == (2, 2)


def test_a_pipeline_section_sets_the_stages_after_the_search_and_typos_name_the_key(tmp_path):
    from cxr_search.experiment.plan import plan_run

    plan = plan_run(_write(tmp_path, GOOD + "pipeline: {top_k: 2, seeds: 3, retrain_max_epochs: 5, "
                                             "ensemble_members: 4}\n"), full=True)
    assert (plan.top_k, plan.seeds, plan.retrain_max_epochs, plan.ensemble_members) == (2, 3, 5, 4)
    with pytest.raises(CxrError, match=r"pipeline\.seed.*'seeds'"):
        load_space(_write(tmp_path, GOOD + "pipeline: {seed: 3}\n"))
    with pytest.raises(CxrError, match=r"pipeline\.seeds must be >= 1"):
        load_space(_write(tmp_path, GOOD + "pipeline: {seeds: 0}\n"))
    with pytest.raises(CxrError, match="now called 'study'"):
        load_space("seed_grid")


def test_domains_translate_to_tune(tmp_path):
    spec = load_space(_write(tmp_path, GOOD))
    space = {**spec.trial, **{p.name: tune_domain(p) for p in spec.params}}
    assert isinstance(space["lr"], tune.search.sample.Float) and space["lr"].lower == 1e-4
    assert space["optimizer"].categories == ["sgd", "adam"]
    # YAML randint bounds are inclusive: 32 must be reachable.
    assert space["batch_size"].lower == 8 and space["batch_size"].upper == 33
    assert space["backbone"] == "cnn3"
    assert (spec.metric, spec.mode, spec.seed, spec.num_samples) == ("val_macro_f1", "max", 3, 5)


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("num_samples: 5", "num_sample: 5", ["unknown key 'num_sample'", "num_samples"]),
        ("optimizer: {choice: [sgd, adam]}", "optimiser: {choice: [sgd, adam]}", ["params.optimiser", "optimizer"]),
        ("optimizer: {choice: [sgd, adam]}", "optimizer: {choice: [sdg, adam]}", ["'sdg'", "sgd", "rmsprop"]),
        ("lr: {loguniform: [1.0e-4, 1.0e-2]}", "lr: {logunifrom: [1.0e-4, 1.0e-2]}", ["logunifrom", "loguniform"]),
        ("lr: {loguniform: [1.0e-4, 1.0e-2]}", "lr: {loguniform: [0, 1.0e-2]}", ["> 0"]),
        ("num_samples: 5", "num_samples: ten", ["num_samples must be int", "'ten'"]),
        ("max_epochs: 4}", "max_epochs: four}", ["max_epochs", "int"]),
        ("metric: val_macro_f1", "metric: test_acc", ["not a validation metric", "test metrics never"]),
        ("mode: max", "mode: min", ["use mode: max"]),
        ("searcher: {type: optuna, seed: 3}", "searcher: {type: hyperopt}", ["searcher.type", "optuna, random, grid"]),
        ("resources: {cpu: 1, gpu: auto}", "resources: {cpu: 1, gpu: lots}", ["resources.gpu", "'auto'"]),
        ("batch_size: {randint: [8, 32]}", "batch_size: {grid: [8, 32]}", ["searcher: grid"]),
        ("trial: {backbone: cnn3, max_epochs: 4}", "trial: {backbone: resnet43, max_epochs: 4}", ["resnet34"]),
        ("equalize: hist,", "equalize: histogram,", ["data.equalize", "hist, clahe, none"]),
        ("equalize: hist,", "equalize: hist, duplicate_policy: dorp,", ["data.duplicate_policy", "drop, keep"]),
        ("equalize: hist,", "equalize: hist, resplit: maybe,", ["data.resplit must be bool"]),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_fix(tmp_path, old, new, expected):
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(CxrError) as err:
        load_space(path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_unknown_space_name_suggests_the_closest():
    with pytest.raises(CxrError, match="did you mean 'inception'|Did you mean 'inception'"):
        load_space("inceptoin")


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path):
    path = _write(tmp_path, GOOD.replace("optimizer: {choice: [sgd, adam]}", "optimizer: {choice: [sgd, adamm]}"))
    code = (
        "import sys\n"
        "from cxr_search.cli import main\n"
        "sys.argv = ['cxr-search', 'run', sys.argv[1], '--storage', sys.argv[2]]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('RAY_IMPORTED' if 'ray' in sys.modules else 'RAY_NOT_IMPORTED')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "exps")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "RAY_NOT_IMPORTED" in proc.stdout
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and "adamm" in err and "'adam'" in err
    assert not (tmp_path / "exps").exists()


def test_resplit_and_duplicate_policy_reach_the_data_plan(tmp_path):
    from cxr_search.experiment.plan import plan_run

    path = _write(tmp_path, GOOD.replace("equalize: hist,", "equalize: hist, duplicate_policy: keep,"))
    plan = plan_run(path, resplit=True, num_samples=1)
    assert plan.data.resplit is True and plan.data.duplicate_policy == "keep"
    assert plan_run(path, num_samples=1).data.resplit is False


def test_numbers_in_yaml_are_numbers_however_they_are_written(tmp_path):
    text = GOOD.replace("lr: {loguniform: [1.0e-4, 1.0e-2]}", "lr: {choice: [1e-3, 3e-4]}").replace(
        "trial: {backbone: cnn3, max_epochs: 4}", "trial: {backbone: cnn3, max_epochs: 4, weight_decay: 1e-4}")
    spec = load_space(_write(tmp_path, text))
    assert spec.trial["weight_decay"] == pytest.approx(1e-4)
    lr = next(p for p in spec.params if p.name == "lr")
    assert lr.values == (1e-3, 3e-4)
    fixed = load_space(_write(tmp_path, GOOD.replace("  lr: {loguniform: [1.0e-4, 1.0e-2]}\n", "").replace(
        "trial: {backbone: cnn3, max_epochs: 4}", "trial: {backbone: cnn3, max_epochs: 4, lr: 1e-3}")))
    assert fixed.trial["lr"] == pytest.approx(1e-3)


def test_a_word_where_a_number_belongs_is_one_line_naming_file_and_key(tmp_path):
    path = _write(tmp_path, GOOD.replace("trial: {backbone: cnn3, max_epochs: 4}",
                                         "trial: {backbone: cnn3, max_epochs: 4, weight_decay: fast}"))
    with pytest.raises(CxrError) as e:
        load_space(path)
    msg = str(e.value)
    assert str(path) in msg and "weight_decay" in msg and "'fast'" in msg and "\n" not in msg


def test_repeats_of_a_grid_point_get_distinct_seeds(tmp_path):
    text = """
    metric: val_loss
    searcher: {type: grid, seed: 1}
    scheduler: fifo
    num_samples: 2
    trial: {backbone: cnn3, max_epochs: 2}
    params:
      optimizer: {grid: [sgd, adam]}
      lr: {loguniform: [1.0e-4, 1.0e-2]}
    """
    spec = load_space(_write(tmp_path, text))
    trials = spec.planned_trials()
    assert [t["optimizer"] for t in trials] == ["sgd", "adam", "sgd", "adam"]
    by_point = {}
    for t in trials:
        by_point.setdefault(t["optimizer"], []).append(t["seed"])
    assert all(len(set(seeds)) == 2 for seeds in by_point.values())
    assert spec.planned_trials() == trials  # the plan is the same on every call (a resumed launch finds it)


def test_an_optuna_space_with_nothing_to_search_is_refused_before_ray(tmp_path):
    text = GOOD[: GOOD.index("params:")] + "params: {}\n"
    with pytest.raises(CxrError, match="searcher optuna needs at least one setting under 'params'"):
        load_space(_write(tmp_path, text))


def test_a_binary_file_is_not_a_search_space(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CxrError, match="not a text file"):
        load_space(path)


def test_gpu_auto_shares_grow_with_the_trials_batch_and_image_size():
    from cxr_search.tuning.resources import TRIAL_GPU_SHARE_MAX, TrialResources

    small, large = TrialResources(2, "auto", gpu_memory_gib=24, image_size=128), \
        TrialResources(2, "auto", gpu_memory_gib=24, image_size=256)
    # the study's trials (batch 32, 128 px) pack as tightly as allowed; a bigger batch or image takes more
    assert small.gpus_for("vgg19", 32) == 1 / TRIAL_GPU_SHARE_MAX
    assert small.gpus_for("vgg19", 32) < small.gpus_for("vgg19", 256) < large.gpus_for("vgg19", 256) == 1.0
    # the bundle Ray gets follows each trial's own config
    bundle = small({"backbone": "vgg19", "batch_size": 256}).bundles[0]
    assert bundle == {"CPU": 2, "GPU": small.gpus_for("vgg19", 256)}
    assert TrialResources(2, "auto", gpu_memory_gib=0)({"backbone": "vgg19"}).bundles[0] == {"CPU": 2}


def test_compile_settings_read_from_yaml_as_written(tmp_path):
    spec = load_space(_write(tmp_path, GOOD.replace("trial: {backbone: cnn3, max_epochs: 4}",
                                                    "trial: {backbone: cnn3, max_epochs: 4, compile: never}")))
    assert TrialConfig.from_dict(trial_fields(spec.trial)).compile == "never"
    with pytest.raises(CxrError, match="compile.*on/off.*true/false.*always"):  # YAML 1.1 reads `off` as false
        load_space(_write(tmp_path, GOOD.replace("trial: {backbone: cnn3, max_epochs: 4}",
                                                 "trial: {backbone: cnn3, max_epochs: 4, compile: off}")))
