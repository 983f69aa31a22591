"""Budgets: the --smoke size, a space's CPU budget applied to its settings, the budget line printed before a run,
and the rough time estimate of a plan on CPUs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_search.config import TrialConfig

if TYPE_CHECKING:  # the plan imports this module
    from cxr_search.experiment.plan import Plan

# The --smoke size: seconds per trial on a laptop CPU (80 px: inception_v3 needs >= 75).
SMOKE = {"n_images": 120, "size": 80, "num_samples": 4, "max_epochs": 2, "grace_period": 1,
         "max_concurrent_trials": 2, "top_k": 1, "seeds": 2, "retrain_max_epochs": 1}




# Training images per second of one CPU thread at 80 px, batch 32, bf16 autocast, per backbone: measured on the
# 2-core dev VM (AMD EPYC with AVX512-BF16), most while other jobs ran, so rough (inception_v3: 72-77 measured
# idle, two trials at once); `estimate_seconds` scales them.
CPU_IMG_PER_S_80PX = {"cnn3": 230.0, "alexnet": 330.0, "vgg16": 10.0, "vgg19": 7.0, "resnet34": 44.0,
                      "resnet50": 11.0, "inception_v3": 70.0, "xception": 35.0, "densenet121": 34.0}


_EVAL_COST = 0.35  # an evaluated image costs about a third of a trained one (no backward pass)


_TRIAL_START_S = 10.0  # process, model build, first batch


def estimate_seconds(plan: Plan, cpus: float) -> float:
    """A rough upper bound of a plan's wall time on CPUs only (every trial runs its full epoch budget).

    Args:
        plan: the plan.
        cpus: CPUs of the local Ray.
    """
    spec = plan.space
    if plan.data.data_dir is None:
        n_images = plan.data.n_images
    else:
        root = Path(plan.data.data_dir)
        n_images = sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 1000
    n_train = n_images * (1 - 0.2) * (1 - plan.data.val_fraction)
    n_val = n_images * 0.8 * plan.data.val_fraction
    threads = max(1.0, spec.cpus_per_trial)
    slots = max(1, min(spec.max_concurrent_trials or 10**6, int(cpus // threads) or 1))
    scale = (80 / plan.data.size) ** 2 * threads ** 0.8  # pixels; a second thread adds ~75%

    def trial_seconds(config: dict[str, Any]) -> float:
        cfg = {**spec.trial, **config}
        rate = CPU_IMG_PER_S_80PX.get(cfg.get("backbone", TrialConfig.backbone), 20.0) * scale
        per_epoch = n_train * (2.0 if cfg.get("balance", TrialConfig.balance) == "oversample" else 1.0)
        epochs = int(cfg.get("max_epochs", TrialConfig.max_epochs))
        return _TRIAL_START_S + epochs * (per_epoch + _EVAL_COST * n_val) / rate

    if spec.searcher == "optuna":
        search = [trial_seconds({}) for _ in range(spec.num_samples)]
    else:
        search = [trial_seconds(t) for t in spec.planned_trials()]
    retrain_cfg = {"max_epochs": plan.retrain_max_epochs} if plan.retrain_max_epochs else {}
    retrain = [trial_seconds(retrain_cfg)] * (plan.top_k * plan.seeds) if "retrain" in plan.stages else []
    return 60.0 + sum(search) / slots + sum(retrain) / slots




def as_mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {"type": value}


def set_epochs(raw: dict[str, Any], max_epochs: int) -> None:
    raw.setdefault("trial", {})["max_epochs"] = max_epochs
    sched = as_mapping(raw.get("scheduler", {"type": "asha"}))
    if sched.get("type", "asha") == "asha":
        sched["max_t"] = max_epochs
        sched["grace_period"] = min(int(sched.get("grace_period", 1)), max_epochs)
    raw["scheduler"] = sched


def apply_budget(raw: dict[str, Any], budget: dict[str, Any], phantoms: bool) -> None:
    if not budget:
        return
    raw.pop("cpu_budget", None)
    data = dict(raw.get("data") or {})
    if "size" in budget:
        data["size"] = budget["size"]
    if "n_images" in budget and phantoms:
        data["n_images"] = budget["n_images"]
    raw["data"] = data
    if "num_samples" in budget:
        raw["num_samples"] = budget["num_samples"]
    if "max_trials" in budget:
        raw["max_trials"] = budget["max_trials"]
    if "max_concurrent_trials" in budget:
        raw["max_concurrent_trials"] = budget["max_concurrent_trials"]
    # A laptop has few cores: one per trial, so two trials run side by side and ASHA can compare them.
    raw["resources"] = {**(raw.get("resources") or {}), "cpu": 1}
    if "max_epochs" in budget:
        set_epochs(raw, budget["max_epochs"])
    if "grace_period" in budget:
        raw["scheduler"] = {**as_mapping(raw.get("scheduler", "asha")), "grace_period": budget["grace_period"]}
        if raw["scheduler"].get("type", "asha") == "fifo":
            raw["scheduler"].pop("grace_period")
    trial = {**(raw.get("trial") or {}), **(budget.get("trial") or {})}
    params = {k: v for k, v in (raw.get("params") or {}).items() if k not in (budget.get("trial") or {})}
    for key, domain in (budget.get("params") or {}).items():
        params[key] = domain
        trial.pop(key, None)
    raw["trial"], raw["params"] = trial, params
    if not params:
        raw.pop("params")
