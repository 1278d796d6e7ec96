"""A tiny project that has run the real extract and score stages: random tiny DINOv2 (56 px),
runs tiny_dinov2-knn and tiny_dinov2-mahalanobis on the generated weave and mesh categories.
Shared by the demo, browser and predict tests (``tiny_project`` fixture in conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "tiny_dinov2"
CATEGORIES = ("weave", "mesh")  # an RGB and a single-channel category
METHODS = ("knn", "mahalanobis")
TINY_DINOV2 = {
    "family": "dinov2",
    "pretrained": "facebook/dinov2-base",
    "image_size": 56,
    "layer": -1,
    "image_embedding": "cls",
    "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}


def stage(name: str):
    """The stage script ``stages/<name>.py`` as a module (its ``main(argv)`` runs the stage)."""
    spec = importlib.util.spec_from_file_location(f"test_stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rescore(root: Path, method: str) -> None:
    """Run the score stage of run tiny_dinov2-<method> in the project ``root``."""
    run = f"{BACKBONE}-{method}"
    stage("score").main(["--run", run, "--featurebanks", str(root / "featurebanks" / BACKBONE),
                         "--out", str(root / "scores" / run), "--models", str(root / "models" / run),
                         "--params", str(root / "params.yaml")])


def build_project(root: Path, dataset: Path) -> Path:
    """A project under ``root`` that has run extract and score for tiny_dinov2 x knn, mahalanobis
    x weave, mesh (the stages' own code, params.yaml written there)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pipeline"] = {"backbones": [BACKBONE], "runs": {f"{BACKBONE}-{m}": {"backbone": BACKBONE, "recipe": m} for m in METHODS}}
    params["data"]["categories"] = list(CATEGORIES)
    params["extract"].update(device="cpu", batch_size=4)
    params["backbones"] = {BACKBONE: TINY_DINOV2}
    root.mkdir(parents=True, exist_ok=True)
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    extract = stage("extract")
    for category in CATEGORIES:
        bank = root / "featurebanks" / BACKBONE / f"{category}.safetensors"
        extract.main(["--backbone", BACKBONE, "--category", category, "--data", str(dataset), "--out", str(bank),
                      "--params", str(params_path)])
    for method in METHODS:
        rescore(root, method)
    return root
