"""How far results move between CPU kinds: the real stages run twice, natively and with every
CPU-dispatched library held to its baseline code path, and the outputs are compared.

A user's machine may have AVX-512 where ours has only AVX2 (or the reverse); torch, oneDNN,
OpenBLAS, numpy and faiss each pick kernels by the CPU at run time, so features, scores and
metrics differ in the last bits. This benchmark stands in for "another CPU" on one machine:

- native:   whatever each library picks here;
- baseline: ATEN_CPU_CAPABILITY=default (torch without AVX2/AVX-512 kernels),
            ONEDNN_MAX_CPU_ISA=SSE41, OPENBLAS_CORETYPE=Nehalem, NPY_DISABLE_CPU_FEATURES=X86_V3
            (numpy's AVX2/FMA loops off), FAISS_OPT_LEVEL=generic.

For each run (a backbone and recipe of params.yaml) and category it runs download (once per
variant), extract, score and evaluate as the pipeline does and prints: whether the dataset is
byte-identical, the largest feature difference relative to the features' largest magnitude, the
largest image-score difference relative to the score range, and the largest difference of the
headline metrics (in points of %).

    python benchmarks/cpu_kinds.py [--runs efficientnet_lite0-patchcore resnet50-knn] [--categories weave]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitad.core.io import load_arrays  # noqa: E402

VARIANTS = {
    "native": {},
    "baseline": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OPENBLAS_CORETYPE": "Nehalem",
        "NPY_DISABLE_CPU_FEATURES": "X86_V3",
        "FAISS_OPT_LEVEL": "generic",
    },
}


def _stage(script: str, env: dict, *args: str) -> None:
    command = [sys.executable, str(ROOT / "stages" / script), *args]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")


def _dataset_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _run_variant(work: Path, env: dict, params_path: Path, runs: dict, categories: list[str]) -> dict:
    data = work / "dataset"
    _stage("download.py", env, "--params", str(params_path), "--out", str(data))
    for backbone in sorted({spec["backbone"] for spec in runs.values()}):
        for category in categories:
            _stage("extract.py", env, "--params", str(params_path), "--backbone", backbone, "--category", category,
                   "--data", str(data), "--out", str(work / "featurebanks" / backbone / f"{category}.safetensors"))
    for run, spec in runs.items():
        _stage("score.py", env, "--params", str(params_path), "--run", run,
               "--featurebanks", str(work / "featurebanks" / spec["backbone"]), "--out", str(work / "scores" / run))
        _stage("evaluate.py", env, "--params", str(params_path), "--scores", str(work / "scores" / run), "--data", str(data),
               "--metrics", str(work / "metrics" / f"{run}.json"), "--plots", str(work / "plots" / run))
    return {"dataset": _dataset_digest(data)}


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    return float(np.abs(a - b).max() / scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--runs", nargs="+", default=["efficientnet_lite0-patchcore", "resnet50-knn", "dinov2_vitb14-knn"])
    parser.add_argument("--categories", nargs="+", default=None, help="default: data.categories")
    args = parser.parse_args(argv)

    params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    runs = {name: params["pipeline"]["runs"][name] for name in args.runs}
    categories = args.categories or params["data"]["categories"]
    params["data"]["categories"] = categories
    with tempfile.TemporaryDirectory(prefix="vitad-cpu-kinds-") as scratch:
        scratch = Path(scratch)
        params_path = scratch / "params.yaml"
        params_path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        facts = {}
        for variant, env in VARIANTS.items():
            start = time.perf_counter()
            facts[variant] = _run_variant(scratch / variant, env, params_path, runs, categories)
            print(f"{variant}: stages ran in {time.perf_counter() - start:.0f} s ({', '.join(f'{k}={v}' for k, v in env.items()) or 'no overrides'})")
        print(f"dataset byte-identical: {facts['native']['dataset'] == facts['baseline']['dataset']}")
        print(f"{'run':32} {'category':9} {'features':>9} {'img scores':>10} {'image AUROC':>11} {'pixel AUROC':>11} {'AU-PRO':>7}")
        for run, spec in runs.items():
            detail = {v: json.loads((scratch / v / "metrics" / f"{run}.detail.json").read_text()) for v in VARIANTS}
            for category in categories:
                bank = {v: load_arrays(scratch / v / "featurebanks" / spec["backbone"] / f"{category}.safetensors")[0] for v in VARIANTS}
                scores = {v: load_arrays(scratch / v / "scores" / run / f"{category}.safetensors")[0] for v in VARIANTS}
                features = max(_relative_difference(bank["native"][k], bank["baseline"][k]) for k in bank["native"])
                image = scores["native"]["image_scores"].astype(np.float64), scores["baseline"]["image_scores"].astype(np.float64)
                score_range = max(np.ptp(image[0]), 1e-30)
                metric_points = [
                    100 * abs((detail["native"][category][m] or 0) - (detail["baseline"][category][m] or 0))
                    for m in ("image_auroc", "pixel_auroc", "aupro")
                ]
                print(
                    f"{run:32} {category:9} {features:9.1e} {np.abs(image[0] - image[1]).max() / score_range:10.1e} "
                    + " ".join(f"{p:11.3f}" if i < 2 else f"{p:7.3f}" for i, p in enumerate(metric_points))
                )


if __name__ == "__main__":
    main()
