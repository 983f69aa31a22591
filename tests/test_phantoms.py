"""The phantom data set: reproducible bytes, Kaggle layout, patients, masks, a class signal a CNN can learn but
global image statistics cannot, injections that do what the manifest says, and one-line CLI errors.

Images are decoded with Pillow directly so these tests do not depend on the project's decoder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_search import CLASSES
from cxr_search.data import phantoms
from cxr_search.errors import CxrError


def _manifest(root: Path) -> list[dict]:
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _gray(path: Path, size: int | None = None) -> np.ndarray:
    """Decode to float32 gray in [0, 1] (16-bit scaled by 65535), optionally resized to size x size."""
    with Image.open(path) as im:
        sixteen = im.mode.startswith("I")
        gray = im.convert("F") if sixteen else im.convert("L").convert("F")
        if size:
            gray = gray.resize((size, size), Image.BILINEAR)
        return np.asarray(gray, dtype=np.float32) / (65535.0 if sixteen else 255.0)


def _file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file except phantoms.json (which records the wall time)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "phantoms.json"}


# --- reproducibility, layout, patients, masks, formats -----------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_worker_count_and_other_seeds_differ(tmp_path):
    kw = dict(n_images=40, size=40, progress=False)
    phantoms.generate(tmp_path / "a", seed=3, workers=1, **kw)
    phantoms.generate(tmp_path / "b", seed=3, workers=2, **kw)  # 2 chunks on 2 worker processes
    phantoms.generate(tmp_path / "c", seed=4, workers=1, **kw)
    a, b, c = (_file_hashes(tmp_path / n) for n in "abc")
    assert len(a) > 40 and a == b
    image_hashes = [{v for k, v in h.items() if k.startswith(("train/", "test/"))} for h in (a, c)]
    assert not image_hashes[0] & image_hashes[1]


def test_layout_and_manifest_match_the_files_on_disk(tiny_phantoms):
    rows = _manifest(tiny_phantoms)
    with (tiny_phantoms / "manifest.csv").open() as f:
        assert next(csv.reader(f)) == list(phantoms.MANIFEST_COLUMNS)
    assert len(rows) == 120
    on_disk = {p.relative_to(tiny_phantoms).as_posix() for split in ("train", "test")
               for p in (tiny_phantoms / split).rglob("*") if p.is_file()}
    assert on_disk == {r["path"] for r in rows}
    for r in rows:
        split, label, name = r["path"].split("/")
        assert (split, label) == (r["split"], r["label"]) and label in CLASSES
        m = re.fullmatch(r"phantom-p(\d{6})-i(\d{2})\.(png|jpg)", name)
        assert m and int(m.group(1)) == int(r["patient_id"])
        assert r["injected"] == "" and r["duplicate_of"] == ""


def test_class_mix_and_test_fraction_follow_the_kaggle_set(tmp_path):
    rows = _manifest(Path(phantoms.generate(tmp_path / "p", n_images=400, size=32, progress=False)["out"]))
    mix = Counter(r["label"] for r in rows)
    for label, share in phantoms.CLASS_MIX.items():
        assert mix[label] / len(rows) == pytest.approx(share, abs=0.01)
    for label in CLASSES:  # whole patients go to test, so the fraction is only close to 0.2
        in_class = [r for r in rows if r["label"] == label]
        assert sum(r["split"] == "test" for r in in_class) / len(in_class) == pytest.approx(0.2, abs=0.06)


def test_patients_have_several_images_and_sit_in_one_split(tiny_phantoms):
    rows = _manifest(tiny_phantoms)
    per_patient = Counter(r["patient_id"] for r in rows)
    assert max(per_patient.values()) >= 3 and len(rows) / len(per_patient) > 1.5
    splits, labels = {}, {}
    for r in rows:
        splits.setdefault(r["patient_id"], set()).add(r["split"])
        labels.setdefault(r["patient_id"], set()).add(r["label"])
    assert all(len(s) == 1 for s in splits.values()) and all(len(s) == 1 for s in labels.values())
    assert {r["split"] for r in rows} == {"train", "test"}


def test_each_abnormal_image_has_a_binary_lesion_mask_at_image_resolution(tiny_phantoms):
    for r in _manifest(tiny_phantoms):
        if r["label"] == "NORMAL":
            assert r["mask_path"] == ""
            continue
        assert r["mask_path"] == "masks/" + r["path"].rsplit(".", 1)[0] + ".png"
        with Image.open(tiny_phantoms / r["path"]) as im, Image.open(tiny_phantoms / r["mask_path"]) as m:
            assert m.size == im.size and m.mode == "L"
            mask = np.asarray(m)
        assert set(np.unique(mask)) == {0, 255} and (mask > 0).mean() < 0.3


def test_files_mix_rgb_grayscale_16_bit_png_and_jpeg(tiny_phantoms):
    modes, suffixes, sizes = Counter(), Counter(), set()
    for r in _manifest(tiny_phantoms):
        with Image.open(tiny_phantoms / r["path"]) as im:
            modes[im.mode] += 1
            suffixes[im.format] += 1
            sizes.add(im.size)
    assert modes["RGB"] > 0 and modes["L"] > 0 and modes["I;16"] > 0
    assert suffixes["PNG"] > 0 and suffixes["JPEG"] > 0 and len(sizes) > 20


def test_easy_lesions_are_larger_than_hard_ones(tmp_path):
    def mean_mask_fraction(difficulty: str) -> float:
        root = Path(phantoms.generate(tmp_path / difficulty, n_images=60, size=48, difficulty=difficulty,
                                      progress=False)["out"])
        return float(np.mean([(_gray(root / r["mask_path"]) > 0.5).mean()
                              for r in _manifest(root) if r["mask_path"]]))

    assert mean_mask_fraction("easy") > 1.3 * mean_mask_fraction("hard")


# --- injections ----------------------------------------------------------------------------------------------------


def test_manifest_counts_equal_the_injections_done(phantoms_with_injections):
    rows = _manifest(phantoms_with_injections)
    summary = json.loads((phantoms_with_injections / "phantoms.json").read_text())
    counts = Counter(r["injected"] for r in rows if r["injected"])
    assert counts == summary["injected"] and all(n > 0 for n in counts.values())
    assert len(rows) == summary["n_files"] == 120 + counts["duplicate"] + counts["corrupt"]


def _undo_geometry(dup: np.ndarray, src: np.ndarray, transform: str) -> tuple[np.ndarray, np.ndarray]:
    """The parts of a copy and its source that show the same pixels, from the recorded crop/border box."""
    kind, *params = transform.split(" ")
    if kind not in ("crop", "border"):
        return dup, src
    box = {k: int(v) for k, v in (p.split("=") for p in params)}
    top, bottom, left, right = box["top"], box["bottom"], box["left"], box["right"]
    if kind == "crop":
        return dup, src[top:src.shape[0] - bottom, left:src.shape[1] - right]
    return dup[top:dup.shape[0] - bottom, left:dup.shape[1] - right], src


def test_duplicates_are_reexported_copies_of_train_images_in_test_under_the_same_patient(phantoms_with_injections):
    rows = _manifest(phantoms_with_injections)
    by_path = {r["path"]: r for r in rows}
    duplicates = [r for r in rows if r["injected"] == "duplicate"]
    assert [r["transform"].split(" ")[0] for r in duplicates] == list(phantoms.DUPLICATE_TRANSFORMS[:len(duplicates)])
    for dup in duplicates:
        src = by_path[dup["duplicate_of"]]
        assert dup["split"] == "test" and src["split"] == "train"
        assert (dup["patient_id"], dup["label"]) == (src["patient_id"], src["label"])
        a, b = _undo_geometry(_gray(phantoms_with_injections / dup["path"]), _gray(phantoms_with_injections / src["path"]),
                              dup["transform"])
        a, b = (np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR)).ravel() for x in (a, b))
        assert np.corrcoef(a, b)[0, 1] > 0.97, dup["transform"]
        assert (phantoms_with_injections / dup["path"]).read_bytes() != (phantoms_with_injections / src["path"]).read_bytes()
    clean = [r for r in rows if r["injected"] not in ("duplicate", "corrupt")]
    splits = {}
    for r in clean:
        splits.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())  # the leak comes only from the injected duplicates


def test_source_injection_gives_normal_films_their_own_size_and_format(tmp_path):
    root = Path(phantoms.generate(tmp_path / "s", n_images=60, size=48, seed=0, inject="source", progress=False)["out"])
    looks = {}
    for r in _manifest(root):
        with Image.open(root / r["path"]) as im:
            looks.setdefault(r["label"], []).append((im.format, im.mode, im.size[0] == im.size[1], max(im.size)))
        assert (r["injected"] == "source") == (r["label"] == phantoms.SOURCE_CLASS)
    assert all(look[:3] == ("JPEG", "RGB", True) and look[3] >= 48 * 1.4 for look in looks["NORMAL"])
    others = looks["COVID19"] + looks["PNEUMONIA"]
    assert len({look[:2] for look in others}) > 1  # the other classes keep the mixed formats


def test_corrupt_files_fail_to_decode(phantoms_with_injections):
    corrupt = [r for r in _manifest(phantoms_with_injections) if r["injected"] == "corrupt"]
    assert {(phantoms_with_injections / r["path"]).stat().st_size == 0 for r in corrupt} == {True, False}
    for r in corrupt:
        with pytest.raises((OSError, SyntaxError)):
            with Image.open(phantoms_with_injections / r["path"]) as im:
                im.load()


def _corner_features(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The top-left 20% x 20% of each decodable image at 8x8, and whether it is COVID19."""
    x, y = [], []
    for r in _manifest(root):
        if r["injected"] == "corrupt":
            continue
        img = _gray(root / r["path"])
        h, w = img.shape
        corner = Image.fromarray(img[: h // 5, : w // 5]).resize((8, 8), Image.BILINEAR)
        x.append(np.asarray(corner).ravel())
        y.append(r["label"] == "COVID19")
    return np.array(x), np.array(y)


def _cv_balanced_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0))
    return balanced_accuracy_score(y, pred)


