"""Small and odd data sets: tiny flat folders split (or fail in one line), label conflicts are reported,
``--strict`` fails on any duplicate, quality flags are counted and only unusable images are quarantined."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_search.cli import app
from cxr_search.data import integrity
from cxr_search.data.prepare import prepare
from cxr_search.errors import CxrError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))


def _film(seed: int, shape=(72, 64)) -> np.ndarray:
    """A smooth random 'film' (blurred noise): distinct per seed, not flagged blurry or constant."""
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random(shape, dtype=np.float32), (0, 0), 1.0)
    return np.clip((x - x.min()) / (x.max() - x.min()) * 235 + 10, 0, 255).astype(np.uint8)


def _flat(root: Path, per_class: dict[str, int]) -> Path:
    seed = 0
    for label, n in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_film(seed)).save(root / label / f"img{i}.png")
            seed += 1
    return root


@pytest.mark.parametrize("per_class", [{"COVID19": 5, "PNEUMONIA": 5, "NORMAL": 5},
                                       {"COVID19": 3, "PNEUMONIA": 4, "NORMAL": 3}])
def test_tiny_flat_sets_are_split_with_warnings_not_a_traceback(tmp_path, per_class):
    root = _flat(tmp_path / "flat", per_class)
    data = prepare(root, size=32, progress=False)
    assert set(data.train.labels.tolist()) == {0, 1, 2}
    assert len(data.val) and len(data.test)
    assert len(data.train) + len(data.val) + len(data.test) == sum(per_class.values())
    assert any("no test split" in w for w in data.report["warnings"])


def test_a_set_too_small_to_split_is_one_line_up_front_and_at_training(tmp_path):
    root = _flat(tmp_path / "flat", {"COVID19": 1, "NORMAL": 1})
    report = integrity.check(root, workers=1, progress=False)
    message = next(w for w in report.warnings if w.startswith("too few images to split"))
    assert "5 images per class" in message and "\n" not in message
    with pytest.raises(CxrError, match="class PNEUMONIA has no usable image"):
        prepare(root, size=32, progress=False)
    shutil.copy(root / "NORMAL/img0.png", tmp_path / "extra.png")
    root3 = _flat(tmp_path / "three", {"COVID19": 1, "PNEUMONIA": 1, "NORMAL": 1})
    with pytest.raises(CxrError, match=r"too few .* 5 per class"):
        prepare(root3, size=32, progress=False)


def test_same_image_under_two_labels_is_a_label_conflict_and_strict_fails(tmp_path):
    root = _flat(tmp_path / "flat", {"COVID19": 6, "PNEUMONIA": 6, "NORMAL": 6})
    shutil.copy(root / "NORMAL/img0.png", root / "COVID19/copy-of-normal.png")
    report = integrity.check(root, workers=1, progress=False)
    assert [(c["label_a"], c["label_b"]) for c in report.label_conflicts] == [("COVID19", "NORMAL")]
    assert any("label conflict" in w for w in report.warnings)
    result = CliRunner().invoke(app, ["data", "check", str(root), "--strict", "--workers", "1"])
    assert result.exit_code == 1 and "label conflicts" in result.output


def test_csv_listing_one_file_twice_with_two_labels_is_a_label_conflict(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    lines = ["path,label"]
    for i, label in enumerate(["COVID19", "PNEUMONIA", "NORMAL"] * 3):
        Image.fromarray(_film(100 + i)).save(root / f"f{i}.png")
        lines.append(f"f{i}.png,{label}")
    lines.append("f0.png,NORMAL")  # f0 is COVID19 above
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    report = integrity.check(root / "labels.csv", workers=1, progress=False)
    assert len(report.label_conflicts) == 1
    assert {report.label_conflicts[0]["label_a"], report.label_conflicts[0]["label_b"]} == {"COVID19", "NORMAL"}


def test_strict_exits_1_on_a_duplicate_inside_one_split(tmp_path):
    root = _flat(tmp_path / "flat", {"COVID19": 6, "PNEUMONIA": 6, "NORMAL": 6})
    shutil.copy(root / "PNEUMONIA/img0.png", root / "PNEUMONIA/img0-again.png")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", str(root), "--strict", "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert "1 duplicate pairs within a split" in result.output
    (root / "PNEUMONIA/img0-again.png").unlink()
    assert runner.invoke(app, ["data", "check", str(root), "--strict", "--workers", "1"]).exit_code == 0


def test_quality_flags_are_counted_and_only_unusable_images_quarantined(tmp_path):
    root = _flat(tmp_path / "flat", {"COVID19": 6, "PNEUMONIA": 6, "NORMAL": 6})
    odd = {
        "blurry.png": cv2.resize(_film(50, (16, 16)), (192, 192), interpolation=cv2.INTER_CUBIC),  # 12x enlarged
        "dark.png": (_film(51) // 8).astype(np.uint8),
        "washed.png": (225 + _film(52) // 9).astype(np.uint8),
        "constant.png": np.full((80, 80), 128, np.uint8),
        "strip.png": _film(53, (40, 200)),
        "speck.png": _film(54, (5, 6)),
    }
    for name, pixels in odd.items():
        Image.fromarray(pixels).save(root / "NORMAL" / name)
    report = integrity.check(root, workers=1, progress=False)
    flagged = {flag: {Path(p).name for p in paths} for flag, paths in report.quality["examples"].items()}
    assert flagged["blurry"] == {"blurry.png"}
    assert flagged["very_dark"] == {"dark.png"} and flagged["washed_out"] == {"washed.png"}
    assert flagged["nearly_constant"] == {"constant.png"} and flagged["extreme_aspect"] == {"strip.png"}
    assert flagged["tiny"] == {"strip.png"} and report.quality["counts"]["tiny"] == 1  # 40 px high
    assert [Path(q["path"]).name for q in report.quarantined] == ["speck.png"]
    assert "too small" in report.quarantined[0]["reason"]
    assert report.n_usable == 18 + 5


def test_train_on_an_unsplittable_set_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import sys

    from cxr_search import cli

    root = _flat(tmp_path / "flat", {"COVID19": 1, "PNEUMONIA": 1, "NORMAL": 1})
    monkeypatch.setattr(sys, "argv", ["cxr-search", "train", "--backbone", "cnn3", "--data", str(root),
                                      "--size", "32", "--epochs", "1", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "5 per class" in err
