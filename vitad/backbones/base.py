"""Feature extractors: a frozen model plus the post-processing that turns its outputs into image
embeddings [B, D] and patch grids [B, h, w, D], and what every backbone family shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from vitad.core.params import ParamsError, param, positive_int

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


def weights_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:<hex>`` of the model's weights as loaded: every state_dict tensor's name, dtype,
    shape and bytes, in name order (independent of memory layout such as channels_last).

    Equal fingerprints mean the same weights bit for bit: loaded pretrained weights give the same
    fingerprint on every machine; seeded random initialisation gives it wherever torch draws the
    same random numbers (the same torch version; its vectorised samplers may differ in the last
    bit between CPU kinds, and then the fingerprint says so)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()}"


class FeatureExtractor:
    """A frozen model plus the post-processing that turns its outputs into features.

    ``extractor(images)`` with images [B, 3, S, S] (S == ``image_size``) returns
    ``(image_embeddings [B, embedding_dim], patch_grid [B, h, w, patch_dim])``, float32 on the
    CPU, patch grid in raster order (row i, column j covers input pixels of row band i, column
    band j). :meth:`extract_into` writes the same features into preallocated arrays instead.
    """

    # How many batches the extraction runs at once on CPU, each with its share of the torch
    # threads (vitad.streams): one by default, since every batch in flight holds its own
    # activations (a ViT-B batch of 8 at 448 px: about 0.4 GB), and a model whose forward pass
    # already keeps the cores busy gains nothing from a second.
    cpu_streams = 1

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
        self.weights_info = {**weights_info, "fingerprint": weights_fingerprint(model)}
        self.model = model.eval().requires_grad_(False).to(device)
        self.image_size = image_size
        self.grid_size = grid_size
        self.embedding_dim = embedding_dim
        self.patch_dim = patch_dim
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
                f"expected images [B, 3, {self.image_size}, {self.image_size}] (RGB, see vitad.core.data.load_rgb and "
                f"collate), got {list(images.shape)}"
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

    def extract_arrays(self, images: torch.Tensor, patch_dtype: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings [B, embedding_dim] float32, patch grid [B, h, w, patch_dim] in
        ``patch_dtype``) of ``images``, new numpy arrays written by :meth:`extract_into`."""
        image_embeddings = np.empty((len(images), self.embedding_dim), dtype=np.float32)
        patch_grid = np.empty((len(images), *self.grid_size, self.patch_dim), dtype=patch_dtype)
        self.extract_into(images, torch.from_numpy(image_embeddings), torch.from_numpy(patch_grid))
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


CNN_KEYS = {"layers", "local_average", "count_include_pad", "upsample", "image_embedding"}


@dataclass(frozen=True)
class CNNFeatures:
    """How a CNN's layer outputs become patch features (``backbones.<name>`` keys, validated by
    :meth:`from_config`).

    ``layers``: which outputs, finest first (concatenated in that order on the finest grid);
    ``local_average``: odd side of the local average pooling (PatchCore: 3, PaDiM: 1 = none);
    ``count_include_pad``: whether the zero padding counts in that average at the borders
    (PatchCore and anomalib: true; false averages the real neighbours only, so border patches are
    not pulled towards zero); ``upsample``: ``bilinear`` (PatchCore) or ``nearest`` (PaDiM) for
    coarser layers; ``image_embedding``: ``pooled`` (global mean of the deepest layer) or ``mean``
    (mean of the patch grid).
    """

    layers: list[str]
    local_average: int = 3
    count_include_pad: bool = False
    upsample: str = "bilinear"
    image_embedding: str = "pooled"

    @classmethod
    def from_config(cls, name: str, config: dict, known_layers: list[str], default_layers: list[str]) -> "CNNFeatures":
        params = {"backbones": {name: config}}
        key = f"backbones.{name}"
        layers = param(params, f"{key}.layers", list, default_layers)
        if not layers or any(layer not in known_layers for layer in layers) or len(set(layers)) != len(layers):
            raise ParamsError(
                f"params.yaml: {key}.layers must be a non-empty list of distinct {', '.join(known_layers)}; got {layers!r}"
            )
        local_average = positive_int(params, f"{key}.local_average", 3)
        if local_average % 2 == 0:
            raise ParamsError(f"params.yaml: {key}.local_average must be odd (a centred neighbourhood), got {local_average}")
        return cls(
            layers=sorted(layers, key=known_layers.index),
            local_average=local_average,
            count_include_pad=param(params, f"{key}.count_include_pad", bool, False),
            upsample=param(params, f"{key}.upsample", str, "bilinear", choices=("bilinear", "nearest")),
            image_embedding=param(params, f"{key}.image_embedding", str, "pooled", choices=("pooled", "mean")),
        )

    def dims(self, channels: list[int]) -> tuple[int, int]:
        """(embedding_dim, patch_dim) for the layers' channel counts."""
        return (channels[-1] if self.image_embedding == "pooled" else sum(channels)), sum(channels)


