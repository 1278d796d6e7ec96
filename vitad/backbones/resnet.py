"""torchvision ResNets and WideResNets: PatchCore features from layer1..layer4."""

from __future__ import annotations

from pathlib import Path

import torch

from vitad.backbones.base import CNN_KEYS, CNNExtractor, CNNFeatures, FeatureExtractor, WeightsUnavailableError, _check_keys, _random_init, _sha256
from vitad.core.params import param, positive_int

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")

def _resnet_grid(image_size: int, layer: str) -> tuple[int, int]:
    """Output (h, w) of ``layer``: the stem conv and max-pool each halve the side (rounding up),
    layer2, layer3 and layer4 halve it once more each."""
    side = image_size
    for _ in range(RESNET_LAYERS.index(layer) + 2):
        side = (side + 1) // 2
    return side, side


def _resnet_channels(model: torch.nn.Module, layer: str) -> int:
    """Output channels of a torchvision ResNet layer (its last block's last convolution)."""
    block = getattr(model, layer)[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def _load_resnet_weights(name: str, arch: str, source: str, model: torch.nn.Module) -> dict:
    """Load torchvision weights (by name) or a state_dict file into ``model``; returns weights_info."""
    import torchvision

    key = f"backbones.{name}.pretrained"
    how = (
        f"provide them: put the file torchvision downloads into {Path(torch.hub.get_dir()) / 'checkpoints'}, or set "
        f"{key} to a file written with torch.save(model.state_dict(), path), or set weights: random"
    )
    available = torchvision.models.get_model_weights(arch)
    if source in available.__members__:
        weights = available[source]
        try:
            state_dict = weights.get_state_dict(progress=False)
        except (OSError, RuntimeError) as error:
            raise WeightsUnavailableError(
                f"{name}: torchvision weights {arch} {source} ({key}) could not be loaded from {weights.url} "
                f"({error}); {how}"
            ) from error
        weights_info = {"mode": "pretrained", "source": source, "url": weights.url}
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"{name}: {key} = {source!r} is neither an existing checkpoint file nor a torchvision weights name "
                f"for {arch} ({', '.join(available.__members__)}); {how}"
            )
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a bad file raises many exception types; all mean "not a state_dict"
            raise WeightsUnavailableError(
                f"{name}: {path} ({key}) is not a loadable state_dict ({error}); {how}"
            ) from error
        weights_info = {"mode": "pretrained", "source": source, "sha256": _sha256([path])}
    if not isinstance(state_dict, dict):
        raise WeightsUnavailableError(f"{name}: {source} ({key}) does not hold a state_dict; {how}")
    try:
        incompatible = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # tensors of the wrong shape
        detail = " ".join(str(error).split())[:400]
        raise WeightsUnavailableError(f"{name}: {source} ({key}) does not match {arch}: {detail}; {how}") from error
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise WeightsUnavailableError(
            f"{name}: {source} ({key}) does not match {arch}: {len(incompatible.missing_keys)} missing tensors "
            f"{incompatible.missing_keys[:3]}, {len(incompatible.unexpected_keys)} unexpected "
            f"{incompatible.unexpected_keys[:3]}; {how}"
        )
    return weights_info


def build_resnet(name: str, config: dict, weights: str, device: torch.device, seed: int) -> FeatureExtractor:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    _check_keys(name, config, {"family", "arch", "pretrained", "image_size"} | CNN_KEYS)
    params = {"backbones": {name: config}}
    key = f"backbones.{name}"
    arch = param(params, f"{key}.arch", str, "resnet50", choices=RESNET_ARCHS)
    image_size = positive_int(params, f"{key}.image_size", 224)
    features = CNNFeatures.from_config(name, config, list(RESNET_LAYERS), ["layer2", "layer3"])
    layers = features.layers

    if weights == "random":
        # zero_init_residual: the last BatchNorm of every residual block starts at 0 (timm's
        # default, and anomalib's random backbones), so each block starts as the identity and
        # random features stay local and informative; torchvision's default init mixes them
        # through 16 random blocks (near-chance detection in the default run).
        model = _random_init(lambda: torchvision.models.get_model(arch, weights=None, zero_init_residual=True), seed)
        weights_info = {"mode": "random", "seed": seed, "source": "random initialisation (zero-initialised residual BatchNorms)"}
    else:
        source = param(params, f"{key}.pretrained", str)
        model = torchvision.models.get_model(arch, weights=None)
        weights_info = _load_resnet_weights(name, arch, source, model)
    channels = [_resnet_channels(model, layer) for layer in layers]
    # Graph truncated after the deepest requested layer: layer4 / fc are never computed.
    trunk = create_feature_extractor(model, return_nodes={layer: layer for layer in layers})
    embedding_dim, patch_dim = features.dims(channels)
    return CNNExtractor(
        trunk,
        features=features,
        image_size=image_size,
        grid_size=_resnet_grid(image_size, layers[0]),
        embedding_dim=embedding_dim,
        patch_dim=patch_dim,
        weights_info=weights_info,
        device=device,
    )

