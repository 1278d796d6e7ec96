"""transformers ViTs: DINOv2 (Dinov2Model) and MAE (ViTMAEModel), patch tokens in raster order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vitad.backbones.base import (
    Dinov2Extractor, FeatureExtractor, MAEExtractor, WeightsUnavailableError, _check_keys, _pair, _random_init, _sha256,
)
from vitad.core.params import ParamsError, param, positive_int

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# torch's fused attention never materialises the [B, heads, T, T] attention weights that eager
# attention keeps (at 448 px, T = 1025: 0.4 GB per batch of 8 for each of scores and softmax), and
# takes less CPU time; the features agree with eager attention to float32 rounding. Pinned rather
# than left to transformers' default, which a checkpoint's config or another version may change.
ATTENTION = "sdpa"

def _hf_config(name: str, config_class, overrides: dict):
    """Random-init architecture: the transformers default (the -base checkpoints' shape) plus
    ``backbones.<name>.config`` overrides; every override must be a field of ``config_class``."""
    key = f"backbones.{name}.config"
    if not isinstance(overrides, dict):
        raise ParamsError(f"params.yaml: {key} must be a mapping of {config_class.__name__} fields, got {overrides!r}")
    overrides = dict(overrides)
    defaults = config_class()
    if "intermediate_size" in overrides and hasattr(defaults, "mlp_ratio"):
        # Dinov2Config sizes its MLP by mlp_ratio; accept the usual ViT key and translate it.
        hidden_size = overrides.get("hidden_size", defaults.hidden_size)
        intermediate_size = overrides.pop("intermediate_size")
        if not isinstance(intermediate_size, int) or intermediate_size % hidden_size:
            raise ParamsError(
                f"params.yaml: {key}.intermediate_size must be a multiple of hidden_size ({hidden_size}), "
                f"got {intermediate_size!r}"
            )
        overrides["mlp_ratio"] = intermediate_size // hidden_size
    unknown = sorted(field for field in overrides if not hasattr(defaults, field))
    if unknown:
        raise ParamsError(
            f"params.yaml: {key} has key(s) {', '.join(unknown)} that {config_class.__name__} does not define"
        )
    try:
        return config_class(**overrides)
    except (TypeError, ValueError) as error:
        raise ParamsError(f"params.yaml: {key}: {error}") from error


def _load_hf_model(
    name: str, model_class: type, model_type: str, source: str, config_overrides: dict
) -> tuple[torch.nn.Module, dict]:
    """Load ``model_class`` from a save_pretrained directory or a hub id (cache first, then the
    network); refuse checkpoints of another model type or with missing weights."""
    from transformers import AutoConfig

    key = f"backbones.{name}.pretrained"
    how = (
        f"provide them: on a machine with internet run {model_class.__name__}.from_pretrained({source!r})"
        f".save_pretrained(DIR) and set {key}: DIR, or fill the Hugging Face cache there "
        f"(hf download {source}) and copy it, or set weights: random"
    )
    directory = Path(source).expanduser()
    if directory.is_dir():
        attempts = [{}]
    elif _HUB_ID.fullmatch(source) and not directory.exists():
        attempts = [{"local_files_only": True}, {}]  # the local cache first: no network round trip
    else:
        raise WeightsUnavailableError(
            f"{name}: {key} = {source!r} is not a directory written with save_pretrained nor a hub id; {how}"
        )
    errors = []
    for options in attempts:
        try:
            config = AutoConfig.from_pretrained(source, **options)
            break
        except (OSError, ValueError) as error:  # not found, offline, or an unreadable config.json
            errors.append(" ".join(str(error).split()))
    else:
        raise WeightsUnavailableError(
            f"{name}: pretrained weights {source!r} ({key}) are not available ({errors[-1]}); {how}"
        )
    if config.model_type != model_type:
        raise WeightsUnavailableError(
            f"{name}: {source} ({key}) holds a {config.model_type!r} model, family needs {model_type!r}; {how}"
        )
    for field, value in config_overrides.items():
        setattr(config, field, value)
    try:
        model, loading_info = model_class.from_pretrained(
            source, config=config, dtype=torch.float32, attn_implementation=ATTENTION, output_loading_info=True,
            **options
        )
    except (OSError, ValueError) as error:
        raise WeightsUnavailableError(
            f"{name}: weights of {source!r} ({key}) cannot be loaded ({error}); {how}"
        ) from error
    missing = list(loading_info["missing_keys"]) + [str(entry) for entry in loading_info.get("mismatched_keys", [])]
    if missing:
        raise WeightsUnavailableError(
            f"{name}: {source} ({key}) lacks weights for {len(missing)} tensors of {model_class.__name__} "
            f"(e.g. {missing[0]}); refusing to initialise them randomly; {how}"
        )
    if directory.is_dir():
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        weights_info = {"mode": "pretrained", "source": source, "sha256": _sha256(files)}
    else:
        weights_info = {"mode": "pretrained", "source": source, "revision": getattr(config, "_commit_hash", None)}
    return model, weights_info


def _transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Dinov2Model (and ViTMAEModel before transformers 5) keep blocks in encoder.layer,
    ViTMAEModel in transformers 5 in layers."""
    return model.encoder.layer if hasattr(model, "encoder") else model.layers


@dataclass(frozen=True)
class _ViTFamily:
    model_type: str  # transformers' config.model_type of compatible checkpoints
    classes: Callable[[], tuple[type, type, type]]  # -> (config class, model class, extractor class), imported lazily
    runtime_config: dict  # config fields forced for feature extraction


def _build_vit(
    name: str, config: dict, weights: str, device: torch.device, seed: int, family: _ViTFamily
) -> FeatureExtractor:
    _check_keys(name, config, {"family", "pretrained", "image_size", "layer", "image_embedding", "config"})
    params = {"backbones": {name: config}}
    key = f"backbones.{name}"
    image_size = positive_int(params, f"{key}.image_size", 224)
    layer = param(params, f"{key}.layer", int, -1)
    image_embedding = param(params, f"{key}.image_embedding", str, "cls", choices=("cls", "mean"))
    config_class, model_class, extractor_class = family.classes()

    if weights == "random":
        model_config = _hf_config(name, config_class, config.get("config", {}))
        for field, value in family.runtime_config.items():
            setattr(model_config, field, value)
        model_config._attn_implementation = ATTENTION
        model = _random_init(lambda: model_class(model_config), seed)
        weights_info = {"mode": "random", "seed": seed, "source": "random initialisation"}
    else:
        if "config" in config:
            raise ParamsError(
                f"params.yaml: {key}.config overrides the architecture for random initialisation; remove it "
                "when weights: pretrained (the checkpoint defines the architecture)"
            )
        source = param(params, f"{key}.pretrained", str)
        model, weights_info = _load_hf_model(name, model_class, family.model_type, source, family.runtime_config)

    patch_size = _pair(model.config.patch_size)[0]
    if image_size % patch_size:
        raise ParamsError(
            f"params.yaml: {key}.image_size must be a multiple of the patch size {patch_size}, got {image_size}"
        )
    blocks = _transformer_blocks(model)
    if not (1 <= layer <= len(blocks) or -len(blocks) <= layer <= -1):
        raise ParamsError(f"params.yaml: {key}.layer must be in 1..{len(blocks)} or -{len(blocks)}..-1, got {layer}")
    kept_blocks = layer if layer > 0 else len(blocks) + 1 + layer
    del blocks[kept_blocks:]  # blocks after the chosen one are never run
    side = image_size // patch_size
    return extractor_class(
        model,
        image_embedding=image_embedding,
        image_size=image_size,
        grid_size=(side, side),
        embedding_dim=model.config.hidden_size,
        patch_dim=model.config.hidden_size,
        weights_info=weights_info,
        device=device,
    )


def _dinov2_classes() -> tuple[type, type, type]:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Config, Dinov2Model, Dinov2Extractor


def _mae_classes() -> tuple[type, type, type]:
    from transformers import ViTMAEConfig, ViTMAEModel

    return ViTMAEConfig, ViTMAEModel, MAEExtractor


DINOV2 = _ViTFamily(model_type="dinov2", classes=_dinov2_classes, runtime_config={})
MAE = _ViTFamily(model_type="vit_mae", classes=_mae_classes, runtime_config={"mask_ratio": 0.0})


def build_dinov2(name: str, config: dict, weights: str, device: torch.device, seed: int) -> FeatureExtractor:
    return _build_vit(name, config, weights, device, seed, DINOV2)


def build_mae(name: str, config: dict, weights: str, device: torch.device, seed: int) -> FeatureExtractor:
    return _build_vit(name, config, weights, device, seed, MAE)


