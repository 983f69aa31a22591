"""Every backbone trains at its minimum size; freezing, Keras-style regularizers and offline weight loading work."""

import numpy as np
import pytest
import torch
from torch import nn

from cxr_search.config import BACKBONES, HEADS, REGULARIZERS
from cxr_search.errors import CxrError
from cxr_search.models.registry import MIN_INPUT_SIZE, create_model


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


# Deep many-layer models take seconds per pass on a shared CPU even at their minimum size; they and the RGB
# variants (which differ only in the first conv) are marked slow.
_HEAVY = {"inception_v3", "xception", "densenet121", "resnet50"}
_SWEEP = [
    pytest.param(name, c, marks=[pytest.mark.slow] if c == 3 or name in _HEAVY else [])
    for name in BACKBONES
    for c in (1, 3)
]


@pytest.mark.parametrize(("name", "in_chans"), _SWEEP)
def test_forward_backward_at_minimum_size(name, in_chans):
    size = MIN_INPUT_SIZE[name]
    model = create_model(name, in_chans=in_chans)
    assert model.min_input_size == size and _first_conv(model).in_channels == in_chans
    x = torch.randn(2, in_chans, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if size > 1 and in_chans == 1:  # the table is tight: one pixel less and the backbone itself fails
        with pytest.raises(RuntimeError):
            model.eval().backbone(torch.zeros(1, 1, size - 1, size - 1))


def test_too_small_or_wrong_channel_input_is_a_clear_error():
    model = create_model("alexnet")
    with pytest.raises(CxrError, match="at least 63x63 px.*--size"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(CxrError, match="1-channel"):
        model(torch.zeros(1, 3, 96, 96))


def test_unknown_backbone_suggests_the_closest_name():
    with pytest.raises(CxrError, match="Did you mean 'resnet50'"):
        create_model("resnet05")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_freeze_fraction_freezes_the_input_side_and_frozen_weights_do_not_move(fraction):
    model = create_model("resnet34", freeze_fraction=fraction)
    params = list(model.backbone.parameters())
    total = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    largest_layer = max(m.weight.numel() for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    # whole layers are frozen, so the frozen share overshoots the target by at most one layer
    assert fraction * total <= frozen <= fraction * total + largest_layer
    flags = [p.requires_grad for p in params]
    assert flags == sorted(flags), "frozen parameters must all come before (input side of) trainable ones"
    assert all(p.requires_grad for p in model.head.parameters())
    assert model.trainable_parameter_count() == sum(p.numel() for p in model.parameters()) - frozen

    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    bns = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    frozen_bns = {n for n, m in bns.items() if not m.weight.requires_grad}
    model.train()
    assert all(bns[n].training == (n not in frozen_bns) for n in bns)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 2, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for name in frozen_names:
        assert torch.equal(before[name], after[name]), name
    for n in bns:  # frozen BatchNorm runs in eval mode: running statistics unchanged
        moved = not torch.equal(before[f"backbone.{n}.running_mean"], after[f"backbone.{n}.running_mean"])
        assert moved == (n not in frozen_bns), n
    assert not torch.equal(before["head.weight"], after["head.weight"])


@pytest.mark.parametrize("kind", REGULARIZERS)
@pytest.mark.parametrize("head", HEADS)
def test_regularizer_is_the_keras_penalty_on_head_weights(head, kind):
    strength = 0.1
    model = create_model("cnn3", head=head, dense_units=16)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (1 if head == "linear" else 2)
    w = [m.weight.detach().numpy().astype(np.float64) for m in linears]
    l1 = strength * sum(np.abs(a).sum() for a in w)
    l2 = strength * sum((a**2).sum() for a in w)  # Keras L2: no 1/2 factor
    expected = {"none": 0.0, "l1": l1, "l2": l2, "l1_l2": l1 + l2}[kind]
    penalty = model.regularization_penalty(kind, strength)
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    if kind != "none":
        penalty.backward()
        assert all(m.bias.grad is None for m in linears), "biases are not regularized"
        assert all(p.grad is None for p in model.backbone.parameters()), "only the head is regularized"


def test_dense_dropout_head_uses_the_dropout_probability():
    model = create_model("cnn3", head="dense_dropout", dense_units=8, dropout=0.3)
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.head[2].p == 0.3 and model.head[0].out_features == 8


@pytest.mark.parametrize("name", ["cnn3", "alexnet", "resnet34"])
def test_local_rgb_weights_load_into_a_grayscale_model_offline(name, tmp_path):
    source = create_model(name, in_chans=3)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)  # our own saved model, head included (it is ignored)
    model = create_model(name, in_chans=1, pretrained=str(path))
    rgb = _first_conv(source).weight
    torch.testing.assert_close(_first_conv(model).weight, rgb.sum(dim=1, keepdim=True))
    conv_key = next(k for k in source.backbone.state_dict() if k.endswith(".weight"))
    for key, value in source.backbone.state_dict().items():
        if key != conv_key:
            assert torch.equal(model.backbone.state_dict()[key], value), key


def test_safetensors_file_and_hub_style_folder_load(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet34", in_chans=3)
    (tmp_path / "hub").mkdir()
    save_file(source.backbone.state_dict(), tmp_path / "hub" / "model.safetensors")
    for pretrained in (tmp_path / "hub", tmp_path / "hub" / "model.safetensors"):
        model = create_model("resnet34", in_chans=3, pretrained=str(pretrained), freeze_fraction=1.0)
        for key, value in source.backbone.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["resnet34", "alexnet"])
def test_torchvision_imagenet_layout_weights_give_torchvision_features(name, tmp_path):
    import torchvision

    tv = getattr(torchvision.models, name)(weights=None).eval()
    path = tmp_path / f"{name}_tv.pth"
    torch.save(tv.state_dict(), path)  # includes torchvision's classifier, which must be ignored
    model = create_model(name, in_chans=3, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        if name == "resnet34":
            tv.fc = nn.Identity()
            torch.testing.assert_close(model.backbone(x), tv(x))
        else:
            torch.testing.assert_close(model.backbone.features(x), tv.features(x))


def test_missing_or_mismatched_weights_are_clear_errors(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(CxrError, match=r"weights.pth does not exist.*pretrained='none'"):
        create_model("resnet34", pretrained=str(missing))
    with pytest.raises(CxrError, match="neither model.safetensors nor pytorch_model.bin"):
        create_model("resnet34", pretrained=str(tmp_path))
    path = tmp_path / "cnn3.pth"
    torch.save(create_model("cnn3").state_dict(), path)
    with pytest.raises(CxrError, match=r"do not fit backbone 'resnet34': \d+ missing \(e\.g\. conv1\.weight"):
        create_model("resnet34", pretrained=str(path))


def test_hub_weights_offline_are_a_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(
        CxrError, match=r"could not fetch .*resnet34.tv_in1k.*hf download timm/resnet34.tv_in1k"
    ):
        create_model("resnet34", pretrained="tv_in1k")
    with pytest.raises(CxrError, match="known tags: .*a1_in1k"):
        create_model("resnet34", pretrained="no_such_tag")
    with pytest.raises(CxrError, match="no timm pretrained weights exist for 'cnn3'"):
        create_model("cnn3", pretrained="in1k")


def test_grayscale_weights_load_into_an_rgb_model_with_the_same_response_to_gray_images(tmp_path):
    gray = create_model("cnn3", in_chans=1).eval()
    path = tmp_path / "gray.pth"
    torch.save(gray.backbone.state_dict(), path)
    rgb = create_model("cnn3", in_chans=3, pretrained=str(path)).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rgb.backbone(x.expand(-1, 3, -1, -1)), gray.backbone(x))
