"""Training engine: augmentation geometry, resume equals an uninterrupted run, early stopping, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from cxr_search.config import TrialConfig
from cxr_search.data.augment import augment_batch, random_affine_matrices, warp
from cxr_search.data.prepare import PreparedData, SplitArrays
from cxr_search.metrics import classification_metrics
from cxr_search.training import compiling
from cxr_search.training.compiling import COMPILE_MIN_STEPS, compile_mode, planned_steps
from cxr_search.training.early_stopping import storable
from cxr_search.training.evaluation import evaluate, predict_proba
from cxr_search.training.faults import faults_from_env
from cxr_search.training.loop import FitResult, fit
from cxr_search.training.model_folder import (
    RESUME_FILE,
    CheckpointWriter,
    best_files,
    load_best_model,
    read_history,
    read_resume_state,
    seal,
)

REPORT_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_macro_f1",
    "val_normal_recall",
    "val_covid_recall_vs_pneumonia",
    "epoch_time_s",
    "img_per_s",
    "stop_reason",
    "lr",
}


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _split(rng: np.random.Generator, n: int, size: int, learnable: bool) -> SplitArrays:
    labels = np.arange(n) % 3
    rng.shuffle(labels)
    images = rng.integers(0, 200, (n, size, size), dtype=np.uint8)
    if learnable:  # class c faintly brightens a class-specific band: learnable, but not in one epoch
        for c in range(3):
            band = slice(c * size // 3, (c + 1) * size // 3)
            images[labels == c, band, :] += 12
    else:
        labels = rng.permutation(labels)  # pure noise: the model can only memorise
    return SplitArrays(
        images,
        labels.astype(np.int64),
        np.array([f"p{i}" for i in range(n)]),
        np.array([f"img{i}.png" for i in range(n)]),
    )


def _data(n_train=96, n_eval=48, size=32, learnable=True, seed=0) -> PreparedData:
    rng = np.random.default_rng(seed)
    return PreparedData(
        _split(rng, n_train, size, learnable),
        _split(rng, n_eval, size, learnable),
        _split(rng, n_eval, size, learnable),
        image_size=size,
    )


def _cfg(**changes) -> TrialConfig:
    base = dict(
        backbone="cnn3",
        device="cpu",
        deterministic=True,
        batch_size=16,
        max_epochs=4,
        optimizer="adam",
        lr=3e-3,
        eval_batch_size=64,
    )
    return TrialConfig(**{**base, **changes})


def _fit_recording(cfg, data, folder, **kwargs):
    """fit() into a model folder, recording each epoch's report (metrics, and the files on disk at that moment)."""
    reported, on_disk = [], []

    def report(metrics, history):
        assert history[-1] == metrics
        reported.append(metrics)
        on_disk.append(read_history(folder))

    return fit(cfg, data, on_epoch=report, checkpoint_dir=folder, **kwargs), reported, on_disk


# ---------------------------------------------------------------- augmentation


def test_augment_is_identity_when_magnitudes_are_zero():
    x = torch.rand(4, 2, 17, 23)
    out = augment_batch(x, rotation_deg=0, shear_deg=0, zoom=0)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_preserves_shape_and_dtype(dtype):
    x = torch.rand(3, 3, 24, 24, dtype=dtype)
    out = augment_batch(x, rotation_deg=10, shear_deg=10, zoom=0.1)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


def test_augment_draws_a_different_transform_per_sample():
    x = torch.rand(1, 1, 32, 32).expand(6, -1, -1, -1).contiguous()  # six copies of one image
    out = augment_batch(x, rotation_deg=10, shear_deg=10, zoom=0.1)
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(6) for j in range(i + 1, 6))


def test_augment_refuses_uint8():
    with pytest.raises(TypeError, match="floating"):
        augment_batch(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), rotation_deg=1, shear_deg=1, zoom=0.1)