def test_confounder_marks_only_covid_and_its_corner_alone_predicts_the_class(phantoms_with_injections, tiny_phantoms):
    rows = _manifest(phantoms_with_injections)
    marked = {r["path"] for r in rows if r["injected"] == "confounder"}
    assert marked == {r["path"] for r in rows if r["label"] == "COVID19" and r["injected"] != "duplicate"
                      and r["injected"] != "corrupt"}
    assert _cv_balanced_accuracy(*_corner_features(phantoms_with_injections)) > 0.95
    assert _cv_balanced_accuracy(*_corner_features(tiny_phantoms)) < 0.8  # without the marker: no signal there


# --- learnable, but not from global statistics ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def learnable_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "learnable"
    phantoms.generate(out, n_images=800, size=64, seed=0, progress=False)
    return out


@pytest.mark.slow
def test_a_tiny_cnn_learns_the_classes_on_unseen_patients(learnable_set):
    import torch
    from sklearn.metrics import f1_score

    rows = _manifest(learnable_set)
    res = 48  # input pixels: enough for the lesions, cheap on a CPU
    images = np.stack([_gray(learnable_set / r["path"], res) for r in rows])
    images = (images - images.mean((1, 2), keepdims=True)) / (images.std((1, 2), keepdims=True) + 1e-6)
    x = torch.from_numpy(images)[:, None]
    y = torch.tensor([CLASSES.index(r["label"]) for r in rows])
    train = torch.tensor([r["split"] == "train" for r in rows])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        layers = []
        for c_in, c_out in ((1, 8), (8, 16), (16, 32)):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(),
                       torch.nn.MaxPool2d(2)]
        net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(32 * (res // 8) ** 2, 3))
        counts = torch.bincount(y[train], minlength=3).float()
        weight = counts.sum() / (3 * counts)  # balanced class weights: COVID19 is 9% of the images
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        xt, yt = x[train], y[train]
        for _ in range(12):
            for idx in torch.randperm(len(yt)).split(32):
                loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(x[~train]).argmax(1)
    finally:
        torch.set_num_threads(threads)
    macro_f1 = f1_score(y[~train], pred, average="macro")
    print(f"tiny CNN macro-F1 on {int((~train).sum())} test images: {macro_f1:.3f}")
    assert macro_f1 > 0.6  # chance for 3 classes is about 0.33


@pytest.mark.slow
def test_size_exposure_and_format_do_not_predict_the_label(learnable_set):
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, labels, groups = [], [], []
    for r in _manifest(learnable_set):
        with Image.open(learnable_set / r["path"]) as im:
            bits, channels, (w, h) = (16 if im.mode.startswith("I") else 8), len(im.getbands()), im.size
        img = _gray(learnable_set / r["path"])
        feats.append([img.mean(), img.std(), w, h, channels, bits])
        labels.append(r["label"])
        groups.append(r["patient_id"])
    x, y = np.array(feats), np.array(labels)
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=0)

    def macro_f1(clf) -> float:
        return f1_score(y, cross_val_predict(clf, x, y, cv=cv, groups=groups), average="macro")

    chance = macro_f1(DummyClassifier(strategy="stratified", random_state=0))
    for clf in (make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)),
                RandomForestClassifier(100, min_samples_leaf=5, class_weight="balanced", random_state=0)):
        score = macro_f1(clf)
        assert score < 0.45 and score < chance + 0.1, (type(clf).__name__, score, chance)


