"""One registry of frozen backbones: images -> image embeddings [B, D] and patch grids [B, h, w, D].

Families (``backbones.<name>.family`` in params.yaml) and what they return:

- ``torchvision_resnet`` (``arch``: resnet18 ... wide_resnet101_2): PatchCore features. Each
  layer in ``layers`` (default layer2 + layer3) is averaged over a ``local_average`` x
  ``local_average`` neighbourhood (default 3), deeper layers are bilinearly upsampled to the
  grid of the first listed layer (28 x 28 at 224 px) and channels are concatenated. Image
  embedding ``pooled``: global average of the deepest listed layer; ``mean``: mean of the grid.
  Only the layers up to the deepest listed one are computed.
- ``dinov2`` (transformers ``Dinov2Model``, patch 14, any input size that is a multiple of it)
  and ``mae`` (``ViTMAEModel``, patch 16, masking off, tokens restored to raster order).
  ``layer``: transformer block whose output is used (-1 = last, 1 = first; blocks after it are
  dropped); the model's final LayerNorm is applied to it, as for the last block
  (``last_hidden_state``). Image embedding ``cls`` or ``mean`` (mean of the patch tokens).

Weights: the global ``weights`` switch is ``random`` (seeded random initialisation, offline;
``config`` may then override the architecture for tiny test models) or ``pretrained``
(``backbones.<name>.pretrained``: a Hugging Face hub id or a ``save_pretrained`` directory for
the transformers families; a torchvision weights name such as ``IMAGENET1K_V2`` or a
``torch.save(model.state_dict(), path)`` file for ResNets). Weights that are required but
cannot be had raise :class:`WeightsUnavailableError` while the extractor is built, before any
image is read; nothing ever falls back to random weights. ``weights_info`` records which
weights produced the features.

Inputs are [B, 3, S, S] tensors from :func:`vitad.data.preprocess` (resize without centre crop,
ImageNet normalisation). Mixed precision (bf16, else fp16) is used on CUDA only; CPU runs fp32.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vitad.params import ParamsError, param, positive_int

WEIGHTS_MODES = ("random", "pretrained")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class WeightsUnavailableError(ParamsError):
    """Pretrained weights are required (``weights: pretrained``) but cannot be loaded."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ParamsError(f"params.yaml: extract.device must be auto, cpu or cuda, got {device!r}") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ParamsError(f"params.yaml: extract.device must be auto, cpu or cuda, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: extract.device is cuda but no CUDA device is available; use auto or cpu")
    return resolved


class FeatureExtractor:
    """A frozen model plus the post-processing that turns its outputs into features.

    ``extractor(images)`` with images [B, 3, S, S] (S == ``image_size``) returns
    ``(image_embeddings [B, embedding_dim], patch_grid [B, h, w, patch_dim])``, float32 on the
    CPU, patch grid in raster order (row i, column j covers input pixels of row band i, column
    band j). :meth:`extract_into` writes the same features into preallocated arrays instead.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        image_size: int,
        grid_size: tuple[int, int],
        embedding_dim: int,
        patch_dim: int,
        weights_info: dict,
        device: torch.device,
    ):
        self.model = model.eval().requires_grad_(False).to(device)
        self.image_size = image_size
        self.grid_size = grid_size
        self.embedding_dim = embedding_dim
        self.patch_dim = patch_dim
        self.weights_info = weights_info
        self.device = device
        if device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.autocast_dtype = None

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else f"autocast {str(self.autocast_dtype).removeprefix('torch.')}"

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check the batch and move it to the device in the layout the model runs fastest on."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images [B, 3, {self.image_size}, {self.image_size}] (RGB, see vitad.data.load_rgb and "
                f"preprocess), got {list(images.shape)}"
            )
        return images.to(self.device, dtype=torch.float32, non_blocking=True)

    def bare_forward(self, pixels: torch.Tensor) -> Any:
        """The model's forward alone on a prepared batch (what benchmarks compare against)."""
        with torch.inference_mode(), self._autocast():
            return self._model_forward(pixels)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeddings = torch.empty(len(images), self.embedding_dim)
        patch_grid = torch.empty(len(images), *self.grid_size, self.patch_dim)
        self.extract_into(images, image_embeddings, patch_grid)
        return image_embeddings, patch_grid

    def extract_into(self, images: torch.Tensor, image_embeddings: torch.Tensor, patch_grid: torch.Tensor) -> None:
        """Write the features of ``images`` into CPU tensors [B, embedding_dim] and
        [B, h, w, patch_dim] of any float dtype (e.g. views of a bank's arrays); the dtype
        conversion happens in the copy itself, so no intermediate arrays are made."""
        pixels = self.prepare(images)
        with torch.inference_mode(), self._autocast():
            self._write_features(self._model_forward(pixels), image_embeddings, patch_grid)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _model_forward(self, pixels: torch.Tensor) -> Any:
        raise NotImplementedError

    def _write_features(self, outputs: Any, image_embeddings: torch.Tensor, patch_grid: torch.Tensor) -> None:
        raise NotImplementedError