def test_warp_matches_scipy_affine_transform():
    """Keras warps with scipy.ndimage.affine_transform (bilinear, edge-repeat); the batched warp agrees."""
    gen = torch.Generator().manual_seed(1)
    h, w = 20, 28
    images = torch.rand(3, 1, h, w, generator=gen, dtype=torch.float64)
    mats = random_affine_matrices(3, rotation_deg=30, shear_deg=20, zoom=0.2, generator=gen)
    out = warp(images, mats)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    for i in range(3):
        m = mats[i].double().numpy()[::-1, ::-1]  # (x, y) matrix -> (row, col) matrix
        ref = scipy.ndimage.affine_transform(
            images[i, 0].numpy(), m, offset=centre - m @ centre, order=1, mode="nearest"
        )
        np.testing.assert_allclose(out[i, 0].numpy(), ref, atol=1e-6)


# ---------------------------------------------------------------- optimisation


def test_cosine_schedule_and_report_keys(tmp_path):
    result, reported, on_disk = _fit_recording(_cfg(lr_schedule="cosine", max_epochs=3, patience=10), _data(), tmp_path)
    assert [set(m) for m in reported] == [REPORT_KEYS] * 3
    expected = [3e-3 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    np.testing.assert_allclose([m["lr"] for m in reported], expected)
    assert [m["stop_reason"] for m in reported] == ["", "", "max_epochs"]
    assert result.stop_reason == "max_epochs" and len(result.history) == 3
    # each epoch is on disk before it is reported
    assert [len(h) for h in on_disk] == [1, 2, 3] and on_disk[-1] == reported


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
def test_every_optimizer_trains_with_each_balance_mode(optimizer):
    balance = {"sgd": "class_weight", "rmsprop": "oversample", "adamw": "none"}[optimizer]
    cfg = _cfg(
        optimizer=optimizer,
        lr=0.05 if optimizer == "sgd" else 3e-3,
        balance=balance,
        max_epochs=3,
        regularizer="l2",
        reg_strength=1e-3,
        deterministic=False,
    )
    result = fit(cfg, _data())
    losses = [m["train_loss"] for m in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


# ---------------------------------------------------------------- resume, early stopping, checkpoints


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    result, _, _ = _fit_recording(_cfg(patience=10), _data(), root)
    return result, root


def _assert_same_run(a: FitResult, b: FitResult) -> None:
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "stop_reason"):
        assert [m[key] for m in a.history] == [m[key] for m in b.history], key
    assert a.best_epoch == b.best_epoch and a.stop_reason == b.stop_reason
    assert a.test == b.test
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    np.testing.assert_array_equal(a.val_probs, b.val_probs)


def _faults(**fault):
    return faults_from_env(json.dumps(fault))


def test_a_fault_mid_epoch_then_a_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    full, _ = uninterrupted
    cfg = _cfg(patience=10)
    faults = _faults(kind="raise", epoch=3)
    with pytest.raises(RuntimeError, match="fault injected at epoch 3"):
        _fit_recording(cfg, _data(), tmp_path, faults=faults)
    assert [m["epoch"] for m in read_history(tmp_path)] == [1, 2]
    assert read_resume_state(tmp_path)["epoch"] == 2
    # the retry (same folder, same faults) resumes after epoch 2; the fault fires once per folder
    resumed, reported, _ = _fit_recording(cfg, _data(), tmp_path, faults=faults)
    assert [m["epoch"] for m in reported] == [3, 4]
    _assert_same_run(full, resumed)
    assert [m["epoch"] for m in read_history(tmp_path)] == [1, 2, 3, 4]


def test_a_resume_discards_what_an_attempt_wrote_after_its_last_resume_state(uninterrupted, tmp_path):
    full, _ = uninterrupted
    cfg = _cfg(patience=10)
    # resume states only every 2 epochs: the attempt dies in epoch 4 with epoch 3 on disk but no state for it
    with pytest.raises(RuntimeError):
        fit(cfg, _data(), checkpoint_dir=tmp_path, checkpoint_every=2, faults=_faults(kind="raise", epoch=4))
    assert len(read_history(tmp_path)) == 3 and read_resume_state(tmp_path)["epoch"] == 2
    resumed = fit(cfg, _data(), checkpoint_dir=tmp_path, checkpoint_every=2)
    _assert_same_run(full, resumed)
    assert [m["epoch"] for m in read_history(tmp_path)] == [1, 2, 3, 4]  # epoch 3 once


def test_a_fault_marked_always_fires_on_every_attempt(tmp_path):
    faults = _faults(kind="raise", epoch=1, always=True, match={"backbone": "cnn3"})
    for _ in range(2):
        with pytest.raises(RuntimeError, match="fault injected"):
            fit(_cfg(max_epochs=1), _data(), checkpoint_dir=tmp_path, faults=faults)
    fit(_cfg(max_epochs=1, backbone="alexnet", deterministic=False), _data(n_train=24, n_eval=12),
               faults=faults)  # another config is not matched


def test_resuming_a_finished_run_trains_no_more(uninterrupted):
    full, root = uninterrupted
    again = fit(_cfg(patience=10), _data(), checkpoint_dir=root,
                       on_epoch=lambda m, h: pytest.fail("no epoch should run"))
    _assert_same_run(full, again)


def test_compile_auto_compiles_only_small_batch_gpu_runs_long_enough_to_win_it_back():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    long_run, short_run = COMPILE_MIN_STEPS, COMPILE_MIN_STEPS - 1
    assert compile_mode(_cfg(batch_size=32), gpu, long_run) == "reduce-overhead"  # CUDA graphs
    assert compile_mode(_cfg(batch_size=32), gpu, short_run) is None  # the compile would not pay
    assert compile_mode(_cfg(batch_size=256), gpu, long_run) is None  # not launch-bound
    assert compile_mode(_cfg(batch_size=32), cpu, long_run) is None  # a cold compile outlasts a CPU-budget trial
    assert compile_mode(_cfg(batch_size=32, compile="always"), cpu, 1) == "default"
    assert compile_mode(_cfg(batch_size=32, compile="never"), gpu, long_run) is None
    # a 100-epoch trial of the study (5,145 training images, batch 32) compiles; a 4-epoch ASHA rung does not
    study = TrialConfig(batch_size=32, max_epochs=100)
    assert planned_steps(5145, study) >= COMPILE_MIN_STEPS > planned_steps(5145, study.replace(
        max_epochs=4))


def test_a_compiled_run_trains_the_same_model_and_saves_a_plain_checkpoint(uninterrupted, tmp_path, monkeypatch):
    graphs = []

    def capturing_backend(gm, example_inputs):  # Dynamo's captured graph, run as is: what compiling changes
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", capturing_backend)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    result, _, _ = _fit_recording(_cfg(patience=10, compile="always"), _data(), tmp_path / "run")
    assert graphs, "the training steps did not run through torch.compile"
    _assert_same_run(result, uninterrupted[0])
    model, cfg = load_best_model(tmp_path / "run")  # plain keys, no torch.compile wrapper names
    assert cfg.compile == "always" and not any("_orig_mod" in k for k in model.state_dict())


def test_a_model_that_fails_to_compile_trains_eagerly_and_says_so(uninterrupted, tmp_path, monkeypatch, caplog):
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiling, "COMPILE_BACKEND", failing_backend)
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="cxr_search.training.compiling"):
        result, _, _ = _fit_recording(_cfg(patience=10, compile="always"), _data(), tmp_path / "run")
    _assert_same_run(result, uninterrupted[0])
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "compile: never" in warnings[0]