# --- bad arguments, CLI, default data set ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_images=0), "--n-images"),
        (dict(n_images=-5), "--n-images"),
        (dict(size=16), "--size"),
        (dict(seed=-1), "--seed"),
        (dict(difficulty="extreme"), "--difficulty"),
        (dict(inject=("duplicates", "lasers")), "lasers"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(workers=0), "workers"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, kwargs, message):
    with pytest.raises(CxrError, match=message):
        phantoms.generate(tmp_path / "out", **{"n_images": 30, "size": 32, "progress": False, **kwargs})
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_unwritable_or_non_empty_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CxrError, match="--out"):
        phantoms.generate(blocker, n_images=30, size=32, progress=False)
    with pytest.raises(CxrError, match="cannot write"):
        phantoms.generate(blocker / "below", n_images=30, size=32, progress=False)
    with pytest.raises(CxrError, match="not empty"):
        phantoms.generate(tmp_path, n_images=30, size=32, progress=False)


def test_cli_bad_argument_prints_one_line_and_no_traceback(tmp_path):
    exe = Path(sys.executable).parent / "cxr-search"
    result = subprocess.run([str(exe), "data", "synth", "--out", str(tmp_path / "o"), "--inject", "lasers"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "lasers" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("args", [["--n-images=-3"], ["--size", "8"], ["--difficulty", "extreme"]])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args):
    from cxr_search import cli

    monkeypatch.setattr(sys, "argv", ["cxr-search", "data", "synth", "--out", str(tmp_path / "o"), *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_synth_writes_the_set_and_prints_the_counts(tmp_path, monkeypatch, capsys):
    from cxr_search import cli

    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["cxr-search", "data", "synth", "--out", str(out), "--n-images", "24",
                                      "--size", "32", "--inject", "corrupt"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert len(_manifest(out)) == 27 and "COVID19" in printed and "corrupt: 3" in printed and "Wrote 27" in printed


def test_default_dataset_is_generated_once_and_an_interrupted_run_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_SEARCH_CACHE", str(tmp_path / "cache"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(phantoms, "_write_manifest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            phantoms.default_dataset(n_images=24, size=32)
    assert list((tmp_path / "cache" / "phantoms").iterdir()) == []

    first = phantoms.default_dataset(n_images=24, size=32)
    stamp = (first / "manifest.csv").stat().st_mtime_ns
    assert len(_manifest(first)) == 24 and first.parent == tmp_path / "cache" / "phantoms"
    assert phantoms.default_dataset(n_images=24, size=32) == first
    assert (first / "manifest.csv").stat().st_mtime_ns == stamp
    assert phantoms.default_dataset(n_images=24, size=32, seed=1) != first