def _copy(destination: torch.Tensor, values: torch.Tensor) -> None:
    """destination <- values; from a GPU, convert there first so only the final dtype travels."""
    destination.copy_(values if values.device == destination.device else values.to(destination.dtype))


class ResNetExtractor(FeatureExtractor):
    """PatchCore-style locally averaged, multi-layer CNN features."""

    def __init__(
        self, trunk: torch.nn.Module, *, layers: list[str], local_average: int, image_embedding: str, **kwargs
    ):
        # channels_last runs oneDNN convolutions without layout reorders (about 15 % faster on CPU),
        # and makes each [B, C, h, w] map a contiguous [B, h, w, C] patch grid.
        super().__init__(trunk.to(memory_format=torch.channels_last), **kwargs)
        self.layers = layers
        self.local_average = local_average
        self.image_embedding = image_embedding

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return super().prepare(images).contiguous(memory_format=torch.channels_last)

    def _model_forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(pixels)  # layer name -> [B, C, h_layer, w_layer]

    def _write_features(
        self, feature_maps: dict[str, torch.Tensor], image_embeddings: torch.Tensor, patch_grid: torch.Tensor
    ) -> None:
        offset = 0
        for name in self.layers:
            feature_map = feature_maps[name]
            if self.local_average > 1:
                # count_include_pad=False: border patches average their real neighbours only
                # instead of being pulled towards zero (defects at borders stay visible).
                feature_map = F.avg_pool2d(
                    feature_map, self.local_average, stride=1, padding=self.local_average // 2, count_include_pad=False
                )
            if tuple(feature_map.shape[-2:]) != self.grid_size:
                feature_map = F.interpolate(feature_map, size=self.grid_size, mode="bilinear", align_corners=False)
            channels = feature_map.shape[1]
            # Each layer's channels go straight into their slice of the grid (no concatenated copy);
            # permute: [B, C, h, w] -> [B, h, w, C].
            _copy(patch_grid[..., offset : offset + channels], feature_map.permute(0, 2, 3, 1))
            if self.image_embedding == "mean":
                _copy(image_embeddings[:, offset : offset + channels], feature_map.mean(dim=(2, 3)))
            offset += channels
        if self.image_embedding == "pooled":
            _copy(image_embeddings, feature_maps[self.layers[-1]].mean(dim=(2, 3)))


class ViTExtractor(FeatureExtractor):
    """Token sequence [B, 1 + h*w, D] (CLS first, patches in raster order) -> features."""

    def __init__(self, model: torch.nn.Module, *, image_embedding: str, **kwargs):
        super().__init__(model, **kwargs)
        self.image_embedding = image_embedding

    def _tokens(self, outputs: Any) -> torch.Tensor:
        return outputs.last_hidden_state

    def _write_features(self, outputs: Any, image_embeddings: torch.Tensor, patch_grid: torch.Tensor) -> None:
        tokens = self._tokens(outputs)
        patch_tokens = tokens[:, 1:]
        _copy(patch_grid, patch_tokens.reshape(patch_grid.shape))  # [B, h*w, D] -> [B, h, w, D]
        _copy(image_embeddings, tokens[:, 0] if self.image_embedding == "cls" else patch_tokens.mean(dim=1))


class Dinov2Extractor(ViTExtractor):
    def _model_forward(self, pixels: torch.Tensor) -> Any:
        return self.model(pixel_values=pixels)