def test_a_finished_folder_keeps_its_best_weights_only(uninterrupted):
    full, root = uninterrupted
    state = torch.load(root / RESUME_FILE, weights_only=True)
    assert state["finished"] and "optimizer" not in state and "model" not in state
    assert [e for e, _ in best_files(root)] == [full.best_epoch]
    assert not list(root.glob(".*tmp*"))  # atomic writes leave no temporaries behind
    model, cfg = load_best_model(root)
    ev = evaluate(model, _data().test, cfg=cfg)
    assert ev.metrics == pytest.approx(full.test, rel=1e-5, nan_ok=True)
    assert ev.probs.dtype == np.float32 and ev.probs.shape == (48, 3)


def test_best_weights_are_kept_in_half_precision_unless_a_value_does_not_fit():
    small = torch.tensor([0.5, -1.25e-3, 3.0])
    big = torch.tensor([1.0, 7.0e4])  # e.g. a BatchNorm running variance early in training
    assert storable(small).dtype == torch.float16
    assert torch.equal(storable(big), big)  # float16 would turn 70000 into inf
    assert storable(torch.tensor([1, 2])).dtype == torch.int64


def test_checkpoints_by_time_skip_epochs_but_the_end_is_always_written(tmp_path):
    written = []
    real = CheckpointWriter._write_state

    def spy(self, state):
        written.append((state["epoch"], state["finished"]))
        real(self, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointWriter, "_write_state", spy)
        fit(_cfg(max_epochs=4, patience=10), _data(), checkpoint_dir=tmp_path, checkpoint_every_s=3600)
    assert written == [(4, True)]  # an hour between resume states: only the final, lean one


