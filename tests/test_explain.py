"""Explanations: Grad-CAM on every backbone, reproducible LIME, faithfulness on lesion masks, the shortcut probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lime.lime_image import LimeImageExplainer
from PIL import Image
from test_predict import _few_threads, finished_experiment  # noqa: F401  (same threads, same experiment)
from typer.testing import CliRunner

from cxr_search import CLASSES, explain, predict
from cxr_search.cli import app
from cxr_search.config import BACKBONES, TrialConfig
from cxr_search.data import phantoms
from cxr_search.data.decode import decode
from cxr_search.data.prepare import prepare
from cxr_search.data.preprocess import Preprocessing
from cxr_search.models.registry import create_model

SIZE = 48  # lesions cover ~4% of the image: pointing at them by chance is rare
EPOCHS = 6  # enough for cnn3 to find lesions, or the marker when it is there


def hand_predictor(backbone: str, size: int, **model_args) -> predict.Predictor:
    """A one-member predictor around a freshly built model (no checkpoint needed to test the maps)."""
    torch.manual_seed(0)
    cfg = TrialConfig.from_dict({"backbone": backbone, "device": "cpu", **model_args})
    model = create_model(backbone, freeze_fraction=cfg.freeze_fraction).eval()
    member = predict.Member(backbone, model, cfg, 1.0, Path("."))
    return predict.Predictor(Path("."), "checkpoint", [member], 1.0, CLASSES, Preprocessing.build(size, "hist"), "cpu")


@pytest.fixture(scope="module")
def images64(tiny_phantoms) -> np.ndarray:
    prep = Preprocessing.build(64, "hist")
    return np.stack([prep(decode(p)) for p in sorted((tiny_phantoms / "train" / "PNEUMONIA").glob("*"))[:3]])


def test_the_target_layer_table_names_a_layer_of_every_backbone():
    assert tuple(explain.TARGET_LAYERS) == BACKBONES


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradcam_runs_for_every_backbone(backbone, images64):
    predictor = hand_predictor(backbone, 64)
    assert isinstance(explain.target_layer(predictor.members[0].model), torch.nn.Module)
    maps = explain.gradcam_maps(predictor, images64, [0, 1, 2])  # inception/alexnet: upsampled to their minimum
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert (maps.reshape(3, -1).std(1) > 0).any()  # a spatial map, not a constant


def test_gradcam_reaches_a_frozen_backbone(images64):
    predictor = hand_predictor("cnn3", 64, freeze_fraction=1.0)
    assert not any(p.requires_grad for p in predictor.members[0].model.backbone.parameters())
    maps = explain.gradcam_maps(predictor, images64, [0, 1], method="hirescam")
    assert (maps.reshape(2, -1).std(1) > 0).all()


def test_lime_with_a_fixed_seed_gives_the_same_map_twice(images64):
    predictor = hand_predictor("cnn3", 64)
    a, seg_a = explain.lime_map(predictor, images64[0], 1, samples=40, seed=3)
    b, seg_b = explain.lime_map(predictor, images64[0], 1, samples=40, seed=3)
    c, _ = explain.lime_map(predictor, images64[0], 1, samples=40, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(seg_a, seg_b)
    assert not np.array_equal(a, c)
    assert a.shape == (64, 64) and 20 <= len(np.unique(seg_a)) <= explain.LIME_SEGMENTS * 2


def test_batched_lime_neighbourhood_equals_limes_own(images64):
    """The faster neighbourhood draws the same samples and asks the classifier about the same images as lime's."""
    from skimage.color import gray2rgb
    from skimage.segmentation import slic

    rgb = gray2rgb(images64[0])
    segments = slic(rgb, n_segments=explain.LIME_SEGMENTS, compactness=10.0, start_label=0)
    fudged = np.zeros_like(rgb)
    seen = {"ours": [], "lime": []}

    def classifier(name):
        def fn(batch):
            assert batch.dtype == np.uint8 and batch.shape[1:] == rgb.shape
            seen[name].append(batch.copy())
            return np.tile([0.2, 0.3, 0.5], (len(batch), 1)) * (1 + batch.mean((1, 2, 3)))[:, None]
        return fn

    ours = explain._lime_explainer_class()(random_state=7).data_labels(rgb, fudged, segments, classifier("ours"), 25,
                                                                         batch_size=10)
    ref = LimeImageExplainer(random_state=7).data_labels(rgb, fudged, segments, classifier("lime"), 25, batch_size=10)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_array_equal(np.concatenate(seen["ours"]), np.concatenate(seen["lime"]))