class MAEExtractor(ViTExtractor):
    """ViTMAEModel with masking off. Its random_masking shuffles the kept tokens even at
    mask_ratio 0; noise = arange makes the shuffle the identity (deterministic, bit-for-bit
    reproducible outputs) and the gather with ``ids_restore`` puts tokens in raster order
    whatever order the model kept them in."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        height, width = self.grid_size
        self.raster_noise = torch.arange(height * width, dtype=torch.float32, device=self.device)[None]  # [1, L]
        self.interpolate_pos_encoding = self.image_size != _pair(model.config.image_size)[0]

    def _model_forward(self, pixels: torch.Tensor) -> Any:
        noise = self.raster_noise.expand(pixels.shape[0], -1)  # [B, L]
        return self.model(pixel_values=pixels, noise=noise, interpolate_pos_encoding=self.interpolate_pos_encoding)

    def _tokens(self, outputs: Any) -> torch.Tensor:
        tokens = outputs.last_hidden_state  # [B, 1 + L, D], patches in kept order
        index = outputs.ids_restore[..., None].expand(-1, -1, tokens.shape[-1])  # [B, L, D]
        patch_tokens = torch.gather(tokens[:, 1:], dim=1, index=index)
        return torch.cat([tokens[:, :1], patch_tokens], dim=1)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_keys(name: str, config: dict, allowed: set[str]) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ParamsError(
            f"params.yaml: backbones.{name} has unknown key(s) {', '.join(unknown)} for family "
            f"{config['family']} (allowed: {', '.join(sorted(allowed))})"
        )


def _random_init(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a model under a fixed seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --- torchvision ResNets -------------------------------------------------------------------


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

    _check_keys(
        name, config, {"family", "arch", "pretrained", "image_size", "layers", "local_average", "image_embedding"}
    )
    params = {"backbones": {name: config}}
    key = f"backbones.{name}"
    arch = param(params, f"{key}.arch", str, "resnet50", choices=RESNET_ARCHS)
    image_size = positive_int(params, f"{key}.image_size", 224)
    layers = param(params, f"{key}.layers", list, ["layer2", "layer3"])
    if not layers or any(layer not in RESNET_LAYERS for layer in layers) or len(set(layers)) != len(layers):
        raise ParamsError(
            f"params.yaml: {key}.layers must be a non-empty list of distinct {', '.join(RESNET_LAYERS)}; got {layers!r}"
        )
    layers = sorted(layers, key=RESNET_LAYERS.index)
    local_average = positive_int(params, f"{key}.local_average", 3)
    if local_average % 2 == 0:
        raise ParamsError(
            f"params.yaml: {key}.local_average must be odd (a centred neighbourhood), got {local_average}"
        )
    image_embedding = param(params, f"{key}.image_embedding", str, "pooled", choices=("pooled", "mean"))

    if weights == "random":
        model = _random_init(lambda: torchvision.models.get_model(arch, weights=None), seed)
        weights_info = {"mode": "random", "seed": seed, "source": "random initialisation"}
    else:
        source = param(params, f"{key}.pretrained", str)
        model = torchvision.models.get_model(arch, weights=None)
        weights_info = _load_resnet_weights(name, arch, source, model)
    channels = [_resnet_channels(model, layer) for layer in layers]
    # Graph truncated after the deepest requested layer: layer4 / fc are never computed.
    trunk = create_feature_extractor(model, return_nodes={layer: layer for layer in layers})
    return ResNetExtractor(
        trunk,
        layers=layers,
        local_average=local_average,
        image_embedding=image_embedding,
        image_size=image_size,
        grid_size=_resnet_grid(image_size, layers[0]),
        embedding_dim=channels[-1] if image_embedding == "pooled" else sum(channels),
        patch_dim=sum(channels),
        weights_info=weights_info,
        device=device,
    )


# --- transformers ViTs (DINOv2, MAE) -------------------------------------------------------


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
            source, config=config, dtype=torch.float32, output_loading_info=True, **options
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


BACKBONES: dict[str, Callable[[str, dict, str, torch.device, int], FeatureExtractor]] = {
    "torchvision_resnet": build_resnet,
    "dinov2": build_dinov2,
    "mae": build_mae,
}


def build_extractor(
    name: str, config: dict, weights: str, device: str | torch.device = "cpu", seed: int = 0
) -> FeatureExtractor:
    """Build the extractor described by ``backbones.<name>`` (``config``) under the global
    ``weights`` switch. Loads (or randomly initialises) everything before returning, so missing
    weights fail here, before any image is read."""
    if weights not in WEIGHTS_MODES:
        raise ParamsError(f"params.yaml: weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights!r}")
    if not isinstance(config, dict):
        raise ParamsError(f"params.yaml: backbones.{name} must be a mapping, got {config!r}")
    family = config.get("family")
    if family not in BACKBONES:
        raise ParamsError(f"params.yaml: backbones.{name}.family must be one of {', '.join(BACKBONES)}, got {family!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamsError(f"params.yaml: extract.seed must be an integer, got {seed!r}")
    device = resolve_device(device) if isinstance(device, str) else device
    return BACKBONES[family](name, config, weights, device, seed)
