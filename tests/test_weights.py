"""`pretrained: imagenet`: staged once, read offline by models and `train`, never downloaded during a run.

Every weights file here is made locally (a model's own random state dict in the upstream layout); no test touches
the network: the Hugging Face Hub is offline and socket connections are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cxr_search import cli
from cxr_search.config import BACKBONES
from cxr_search.errors import CxrError
from cxr_search.experiment.plan import plan_run
from cxr_search.models import fetch, weights
from cxr_search.models.registry import TIMM_ARCH, create_model


@pytest.fixture(autouse=True)
def weights_root(tmp_path, monkeypatch):
    """An empty weights folder of this test's own ($CXR_SEARCH_WEIGHTS)."""
    root = tmp_path / "weights"
    monkeypatch.setenv("CXR_SEARCH_WEIGHTS", str(root))
    torch.manual_seed(0)
    return root


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch):
    """No network: the Hub is offline and every socket connection is refused and recorded."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in tests ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _upstream_state(backbone: str) -> dict[str, torch.Tensor]:
    """A random state dict in the layout its upstream library publishes (1000-class classifier included)."""
    if backbone == "alexnet":
        import torchvision

        return torchvision.models.alexnet(weights=None).state_dict()
    import timm

    return timm.create_model(TIMM_ARCH[backbone], pretrained=False).state_dict()


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("backbone", ["alexnet", "resnet34"])
def test_imagenet_loads_the_weights_staged_in_the_documented_layout(backbone, weights_root, network_attempts):
    state = _upstream_state(backbone)
    tag = weights.IMAGENET_SOURCES[backbone].tag
    (weights_root / tag).mkdir(parents=True)
    save_file(state, weights_root / tag / "model.safetensors")  # <weights dir>/<tag>/model.safetensors

    model = create_model(backbone, in_chans=1, pretrained="imagenet")
    got = model.backbone.state_dict()
    conv_key = next(k for k, v in got.items() if v.ndim == 4)
    # the RGB stem is summed for grayscale input; every other weight is the saved tensor
    torch.testing.assert_close(got[conv_key], state[conv_key].sum(dim=1, keepdim=True))
    for key, value in got.items():
        if key != conv_key and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    assert network_attempts == []


def test_unstaged_imagenet_is_a_one_line_error_naming_the_fix(weights_root, network_attempts):
    with pytest.raises(CxrError) as err:
        create_model("resnet34", pretrained="imagenet")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    for part in ("resnet34", str(weights_root), "cxr-search weights fetch --backbones resnet34",
                 "CXR_SEARCH_WEIGHTS", "pretrained: none"):
        assert part in message, message
    assert network_attempts == [], "a run must never try to download weights"


def test_cnn3_has_no_imagenet_weights_and_says_so():
    with pytest.raises(CxrError, match=r"'cnn3' has no ImageNet weights.*pretrained: none"):
        create_model("cnn3", pretrained="imagenet")
    with pytest.raises(CxrError, match="'cnn3' has no ImageNet weights"):
        fetch.fetch(["cnn3"])
    with pytest.raises(CxrError, match="'cnn3' has no ImageNet weights"):
        weights.require_available([("cnn3", "imagenet")])


def test_require_available_names_every_missing_backbone_and_passes_once_they_are_staged(weights_root):
    pairs = [("resnet34", "imagenet"), ("cnn3", "none"), ("alexnet", "imagenet"), ("vgg16", "none"),
             ("resnet34", "imagenet"), ("inception_v3", "some/local/file.pth")]
    with pytest.raises(CxrError) as err:
        weights.require_available(pairs)
    assert "weights for alexnet, resnet34 are not staged" in str(err.value)
    assert "--backbones alexnet,resnet34" in str(err.value)
    for backbone in ("alexnet", "resnet34"):
        fetch.stage(backbone, _upstream_state(backbone), origin="made in the test")
    weights.require_available(pairs)  # vgg16 without ImageNet weights and a local file path are not its concern


def test_stage_keeps_only_the_backbone_and_records_where_it_came_from(weights_root):
    state = _upstream_state("resnet34")
    path = fetch.stage("resnet34", state, origin="made in the test")
    assert path == weights_root / "resnet34.tv_in1k" / "model.safetensors"
    saved = load_file(path)
    assert not any(k.startswith("fc.") for k in saved), "the ImageNet classifier is not staged"
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    record = json.loads((path.parent / "source.json").read_text())
    assert record["origin"] == "made in the test" and record["tag"] == "resnet34.tv_in1k"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in weights_root.iterdir()] == ["resnet34.tv_in1k"], "no temporary folder left behind"
    with pytest.raises(CxrError, match="do not fit backbone 'resnet34'"):
        fetch.stage("resnet34", _upstream_state("alexnet"))


def test_fetch_downloads_once_into_a_shared_folder_that_runs_then_read(tmp_path, monkeypatch):
    downloads = []

    def download(source, download_dir, progress):  # the network boundary: an upstream-layout file
        downloads.append(source.tag)
        return _upstream_state("alexnet"), "https://example.invalid/alexnet.pth"

    monkeypatch.setattr(fetch, "_download", download)
    shared = tmp_path / "shared"
    first = fetch.fetch(["alexnet"], root=shared)
    again = fetch.fetch(["alexnet"], root=shared)
    assert [s.status for s in first + again] == ["fetched", "staged"] and downloads == ["alexnet.tv_in1k"]
    fetch.fetch(["alexnet"], root=shared, force=True)
    assert len(downloads) == 2

    monkeypatch.setenv("CXR_SEARCH_WEIGHTS", str(shared))  # every node points at the shared copy
    staged = load_file(shared / "alexnet.tv_in1k" / "model.safetensors")
    model = create_model("alexnet", in_chans=3, pretrained="imagenet")
    assert torch.equal(model.backbone.features[3].weight, staged["features.3.weight"])
    listing = {s.backbone: s.status for s in weights.list_staged()}
    assert listing["alexnet"] == "staged" and listing["resnet34"] == "missing" and listing["cnn3"] == "none"


@pytest.mark.parametrize("backbone", ["alexnet", "resnet34"])  # torchvision's URL and timm's Hub copy
def test_fetch_offline_is_a_one_line_error_and_stages_nothing(backbone, tmp_path):
    root = tmp_path / "w"
    with pytest.raises(CxrError) as err:
        fetch.fetch([backbone], root=root, progress=False)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "could not download ImageNet weights" in message and "needs internet" in message
    assert "pretrained: none" in message
    assert list(root.iterdir()) == [], "a failed download leaves nothing that looks staged"


def test_every_imagenet_source_is_a_known_download_for_its_architecture():
    import timm
    import torchvision

    assert weights.imagenet_backbones() == [b for b in BACKBONES if b != "cnn3"]
    for backbone in weights.imagenet_backbones():
        source = weights.IMAGENET_SOURCES[backbone]
        if source.library == "torchvision":
            assert torchvision.models.get_weight(source.torchvision_weights).url.endswith(".pth")
            continue
        assert source.tag.split(".")[0] == TIMM_ARCH[backbone]
        assert source.tag in timm.list_pretrained(f"{TIMM_ARCH[backbone]}.*")
        cfg = timm.models.get_pretrained_cfg(source.tag)
        assert cfg.hf_hub_id or cfg.url, f"timm would build random weights for {source.tag}"


@pytest.mark.parametrize("name", ["inception", "backbones", "study"])
def test_full_budget_spaces_fine_tune_imagenet_weights_and_the_cpu_budget_does_not(name):
    from cxr_search.space import load_space

    pairs = load_space(name).backbone_pairs()  # the file as written: the full budget
    assert pairs and all((p == "imagenet") == (b != "cnn3") for b, p in pairs), pairs
    with pytest.raises(CxrError, match="cxr-search weights fetch") as e:  # not staged: refused while planning
        plan_run(name, gpu_available=True)
    assert "\n" not in str(e.value)
    cpu = plan_run(name, gpu_available=False)
    assert {p for _, p in cpu.space.backbone_pairs()} == {"none"}
    assert "pretrained: none" in cpu.notes[0]
    smoke = plan_run(name, smoke=True)
    assert {p for _, p in smoke.space.backbone_pairs()} == {"none"}
    if name != "inception":
        assert {b for b, _ in pairs} == set(BACKBONES)  # the nine-backbone table, cnn3 from scratch


def _cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["cxr-search", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code


def test_train_without_staged_weights_fails_before_any_data_work(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code = _cli(monkeypatch, "train", "--backbone", "resnet34", "--pretrained", "imagenet", "--smoke",
                "--out", str(out))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cxr-search weights fetch --backbones resnet34" in err
    assert not out.exists()


@pytest.mark.slow
def test_train_fine_tunes_the_staged_weights(monkeypatch, capsys, tmp_path):
    state = _upstream_state("alexnet")
    fetch.stage("alexnet", state, origin="made in the test")
    out = tmp_path / "run"
    code = _cli(monkeypatch, "train", "--backbone", "alexnet", "--pretrained", "imagenet", "--freeze-fraction",
                "1.0", "--smoke", "--epochs", "1", "--out", str(out))
    assert code == 0
    assert "note:" not in capsys.readouterr().out
    from cxr_search.training.model_folder import load_best_model

    model, _ = load_best_model(out)
    trained = model.state_dict()
    # the whole backbone was frozen: after training it still holds the staged ImageNet weights (as saved: float16)
    assert torch.equal(trained["backbone.features.3.weight"], state["features.3.weight"].half().float())
    torch.testing.assert_close(trained["backbone.features.0.weight"],
                               state["features.0.weight"].sum(1, keepdim=True).half().float())


@pytest.mark.slow
def test_train_warns_that_freezing_random_weights_freezes_noise(monkeypatch, capsys, tmp_path):
    code = _cli(monkeypatch, "train", "--backbone", "cnn3", "--freeze-fraction", "0.5", "--smoke", "--epochs", "1",
                "--out", str(tmp_path / "run"))
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "note: --freeze-fraction 0.5 without pretrained weights" in out and "--pretrained imagenet" in out


def test_weights_fetch_command_stages_and_says_how_runs_find_a_shared_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(fetch, "_download", lambda source, d, progress: (_upstream_state("alexnet"), "test"))
    shared = tmp_path / "shared"
    assert _cli(monkeypatch, "weights", "fetch", "--backbones", "alexnet", "--to", str(shared)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fetched" in out and f"CXR_SEARCH_WEIGHTS={shared.resolve()}" in out
    assert (shared / "alexnet.tv_in1k" / "model.safetensors").is_file()
    assert _cli(monkeypatch, "weights", "list", "--dir", str(shared)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"alexnet\W+alexnet\.tv_in1k\W+staged", out), out
    assert re.search(r"inception_v3\W+inception_v3\.tf_in1k\W+missing", out), out
    assert _cli(monkeypatch, "weights", "fetch", "--backbones", "cnn3") == 2