class CNNExtractor(FeatureExtractor):
    """PatchCore-style locally averaged, multi-layer CNN features (ResNets, EfficientNet-Lite).

    ``trunk(pixels)`` returns {layer name: [B, C, h_layer, w_layer]} for every layer of
    ``features`` (a :class:`CNNFeatures`)."""

    # Two batches at once: while one is decoded, the other's forward pass keeps the cores busy,
    # and these convolutions scale better on half the threads twice than on all of them once;
    # the price is a second batch's activations and decoded images plus a second malloc arena
    # (WRN50 at 224 px from 1024 px images: about 0.4 GB, README "CPU streams").
    cpu_streams = 2

    def __init__(self, trunk: torch.nn.Module, *, features: CNNFeatures, **kwargs):
        # channels_last runs oneDNN convolutions without layout reorders (about 15 % faster on CPU),
        # and makes each [B, C, h, w] map a contiguous [B, h, w, C] patch grid.
        super().__init__(trunk.to(memory_format=torch.channels_last), **kwargs)
        self.features = features

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return super().prepare(images).contiguous(memory_format=torch.channels_last)

    def _model_forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(pixels)  # layer name -> [B, C, h_layer, w_layer]

    def _write_features(
        self, feature_maps: dict[str, torch.Tensor], image_embeddings: torch.Tensor, patch_grid: torch.Tensor
    ) -> None:
        features = self.features
        offset = 0
        for name in features.layers:
            feature_map = feature_maps[name]
            if features.local_average > 1:
                feature_map = F.avg_pool2d(
                    feature_map, features.local_average, stride=1, padding=features.local_average // 2,
                    count_include_pad=features.count_include_pad,
                )
            channels = feature_map.shape[1]
            # Each layer's channels go straight into their slice of the grid (no concatenated copy).
            destination = patch_grid[..., offset : offset + channels]  # [B, h, w, C]
            factors = self._nearest_factors(feature_map)
            if factors is not None:
                # Nearest upsampling by integer factors repeats each value over an fh x fw block:
                # written through a blocked view of the grid, with no upsampled map in between.
                (factor_h, factor_w), (height, width) = factors, feature_map.shape[-2:]
                blocks = destination.unflatten(2, (width, factor_w)).unflatten(1, (height, factor_h))  # [B, h, fh, w, fw, C]
                # [B, C, h, w] -> [B, h, 1, w, 1, C], broadcast over the blocks
                _copy(blocks, feature_map.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(blocks.shape))
            else:
                if tuple(feature_map.shape[-2:]) != self.grid_size:
                    align = {"align_corners": False} if features.upsample == "bilinear" else {}
                    feature_map = F.interpolate(feature_map, size=self.grid_size, mode=features.upsample, **align)
                _copy(destination, feature_map.permute(0, 2, 3, 1))  # [B, C, h, w] -> [B, h, w, C]
            if features.image_embedding == "mean":
                # after the blocked copy feature_map is still the coarse map; every value of it fills
                # fh x fw cells, so its mean is the upsampled map's up to float32 rounding
                _copy(image_embeddings[:, offset : offset + channels], feature_map.mean(dim=(2, 3)))
            offset += channels
        if features.image_embedding == "pooled":
            _copy(image_embeddings, feature_maps[features.layers[-1]].mean(dim=(2, 3)))

    def _nearest_factors(self, feature_map: torch.Tensor) -> tuple[int, int] | None:
        """(fh, fw) when ``feature_map`` reaches the grid by nearest upsampling with integer
        factors greater than one (each source value then fills an fh x fw block), else None."""
        (height, width), (grid_height, grid_width) = feature_map.shape[-2:], self.grid_size
        if self.features.upsample != "nearest" or (height, width) == self.grid_size:
            return None
        if grid_height % height or grid_width % width:
            return None
        return grid_height // height, grid_width // width


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
    unknown = sorted(set(config) - allowed - {"weights"})  # weights: every family's per-backbone switch
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