def test_seal_makes_a_scheduler_stopped_run_lean_with_its_newest_best_weights(tmp_path):
    # a run stopped from outside after epoch 3 (as ASHA does), its last resume state at epoch 2
    class Stop(Exception):
        pass

    def report(metrics, history):
        if metrics["epoch"] == 3:
            raise Stop

    with pytest.raises(Stop):
        fit(_cfg(patience=10), _data(), checkpoint_dir=tmp_path, checkpoint_every=2, on_epoch=report)
    history = read_history(tmp_path)
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    seal(tmp_path)
    state = read_resume_state(tmp_path)
    assert state["finished"] and state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert [e for e, _ in best_files(tmp_path)] == [best]
    load_best_model(tmp_path)


def test_early_stopping_waits_patience_epochs_and_tests_the_best_weights(tmp_path):
    # Random labels: the model can only memorise the training set, so validation loss soon rises.
    data = _data(learnable=False)
    cfg = _cfg(patience=2, max_epochs=30, lr=1e-2, augment=False, balance="none")
    result, _, _ = _fit_recording(cfg, data, tmp_path)
    val_losses = [m["val_loss"] for m in result.history]
    best = result.best_epoch
    assert result.stop_reason == "early_stopping" and result.history[-1]["stop_reason"] == "early_stopping"
    assert len(result.history) == best + cfg.patience < cfg.max_epochs
    assert val_losses[best - 1] == min(val_losses) and result.best_val["loss"] == val_losses[best - 1]
    assert all(v >= val_losses[best - 1] for v in val_losses[best:])

    model, loaded_cfg = load_best_model(tmp_path)
    assert loaded_cfg == cfg and not model.training
    test_probs = predict_proba(model, data.test.images, cfg=loaded_cfg)
    np.testing.assert_allclose(test_probs, result.test_probs, atol=1e-6)
    assert result.test == pytest.approx(
        classification_metrics(data.test.labels, test_probs), rel=1e-5, nan_ok=True
    )
    val_probs = predict_proba(model, data.val.images, cfg=loaded_cfg, batch_size=7)
    np.testing.assert_allclose(val_probs, result.val_probs, atol=1e-6)
    assert result.best_val["macro_f1"] == pytest.approx(result.history[best - 1]["val_macro_f1"])


def test_model_smaller_than_the_input_minimum_is_upsampled_on_the_device():
    # AlexNet needs >= 63 px; a 32 px smoke data set must still train and evaluate.
    result = fit(
        _cfg(backbone="alexnet", max_epochs=1, deterministic=False), _data(n_train=24, n_eval=12)
    )
    assert result.test_probs.shape == (12, 3)
    np.testing.assert_allclose(result.test_probs.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_cnn3_learns_the_phantoms_within_a_few_cpu_epochs(tmp_path, monkeypatch):
    from cxr_search.data import phantoms
    from cxr_search.data.prepare import prepare

    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))
    phantoms.generate(tmp_path / "phantoms", n_images=400, size=96, difficulty="easy", progress=False)
    data = prepare(tmp_path / "phantoms", size=48, progress=False)
    cfg = TrialConfig(backbone="cnn3", device="cpu", max_epochs=6, optimizer="adam", lr=2e-3, augment=False)
    result = fit(cfg, data)
    assert result.best_val["macro_f1"] > 0.6  # chance is 1/3
    assert result.test["macro_f1"] > 0.5


@pytest.mark.slow
def test_train_command_smoke_saves_a_loadable_checkpoint(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from cxr_search.cli import app

    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--backbone", "cnn3", "--smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "test acc" in res.output
    saved = json.loads((out / "result.json").read_text())
    model, cfg = load_best_model(out)
    assert cfg.backbone == "cnn3" and len(saved["history"]) == cfg.max_epochs
    assert set(saved["test"]) >= {"acc", "normal_recall", "covid_recall_vs_pneumonia"}
