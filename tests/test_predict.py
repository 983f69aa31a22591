"""`cxr-search predict`: files on disk -> the very probabilities the ensemble was evaluated with; bad files get reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, log_loss
from test_engine import _few_threads  # noqa: F401  (autouse: torch on 2 threads, as in the engine tests)
from typer.testing import CliRunner

from cxr_search import CLASSES, predict
from cxr_search.cli import app
from cxr_search.config import TrialConfig
from cxr_search.data.prepare import prepare
from cxr_search.data.preprocess import PREPROCESSING_FILE, Preprocessing
from cxr_search.ensemble import apply_temperature, build_ensemble, load_member, soft_vote
from cxr_search.errors import CxrError
from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.plan import DataConfig
from cxr_search.experiment.results import finalize
from cxr_search.io.layout import PLAN_FILE
from cxr_search.training.loop import fit

SIZE = 32


def train_member(data, folder: Path, seed: int, epochs: int = 2, batch_size: int = 16) -> Path:
    """Train a tiny cnn3 and leave what a search trial leaves: its model folder (weights + preprocessing)."""
    cfg = TrialConfig.from_dict(dict(backbone="cnn3", device="cpu", deterministic=True, batch_size=batch_size,
                                     max_epochs=epochs, optimizer="adam", lr=3e-3 * (1 + seed), seed=seed,
                                     eval_batch_size=64))  # distinct configurations: an ensemble counts each once
    fit(cfg, data, checkpoint_dir=folder)
    return folder


def finished_experiment(root: Path, data, n_members: int = 2, epochs: int = 2, batch_size: int = 16) -> Path:
    """An experiment folder as a search leaves it (trial folders, predictions/, results.parquet), then its ensemble."""
    from test_ensemble import make_plan

    exp = Experiment.create(make_plan().replace(data=DataConfig(size=SIZE)), root)
    for i in range(n_members):
        train_member(data, exp.path / f"trial_{i:04d}", seed=i, epochs=epochs, batch_size=batch_size)
    finalize(exp.path, data, exp.objective)  # what the search stage does after its trials
    build_ensemble(exp.path, top_k=n_members, source="search", weights="val", calibrate=True, n_resamples=20)
    return exp.path


@pytest.fixture(scope="module")
def data(tiny_phantoms):
    return prepare(tiny_phantoms, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def exp_path(tmp_path_factory, data) -> Path:
    return finished_experiment(tmp_path_factory.mktemp("predict"), data)


def stored_test_probabilities(exp: Path) -> np.ndarray:
    """The ensemble's test probabilities from what the experiment stored: member predictions, weights, temperature."""
    ens = json.loads((exp / "ensemble" / "ensemble.json").read_text())
    members = [load_member(exp / "predictions" / f"{m['trial_id']}.npz") for m in ens["members"]]
    return apply_temperature(soft_vote([m.test_probs for m in members], [m["weight"] for m in ens["members"]]),
                             ens["temperature"])


