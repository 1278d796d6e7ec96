"""Convert the timm DINOv2 weights saved by ``anomalib_reference.py`` into a transformers model.

Why: the parity benchmark runs anomalib's AnomalyDINO with a seeded random timm DINOv2
(no weight download is possible here); vitad loads DINOv2 through transformers. To compare
like with like, vitad must load exactly those weights, so this module rewrites the timm
state_dict as a ``Dinov2Model`` (``Dinov2WithRegistersModel`` for register variants) and
``save_pretrained``s it, so ``Dinov2Model.from_pretrained(out_dir)`` works offline.

Runs in vitad's main venv (transformers + timm); anomalib is not needed. ``python
benchmarks/parity_weights.py [--state-dict P --config J]`` self-tests the conversion: timm vs
transformers on random inputs at 224 px, at AnomalyDINO's 252 px and at the pos_embed's native
size, for timm's own ``forward_features`` and for anomalib's AnomalyDINO feature path (last
block, final LayerNorm, patch tokens only, pos-embed resampling with antialias=False).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch


def _attention_names(model) -> tuple[str, str, str, str]:
    """transformers renamed the attention projections (query/key/value/output.dense ->
    q_proj/k_proj/v_proj/o_proj); map onto whichever this install uses."""
    keys = model.state_dict().keys()
    if "encoder.layer.0.attention.q_proj.weight" in keys:
        return "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"
    return ("attention.attention.query", "attention.attention.key", "attention.attention.value",
            "attention.output.dense")


def timm_dinov2_to_transformers(state_dict_path, config_json_path, out_dir):
    """Rewrite a timm DINOv2 state_dict (+ the JSON config written next to it) as a transformers
    model saved under ``out_dir``; returns ``out_dir``.

    Mapping: cls_token, pos_embed -> position_embeddings (a zero class slot is prepended when timm
    keeps no class position, i.e. ``no_embed_class``), patch_embed.proj -> patch_embeddings.
    projection, per block norm1/norm2, attn.qkv split in thirds into query/key/value, attn.proj,
    ls1/ls2.gamma -> layer_scale1/2.lambda1, mlp.fc1/fc2, final norm -> layernorm; mask_token is
    zero (timm has none; it is only used with bool_masked_pos).
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = json.loads(Path(config_json_path).read_text())
    sd = torch.load(state_dict_path, map_location="cpu")
    dim, depth = cfg["embed_dim"], cfg["depth"]
    mlp_ratio = cfg["mlp_ratio"]  # transformers' config validator wants an int when integral
    mlp_ratio = int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio
    common = dict(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=cfg["num_heads"],
        mlp_ratio=mlp_ratio, patch_size=cfg["patch_size"], image_size=cfg["img_size"],
        layerscale_value=cfg["layerscale_init"] or 1.0, layer_norm_eps=cfg["norm_eps"],
        qkv_bias=cfg["qkv_bias"], hidden_act="gelu", use_swiglu_ffn=False, drop_path_rate=0.0,
    )
    if cfg["num_reg_tokens"]:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=cfg["num_reg_tokens"], **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    q, k, v, o = _attention_names(model)

    pos = sd["pos_embed"]
    if pos.shape[1] == cfg["pos_embed_grid"][0] * cfg["pos_embed_grid"][1]:  # no class slot
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    new = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros_like(model.embeddings.mask_token),
        "embeddings.position_embeddings": pos,
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if cfg["num_reg_tokens"]:
        new["embeddings.register_tokens"] = sd["reg_token"]
    for i in range(depth):
        s, t = f"blocks.{i}.", f"encoder.layer.{i}."
        qw, kw, vw = sd[s + "attn.qkv.weight"].chunk(3, dim=0)
        qb, kb, vb = sd[s + "attn.qkv.bias"].chunk(3, dim=0)
        new |= {
            t + "norm1.weight": sd[s + "norm1.weight"], t + "norm1.bias": sd[s + "norm1.bias"],
            t + f"{q}.weight": qw, t + f"{q}.bias": qb,
            t + f"{k}.weight": kw, t + f"{k}.bias": kb,
            t + f"{v}.weight": vw, t + f"{v}.bias": vb,
            t + f"{o}.weight": sd[s + "attn.proj.weight"], t + f"{o}.bias": sd[s + "attn.proj.bias"],
            t + "layer_scale1.lambda1": sd[s + "ls1.gamma"], t + "layer_scale2.lambda1": sd[s + "ls2.gamma"],
            t + "norm2.weight": sd[s + "norm2.weight"], t + "norm2.bias": sd[s + "norm2.bias"],
            t + "mlp.fc1.weight": sd[s + "mlp.fc1.weight"], t + "mlp.fc1.bias": sd[s + "mlp.fc1.bias"],
            t + "mlp.fc2.weight": sd[s + "mlp.fc2.weight"], t + "mlp.fc2.bias": sd[s + "mlp.fc2.bias"],
        }
    unused = set(sd) - {"cls_token", "pos_embed", "reg_token", "norm.weight", "norm.bias",
                        "patch_embed.proj.weight", "patch_embed.proj.bias"}
    unused = {key for key in unused if not key.startswith("blocks.")} - {"head.weight", "head.bias"}
    if unused:
        raise ValueError(f"timm tensors not mapped: {sorted(unused)}")
    model.load_state_dict({key: val.contiguous().clone() for key, val in new.items()}, strict=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- self-test
@contextlib.contextmanager
def _anomalib_pos_embed_resampling():
    """anomalib's TimmFeatureExtractor replaces timm.models.vision_transformer's
    resample_abs_pos_embed with an antialias=False version for ViT backbones
    (feature_extractors/timm.py:_disable_pos_embed_antialiasing). Reproduce it here."""
    import timm.models.vision_transformer as vit

    original = vit.resample_abs_pos_embed

    def no_antialias(*args, **kwargs):
        kwargs["antialias"] = False
        return original(*args, **kwargs)

    vit.resample_abs_pos_embed = no_antialias
    try:
        yield
    finally:
        vit.resample_abs_pos_embed = original


def _random_timm_dinov2(tmp: Path, name: str = "vit_small_patch14_dinov2", seed: int = 0) -> tuple[Path, Path]:
    """A seeded random timm DINOv2 + config JSON in the same format as anomalib_reference.py."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, dynamic_img_size=True)
    gamma = vit.blocks[0].ls1.gamma.detach()
    cfg = {"timm_model": name, "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
           "num_heads": vit.blocks[0].attn.num_heads, "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
           "qkv_bias": True, "patch_size": vit.patch_embed.patch_size[0], "img_size": vit.patch_embed.img_size[0],
           "pos_embed_grid": list(vit.patch_embed.grid_size), "num_reg_tokens": int(vit.num_reg_tokens),
           "no_embed_class": bool(vit.no_embed_class), "layerscale_init": float(gamma[0]), "norm_eps": vit.norm.eps}
    torch.save(vit.state_dict(), tmp / "timm.pth")
    (tmp / "timm.json").write_text(json.dumps(cfg))
    return tmp / "timm.pth", tmp / "timm.json"


def self_test(state_dict_path: Path, config_path: Path, seed: int = 0) -> dict:
    """Compare timm and the converted transformers model on random inputs; print max |diff|."""
    import timm
    from transformers import AutoModel

    cfg = json.loads(Path(config_path).read_text())
    vit = timm.create_model(cfg["timm_model"], pretrained=False, dynamic_img_size=True)
    vit.load_state_dict(torch.load(state_dict_path, map_location="cpu"), strict=True)
    vit.eval()
    prefix = 1 + cfg["num_reg_tokens"]
    results = {}
    with tempfile.TemporaryDirectory() as out:
        hf = AutoModel.from_pretrained(timm_dinov2_to_transformers(state_dict_path, config_path, out)).eval()
        gen = torch.Generator().manual_seed(seed)
        for size in sorted({224, 252, cfg["img_size"]}):
            x = torch.randn(2, 3, size, size, generator=gen)
            with torch.no_grad():
                hf_tokens = hf(pixel_values=x).last_hidden_state
                timm_tokens = vit.forward_features(x)  # timm's default resampling: antialias=True
                with _anomalib_pos_embed_resampling():  # anomalib's AnomalyDINO feature path
                    anomalib_patches = vit.forward_intermediates(
                        x, indices=[cfg["depth"] - 1], norm=True, output_fmt="NLC", intermediates_only=True)[0]
            results[size] = {
                "timm_forward_features_vs_hf_last_hidden_state": float((timm_tokens - hf_tokens).abs().max()),
                "anomalib_patch_tokens_vs_hf_patch_tokens": float((anomalib_patches - hf_tokens[:, prefix:]).abs().max()),
                "feature_scale_max_abs": float(hf_tokens.abs().max()),
            }
            print(f"{size:4d} px ({size // cfg['patch_size']}x{size // cfg['patch_size']} patches): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in results[size].items()))
    return results


def pos_embed_resampling_gap(state_dict_path: Path, config_path: Path, size: int = 224) -> float:
    """Size of the difference between the two pos-embed resamplings at ``size`` px (bicubic,
    align_corners=False, antialias True vs False) on the actual pos_embed weights."""
    import torch.nn.functional as F

    cfg = json.loads(Path(config_path).read_text())
    pos = torch.load(state_dict_path, map_location="cpu")["pos_embed"]
    g = cfg["pos_embed_grid"][0]
    grid = pos[:, -g * g:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    new = size // cfg["patch_size"]
    a = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    b = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=False)
    return float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dict", type=Path, help="anomalydino_dinov2.pth (default: a random timm DINOv2)")
    ap.add_argument("--config", type=Path, help="anomalydino_dinov2.json")
    ap.add_argument("--out", type=Path, help="also save the converted model here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.state_dict is None:
            args.state_dict, args.config = _random_timm_dinov2(Path(tmp))
        print(f"self-test on {args.state_dict}")
        results = self_test(args.state_dict, args.config)
        gap = pos_embed_resampling_gap(args.state_dict, args.config)
        print(f"pos_embed bicubic resampling to 224 px, antialias True vs False: max |diff| {gap:.3g}")
        for size, r in results.items():
            assert r["anomalib_patch_tokens_vs_hf_patch_tokens"] < 1e-4, (size, r)
        # A random-init DINOv2 has LayerScale gammas of 1e-5, so the blocks barely touch the
        # tokens and a wrong block mapping could hide. Re-test with gammas = 1 to exercise them.
        sd = torch.load(args.state_dict, map_location="cpu")
        sd = {k: torch.ones_like(v) if k.endswith(("ls1.gamma", "ls2.gamma")) else v for k, v in sd.items()}
        torch.save(sd, Path(tmp) / "gamma1.pth")
        print("self-test with LayerScale gammas set to 1 (blocks fully active)")
        for size, r in self_test(Path(tmp) / "gamma1.pth", args.config).items():
            assert r["anomalib_patch_tokens_vs_hf_patch_tokens"] < 1e-4, (size, r)
        if args.out:
            timm_dinov2_to_transformers(args.state_dict, args.config, args.out)
            print(f"saved transformers model to {args.out}")


if __name__ == "__main__":
    main()
