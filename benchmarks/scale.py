"""Full MVTec AD scale on one machine: the real extract and score code on an MVTec-size category.

Generates one category with the embedded generator at MVTec AD's size (default 400 training and
150 test images of 1024 px; the ``mesh`` category, single-channel like MVTec's grid / screw /
zipper) into ``--work`` (kept between runs), then runs, each in its own process so that its peak
RSS is its own:

- extract: ``extract_bank`` (the extract stage's code) for each backbone and input size of the chosen
  configurations (random weights: the pretrained ones cannot be downloaded here, and the cost
  does not depend on them);
- score: ``read_bank`` + ``score_bank`` (patch level and image-embedding level), per configuration;
- coreset: vitad's greedy coreset and anomalib's ``KCenterGreedy`` on the same projected vectors
  (a sample of the WRN50 bank both can handle), through anomalib's own venv.

Each stage prints wall time, CPU time, the peak RSS of its process against the memory bound
(2 x the largest array the stage must hold + 1 GB) and, for extraction, against that bound plus
the model's weights (arrays the stage must also hold, once), the peak RSS of the imports and the
model alone (before any image), the bank size on disk, and the physical bound
it is compared with, measured in the same process: a bare forward pass for extraction, a plain
faiss search of the same shape for kNN scoring, one pass over the training bank for coreset and
Gaussian fits. Ratios come from wall and from CPU time: on a shared machine the CPU-time ratio is
the steadier one.

    python benchmarks/scale.py [--configs wrn50-patchcore wrn50-padim ...] [--train 400 --test 150]
                               [--image-size 1024] [--device cpu] [--coreset-sample 40960]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitad.core.params import load_params, param  # noqa: E402

GB = 1e9
CATEGORY = "mesh"
# name: (backbone, input size, method, scorer settings)
CONFIGS = {
    "wrn50-patchcore": ("wide_resnet50_2", 224, "knn", {"metric": "euclidean", "k": 1, "coreset_ratio": 0.1,
                                                          "reweight_neighbors": 9}),
    "wrn50-padim": ("wide_resnet50_2", 224, "mahalanobis", {"per_position": True, "feature_subset": 550,
                                                             "shrinkage": "fixed", "epsilon": 0.01, "ddof": 1}),
    "dinov2-knn-coreset": ("dinov2_vitb14", 224, "knn", {"metric": "cosine", "coreset_ratio": 0.1}),
    "dinov2-knn": ("dinov2_vitb14", 224, "knn", {"metric": "cosine", "coreset_ratio": 1.0}),
    "mae-mahalanobis": ("mae_vitb16", 224, "mahalanobis", {"shrinkage": "ledoit_wolf"}),
    "dinov2-448-knn-coreset": ("dinov2_vitb14", 448, "knn", {"metric": "cosine", "coreset_ratio": 0.1}),
    "dinov2-448-knn": ("dinov2_vitb14", 448, "knn", {"metric": "cosine", "coreset_ratio": 1.0}),
    "mae-448-mahalanobis": ("mae_vitb16", 448, "mahalanobis", {"shrinkage": "ledoit_wolf"}),
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu_seconds() -> float:
    return time.process_time()


def dataset(work: Path, train: int, test: int, image_size: int) -> Path:
    """The generated category (reused when present): ``test`` split into good images and the
    category's three defect types."""
    from vitad import synthetic

    root = work / f"{CATEGORY}-{image_size}px-{train}train-{test}test"
    if not (root / CATEGORY).is_dir():
        per_defect = (test - test // 5) // 3
        start = time.perf_counter()
        synthetic.generate(root, [CATEGORY], seed=0, train_images=train, test_good_images=test - 3 * per_defect,
                           test_images_per_defect=per_defect, image_size=image_size)
        print(f"generated {root} in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def bank_path(work: Path, root: Path, backbone: str, size: int) -> Path:
    return work / "banks" / root.name / f"{backbone}-{size}.safetensors"


# --- stages (each runs in its own process) -----------------------------------------------------------


def stage_extract(args) -> dict:
    import torch

    from vitad.backbones import build_extractor, resolve_device
    from vitad.core.data import ImageDataset, collate, index_category
    from vitad.featurebank import bank_info, extract_bank

    params = load_params(REPO / "params.yaml")
    config = dict(param(params, f"backbones.{args.backbone}", dict), image_size=args.size)
    device = resolve_device(args.device)
    extractor = build_extractor(args.backbone, config, "random", device, 0)
    runtime_rss = _peak_rss_bytes()  # interpreter, torch, transformers / torchvision and the model
    weights_bytes = sum(tensor.nbytes for tensor in extractor.model.state_dict().values())
    samples = index_category(args.root, CATEGORY)
    # Bare forward: the model alone on decoded, normalised batches already in memory (a sample of
    # batches, after a warm-up), as images/s.
    loader = torch.utils.data.DataLoader(ImageDataset(args.root, samples[: 4 * args.batch_size], extractor.image_size),
                                         batch_size=args.batch_size, collate_fn=collate)
    batches = [extractor.prepare(images) for images, _ in loader]
    extractor.bare_forward(batches[0])
    timed_batches = batches[1:] or batches  # a category of one batch times that batch again

    def bare() -> None:
        for pixels in timed_batches:
            extractor.bare_forward(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()

    per_image = 1.0 / sum(len(pixels) for pixels in timed_batches)
    bare_seconds, bare_cpu = (value * per_image * len(samples) for value in _timed(bare))
    del batches, loader
    out = Path(args.out)
    info = bank_info(args.backbone, CATEGORY, config, "random", extractor, "float16")
    seconds, cpu_seconds = _timed(lambda: extract_bank(out, extractor, args.root, samples, args.batch_size, info,
                                                       progress=False))
    # The bound keeps counting the bank's float16 patches as an array the stage holds, although
    # extract_bank writes them batch by batch: the same bound as before, so ratios compare.
    largest = len(samples) * extractor.grid_size[0] * extractor.grid_size[1] * extractor.patch_dim * np.dtype(np.float16).itemsize
    return {"stage": f"extract {args.backbone} {args.size}px", "seconds": seconds, "cpu_seconds": cpu_seconds,
            "bound_seconds": bare_seconds, "bound_cpu_seconds": bare_cpu, "bound": "bare forward",
            "peak_rss": _peak_rss_bytes(),
            "largest_array": largest, "weights_bytes": weights_bytes, "bank_bytes": out.stat().st_size,
            "note": f"{len(samples)} images, grid {extractor.grid_size[0]}x{extractor.grid_size[1]}, "
                    f"dim {extractor.patch_dim}, {device.type}; imports + model peak {runtime_rss / GB:.2f} GB, "
                    f"weights {weights_bytes / GB:.2f} GB"}


def _timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of run(); CPU time is less sensitive to other processes
    competing for the cores, so ratios are given from both."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    run()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def _one_pass(array: np.ndarray) -> tuple[float, float]:
    """(wall, CPU) seconds of one pass over ``array`` (a chunked sum: every element read once)."""
    flat = array.reshape(-1, array.shape[-1])

    def read_all() -> None:
        for first in range(0, len(flat), 1 << 14):
            flat[first : first + (1 << 14)].sum(axis=0, dtype=np.float64)

    return _timed(read_all)


def _plain_search(n_queries: int, bank_size: int, dims: int, fraction: int = 4) -> tuple[float, float]:
    """(wall, CPU) seconds of a plain faiss exact search (k = 1) of random vectors of the given
    shape, timed on 1/``fraction`` of the queries (the search is linear in them) and scaled up."""
    import faiss

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((max(1, n_queries // fraction), dims), dtype=np.float32)
    bank = rng.standard_normal((bank_size, dims), dtype=np.float32)
    wall, cpu = _timed(lambda: faiss.knn(queries, bank, 1))
    return wall * n_queries / len(queries), cpu * n_queries / len(queries)


def stage_score(args) -> dict:
    from vitad.featurebank import read_bank
    from vitad.scoring import make_scorer
    from vitad.scoring.device import resolve_compute_device

    _, _, method, settings = CONFIGS[args.config]
    if method == "mahalanobis":
        import torch  # noqa: F401  the Gaussians' first use imports it: before the clocks start
    device = resolve_compute_device(args.device, "--device")
    loaded = {}
    read_seconds, read_cpu = _timed(lambda: loaded.setdefault("bank", read_bank(args.bank)))
    bank = loaded["bank"]
    scorer = make_scorer(method, settings).to(device)
    fit_seconds, fit_cpu = _timed(lambda: scorer.fit(bank.train_patches))
    score_seconds, score_cpu = _timed(lambda: scorer.image_scores(bank.test_patches))
    embedding_scorer = make_scorer(method, {k: v for k, v in settings.items()
                                            if k not in type(scorer).patch_only_params}).to(device)
    embedding_scorer.fit(bank.train_embeddings).score_samples(bank.test_embeddings)
    peak = _peak_rss_bytes()
    one_pass, one_pass_cpu = _one_pass(bank.train_patches)
    rows = [{"stage": f"read bank {args.config}", "seconds": read_seconds, "cpu_seconds": read_cpu,
             "bound_seconds": None, "bound": "", "note": "float16 -> float32 in chunks"}]
    n_train_vectors = int(np.prod(bank.train_patches.shape[:-1]))
    dims = bank.train_patches.shape[-1]
    if method == "knn":
        bank_size = len(scorer.memory_bank_)
        rows.append({"stage": f"fit {args.config}" + (" (coreset)" if settings["coreset_ratio"] < 1 else ""),
                     "seconds": fit_seconds, "cpu_seconds": fit_cpu, "bound_seconds": one_pass,
                     "bound_cpu_seconds": one_pass_cpu, "bound": "one pass over the bank",
                     "note": f"{n_train_vectors} x {dims} -> {bank_size}"})
        n_queries = int(np.prod(bank.test_patches.shape[:-1]))
        plain, plain_cpu = _plain_search(n_queries, bank_size, scorer.memory_bank_.shape[1])
        rows.append({"stage": f"score {args.config}", "seconds": score_seconds, "cpu_seconds": score_cpu,
                     "bound_seconds": plain, "bound_cpu_seconds": plain_cpu, "bound": "plain faiss search",
                     "note": f"{n_queries} queries x {bank_size}"})
    else:
        rows.append({"stage": f"fit {args.config}", "seconds": fit_seconds, "cpu_seconds": fit_cpu,
                     "bound_seconds": one_pass, "bound_cpu_seconds": one_pass_cpu, "bound": "one pass over the bank",
                     "note": f"{n_train_vectors} x {dims}" + (
                         f", {settings['feature_subset']} dims per position" if settings.get("per_position") else "")})
        rows.append({"stage": f"score {args.config}", "seconds": score_seconds, "cpu_seconds": score_cpu,
                     "bound_seconds": None, "bound": "", "note": ""})
    largest = bank.train_patches.nbytes  # float32, what the scorer is given
    return {"rows": rows, "peak_rss": peak, "largest_array": largest,
            "bank_bytes": Path(args.bank).stat().st_size, "config": args.config}


def stage_coreset(args) -> dict:
    """vitad's greedy selection against anomalib's KCenterGreedy on the same projected vectors."""
    from vitad.scoring.coreset import coreset_size, greedy_coreset, random_projection

    from vitad.featurebank import read_bank

    bank = read_bank(args.bank, mmap=True)
    vectors = bank.train_patches.reshape(-1, bank.train_patches.shape[-1])  # float16 memory map
    full_seconds, full_cpu_seconds = _timed(lambda: greedy_coreset(vectors, 0.1, seed=0, device=args.device))
    rows = [{"stage": "coreset full bank (vitad)", "seconds": full_seconds, "cpu_seconds": full_cpu_seconds,
             "bound_seconds": None, "bound": "", "note": f"{len(vectors)} x {vectors.shape[1]} -> "
             f"{coreset_size(len(vectors), 0.1)} (projection included)"}]
    sample = random_projection(vectors[:: max(1, len(vectors) // args.coreset_sample)][: args.coreset_sample], 128, 0)
    anomalib_python = REPO / ".venv-anomalib" / "bin" / "python"
    if not anomalib_python.exists():
        rows.append({"stage": "coreset vs anomalib", "seconds": None, "bound_seconds": None, "bound": "",
                     "note": f"{anomalib_python} missing (make parity creates it)"})
        return {"rows": rows, "peak_rss": _peak_rss_bytes()}
    with tempfile.TemporaryDirectory() as scratch:
        np.save(Path(scratch) / "points.npy", sample)
        reference = subprocess.run(
            [str(anomalib_python), str(Path(__file__).resolve().parent / "anomalib_kcenter.py"), str(Path(scratch) / "points.npy"), "0.1"],
            check=True, capture_output=True, text=True,
        )
    result = json.loads(reference.stdout.strip().splitlines()[-1])
    selected = {}
    ours_seconds, ours_cpu = _timed(lambda: selected.setdefault("ours", greedy_coreset(
        sample, 0.1, seed=0, projection_dim=sample.shape[1], start=result["start"])))
    ours = selected["ours"]
    agreement = len(set(ours.tolist()) & set(result["selected"])) / len(ours)
    rows.append({"stage": "coreset sample, anomalib KCenterGreedy", "seconds": result["seconds"],
                 "cpu_seconds": result["cpu_seconds"], "bound_seconds": None, "bound": "",
                 "note": f"{len(sample)} x 128 -> {len(ours)}"})
    rows.append({"stage": "coreset sample, vitad", "seconds": ours_seconds, "cpu_seconds": ours_cpu,
                 "bound_seconds": None, "bound": "",
                 "note": f"{result['seconds'] / ours_seconds:.1f}x faster (CPU time: "
                         f"{result['cpu_seconds'] / ours_cpu:.1f}x); same selection: {agreement:.1%}"})
    return {"rows": rows, "peak_rss": _peak_rss_bytes()}


# --- driver ---------------------------------------------------------------------------------------


def _run_stage(stage: str, **options) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(seconds, bound) -> str:
    return "" if seconds is None or not bound else f"{seconds / bound:.2f}"


def _seconds(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _gb(value) -> str:
    return "" if value is None else f"{value / GB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["wrn50-patchcore", "wrn50-padim"], choices=list(CONFIGS))
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--image-size", type=int, default=1024, help="generated image size, px")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--coreset-sample", type=int, default=40960, help="vectors timed against anomalib")
    parser.add_argument("--no-coreset-comparison", action="store_true")
    parser.add_argument("--reuse-banks", action="store_true", help="skip extraction where the bank exists")
    parser.add_argument("--work", type=Path, default=REPO / ".scale")
    # internal: one stage in this process
    parser.add_argument("--stage", choices=("extract", "score", "coreset"), help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bank", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps({"extract": stage_extract, "score": stage_score, "coreset": stage_coreset}[args.stage](args)))
        return

    root = dataset(args.work, args.train, args.test, args.image_size)
    results = []
    for backbone, size in sorted({CONFIGS[name][:2] for name in args.configs}):
        out = bank_path(args.work, root, backbone, size)
        if args.reuse_banks and out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        result = _run_stage("extract", backbone=backbone, size=size, root=root, out=out,
                            batch_size=args.batch_size, device=args.device)
        results.append(result)
        print(json.dumps(result), flush=True)
    for name in args.configs:
        backbone, size, _, _ = CONFIGS[name]
        result = _run_stage("score", config=name, bank=bank_path(args.work, root, backbone, size), device=args.device)
        results.append(result)
        print(json.dumps(result), flush=True)
    wrn50 = bank_path(args.work, root, "wide_resnet50_2", 224)
    if not args.no_coreset_comparison and wrn50.exists():
        result = _run_stage("coreset", bank=wrn50, device=args.device, coreset_sample=args.coreset_sample)
        results.append(result)
        print(json.dumps(result), flush=True)

    import platform

    import torch

    print(f"\n{CATEGORY}: {args.train} train + {args.test} test images of {args.image_size} px; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.get_num_threads()} threads, "
          f"device {args.device}")
    print("| stage | wall s | bound s | ratio | CPU s | CPU ratio | bound | peak RSS GB | memory bound GB | RSS / bound "
          "| bound + weights GB | RSS / that | bank on disk GB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        memory_bound = None if "largest_array" not in result else 2 * result["largest_array"] + GB
        with_weights = None if "weights_bytes" not in result else memory_bound + result["weights_bytes"]
        for index, row in enumerate(result.get("rows", [result])):
            whole = index == 0  # the process's own figures go on its first row
            cells = [
                row["stage"], _seconds(row["seconds"]), _seconds(row.get("bound_seconds")),
                _ratio(row["seconds"], row.get("bound_seconds")), _seconds(row.get("cpu_seconds")),
                _ratio(row.get("cpu_seconds"), row.get("bound_cpu_seconds")), row.get("bound", ""),
                _gb(result.get("peak_rss")) if whole else "", _gb(memory_bound) if whole else "",
                _ratio(result.get("peak_rss"), memory_bound) if whole else "",
                _gb(with_weights) if whole else "", _ratio(result.get("peak_rss"), with_weights) if whole else "",
                _gb(result.get("bank_bytes")) if whole else "", row.get("note", ""),
            ]
            print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