def test_predict_on_the_test_files_equals_the_ensembles_stored_test_probabilities(exp_path, data):
    predictor = predict.load(exp_path, device="cpu")
    assert predictor.kind == "ensemble" and len(predictor.members) == 2
    assert predictor.temperature != 1.0  # the stored temperature is applied, not ignored
    table = predict.predict_files(predictor, list(data.test.paths), progress=False)  # decoded from disk
    assert (table["error"] == "").all() and table["path"].tolist() == list(data.test.paths)
    probs = table[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, stored_test_probabilities(exp_path), atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert table["predicted"].tolist() == [CLASSES[k] for k in probs.argmax(1)]
    # and the figures ensemble.json reports for its test set are those of these probabilities
    saved = json.loads((exp_path / "ensemble" / "ensemble.json").read_text())
    assert saved["metrics"]["acc"][0] == pytest.approx(accuracy_score(data.test.labels, probs.argmax(1)), abs=1e-12)
    assert saved["metrics"]["nll"][0] == pytest.approx(log_loss(data.test.labels, probs, labels=[0, 1, 2]), abs=1e-5)


def test_ensemble_and_checkpoints_record_the_training_preprocessing(exp_path, data):
    saved = json.loads((exp_path / "ensemble" / "ensemble.json").read_text())
    assert saved["preprocessing"] == data.preprocessing
    record = json.loads((exp_path / "trial_0000" / PREPROCESSING_FILE).read_text())
    assert record == data.preprocessing and record["size"] == SIZE and record["equalize"] == "hist"
    assert record["albumentations"]["transform"]["__class_fullname__"] == "Compose"


def test_a_checkpoint_folder_predicts_alone_with_its_recorded_preprocessing(exp_path, data):
    ckpt = exp_path / "trial_0001"
    predictor = predict.load(ckpt, device="cpu")
    assert predictor.kind == "checkpoint" and predictor.temperature == 1.0
    assert predictor.preprocessing == Preprocessing.build(SIZE, "hist")
    table = predict.predict_files(predictor, list(data.val.paths), progress=False)
    with np.load(exp_path / "predictions" / "0001.npz") as z:
        np.testing.assert_allclose(table[[f"p_{c}" for c in CLASSES]].to_numpy(), z["val_probs"], atol=1e-5)


def test_models_without_a_record_fall_back_to_the_experiment_plans_data_settings(exp_path, data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exp_path, old)
    ens_file = old / "ensemble" / "ensemble.json"
    ens = json.loads(ens_file.read_text())
    ens.pop("preprocessing")
    for m in ens["members"]:  # the copy's own model folders, without their preprocessing.json
        m["checkpoint_dir"] = str(old / Path(m["checkpoint_dir"]).relative_to(exp_path))
        (Path(m["checkpoint_dir"]) / PREPROCESSING_FILE).unlink()
    ens_file.write_text(json.dumps(ens))
    table = predict.predict_files(predict.load(old, device="cpu"), list(data.test.paths), progress=False)
    np.testing.assert_allclose(table[[f"p_{c}" for c in CLASSES]].to_numpy(), stored_test_probabilities(exp_path),
                               atol=1e-5)
    (old / PLAN_FILE).unlink()  # and with no plan either, nothing says how to prepare an image
    with pytest.raises(CxrError, match="no recorded preprocessing"):
        predict.load(old, device="cpu")


def _dicom(path: Path, pixels: np.ndarray) -> Path:
    from test_data_bad_inputs import write_dicom

    return write_dicom(path, pixels, photometric="MONOCHROME2")


@pytest.fixture
def mixed_folder(tmp_path, data) -> Path:
    """Good images (PNG, JPEG, a DICOM, one in a subfolder) and bad ones (corrupt PNG, empty, text as .png)."""
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    Image.open(data.test.paths[0]).save(folder / "a.png")
    Image.open(data.test.paths[1]).save(folder / "sub" / "b.png")
    Image.open(data.test.paths[2]).convert("L").save(folder / "c.jpg", quality=95)
    _dicom(folder / "d.dcm", np.asarray(Image.open(data.test.paths[3]).convert("L"), np.uint16) * 16)  # 12-bit
    png = (folder / "a.png").read_bytes()
    (folder / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a radiology report, not an image\n")
    (folder / "README.txt").write_text("not an image suffix: skipped in folders")
    return folder


def test_a_folder_of_good_and_bad_files_gives_probabilities_or_a_reason_and_exit_1(exp_path, mixed_folder, tmp_path):
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(app, ["predict", str(exp_path), str(mixed_folder), "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 1, result.output  # some files failed
    table = pd.read_csv(out, keep_default_na=False)
    names = [Path(p).name for p in table["path"]]
    assert sorted(names) == ["a.png", "b.png", "c.jpg", "corrupt.png", "d.dcm", "empty.png", "notes.png"]
    reasons = dict(zip(names, table["error"], strict=True))
    assert "empty file" in reasons["empty.png"]
    assert "not a supported image" in reasons["notes.png"]
    assert "corrupt or truncated" in reasons["corrupt.png"]
    good = table[table["error"] == ""]
    assert sorted(Path(p).name for p in good["path"]) == ["a.png", "b.png", "c.jpg", "d.dcm"]
    probs = good[[f"p_{c}" for c in CLASSES]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert set(good["predicted"]) <= set(CLASSES)
    assert (table.loc[table["error"] != "", [f"p_{c}" for c in CLASSES]] == "").all().all()  # no numbers for them


def test_json_output_and_exit_0_when_every_file_is_usable(exp_path, data):
    files = [str(p) for p in data.test.paths[:3]]
    result = CliRunner().invoke(app, ["predict", str(exp_path / "ensemble" / "ensemble.json"), *files, "--json",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == files and all(r["error"] == "" for r in rows)
    assert all(abs(sum(r[f"p_{c}"] for c in CLASSES) - 1) < 1e-5 for r in rows)


def test_bad_sources_are_one_line_errors(exp_path, tmp_path):
    with pytest.raises(CxrError, match="does not exist"):
        predict.load(tmp_path / "nope")
    (tmp_path / "exp2").mkdir()
    shutil.copy(exp_path / "results.parquet", tmp_path / "exp2" / "results.parquet")
    with pytest.raises(CxrError, match="cxr-search ensemble"):
        predict.load(tmp_path / "exp2")
    with pytest.raises(CxrError, match="no trained model here"):
        predict.load(tmp_path)  # neither ensemble nor model folder
    with pytest.raises(CxrError, match="does not exist"):
        predict.list_inputs([tmp_path / "missing.png"])