def test_pointing_game_and_mass_share_on_known_maps():
    region = np.zeros((10, 10), bool)
    region[2:5, 2:5] = True
    peak = np.zeros((10, 10))
    peak[3, 3] = 1.0
    assert explain.pointing_hit(peak, region) and explain.mass_share(peak, region) == 1.0
    peak[3, 3], peak[8, 8] = 0.5, 1.0
    assert not explain.pointing_hit(peak, region) and explain.mass_share(peak, region) == pytest.approx(1 / 3)
    empty = np.zeros((10, 10))
    assert not explain.pointing_hit(empty, region)
    assert explain.mass_share(empty, region) == pytest.approx(region.mean())  # no evidence: a uniform map's score


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain-phantoms")
    out = {}
    for name, inject in (("clean", ()), ("confounder", ("confounder",))):
        phantoms.generate(root / name, n_images=240, size=SIZE, seed=0, difficulty="easy", inject=inject,
                          progress=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_sets) -> dict[str, tuple[Path, object]]:
    """One cnn3 per phantom set, trained briefly, as an experiment with a one-member ensemble."""
    out = {}
    for name, folder in phantom_sets.items():
        data = prepare(folder, size=SIZE, progress=False)
        out[name] = (finished_experiment(tmp_path_factory.mktemp(name), data, n_members=1, epochs=EPOCHS,
                                         batch_size=32), data)
    return out


def _all_splits(data):
    parts = (data.train, data.val, data.test)
    return (np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
            np.concatenate([p.paths for p in parts]))


def test_trained_model_points_at_lesions_better_than_an_untrained_one(trained):
    exp, data = trained["clean"]
    images, labels, paths = _all_splits(data)  # every image with a lesion: tighter intervals
    table, probe = explain.evaluate_faithfulness(predict.load(exp, device="cpu"), images, labels, paths, n=200,
                                                 methods=("hirescam",), n_resamples=500)
    rows = {(r["method"], r["model"]): r for r in table.to_dict("records")}
    ours, baseline = rows[("hirescam", "trained")], rows[("hirescam", "untrained")]
    assert ours["n_images"] > 100
    assert ours["pointing_game_lo"] > baseline["pointing_game_hi"]  # intervals apart
    assert ours["lesion_mass"] > baseline["lesion_mass"]
    assert ours["pointing_game"] > 3 * ours["chance"]  # far above a random point
    assert not probe["flagged"] and probe["n_marked"] == 0  # no marker in this set, none found


def test_the_probe_flags_a_confounder_marker_and_summary_md_leads_with_the_warning(trained, phantom_sets):
    exp, _ = trained["confounder"]
    result = CliRunner().invoke(app, ["explain", str(exp), "--evaluate", "--data", str(phantom_sets["confounder"]),
                                      "--method", "hirescam,lime", "--samples", "40", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((exp / "explain" / "faithfulness.json").read_text())
    assert saved["shortcut"]["flagged"] and saved["shortcut"]["n_marked"] > 0
    table = (exp / "explain" / "faithfulness.csv").read_text()
    assert table.startswith("method,model,") and table.count("\n") == 5  # header + 2 methods x (trained, untrained)
    summary = (exp / "summary.md").read_text().splitlines()
    assert summary[0].startswith("# cxr-search summary")
    assert explain.SHORTCUT_WARNING in summary[2]  # at the top, before data warnings and results
    assert "## Explanations: faithfulness on phantom lesion masks" in summary


def test_the_probe_stays_quiet_without_a_confounder(trained, phantom_sets):
    exp, data = trained["clean"]
    _, probe = explain.evaluate_faithfulness(predict.load(exp, device="cpu"), data.test.images, data.test.labels,
                                             data.test.paths, methods=("hirescam",), n_resamples=200)
    assert not probe["flagged"]
    assert probe["methods"]["hirescam"]["marker_mass"][0] < explain.SHORTCUT_SHARE / 2


def test_explain_command_writes_overlays_maps_and_a_contact_sheet(trained, tmp_path):
    exp, data = trained["clean"]
    files = [str(p) for p in data.test.paths[:3]]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "maps"
    result = CliRunner().invoke(app, ["explain", str(exp), *files, str(bad), "--method", "lime", "--samples", "30",
                                      "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output  # one file was unusable
    pngs = sorted(out.glob("000*_*.lime.png"))
    maps = sorted(out.glob("000*_*.lime.npy"))
    assert len(pngs) == len(maps) == 3
    assert np.load(maps[0]).shape == (SIZE, SIZE)
    assert Image.open(pngs[0]).size[0] > 2 * SIZE  # image and overlay side by side
    assert (out / "contact_sheet.lime.png").is_file()
    rows = (out / "explanations.lime.csv").read_text()
    assert "not a supported image" in rows and rows.count("\n") == 5
