"""pipeline.runs: a backbone, a recipe (a section of score) and the run's overrides, resolved once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from vitad.core.params import ParamsError, run_names
from vitad.runs import run_spec, run_specs

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "patchcore": {"method": "knn", "metric": "euclidean", "coreset_ratio": 0.1, "reweight_neighbors": 9, "sigma": 4},
    "mahalanobis": {"method": "mahalanobis", "pca_dims": 100, "shrinkage": "ledoit_wolf"},
    "kmeans": {"method": "kmeans", "n_clusters": 4},
}


def _params(runs: dict, recipes: dict = RECIPES) -> dict:
    return {
        "pipeline": {"backbones": ["resnet50", "dinov2_vitb14"], "runs": runs},
        "score": copy.deepcopy(recipes),
        "heatmap": {"sigma": 2},
    }


def test_runs_in_params_order_with_recipe_settings_and_overrides():
    runs = {
        "dinov2_vitb14-patchcore": {"backbone": "dinov2_vitb14", "recipe": "patchcore", "k": 3, "sigma": 0},
        "resnet50-kmeans": {"backbone": "resnet50", "recipe": "kmeans"},
    }
    patchcore, kmeans = run_specs(_params(runs))
    assert run_names(_params(runs)) == ["dinov2_vitb14-patchcore", "resnet50-kmeans"]
    assert (patchcore.name, patchcore.backbone, patchcore.recipe, patchcore.method) == (
        "dinov2_vitb14-patchcore", "dinov2_vitb14", "patchcore", "knn",
    )
    assert patchcore.patch_params == {"metric": "euclidean", "coreset_ratio": 0.1, "reweight_neighbors": 9, "k": 3}
    assert patchcore.sigma == 0.0  # the run's override beats the recipe's 4
    assert kmeans.sigma == 2.0  # no sigma in the recipe: heatmap.sigma


def test_patch_only_settings_never_reach_the_image_embedding_route():
    """pca_dims 100 on 40 image embeddings used to stop the run: it belongs to the patch route."""
    spec = run_spec(_params({"r": {"backbone": "resnet50", "recipe": "mahalanobis"}}), "r")
    assert spec.patch_params["pca_dims"] == 100
    assert "pca_dims" not in spec.embedding_params
    knn = run_spec(_params({"r": {"backbone": "resnet50", "recipe": "patchcore", "embedding": {"k": 2}}}), "r")
    assert knn.embedding_params == {"metric": "euclidean", "k": 2}


def test_the_default_params_resolve_and_name_the_published_recipes():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    specs = {spec.recipe: spec for spec in run_specs(params)}
    assert {"patchcore", "padim", "anomalydino", "knn", "mahalanobis", "kmeans"} <= set(specs)
    assert specs["patchcore"].patch_params["metric"] == "euclidean"
    assert specs["patchcore"].patch_params["reweight_neighbors"] == 9
    assert specs["anomalydino"].patch_params["aggregate"] == "top1pct_mean"
    assert specs["padim"].patch_params["per_position"] is True
    assert {spec.sigma for spec in specs.values()} == {4.0}
    assert specs["padim"].patch_params["aggregate"] == "map_max" and specs["padim"].patch_params["ddof"] == 1
    assert {spec.map_upsample for spec in specs.values()} == {"bilinear"}


@pytest.mark.parametrize(
    "runs, message",
    [
        ({"r": {"backbone": "mae_vitb16", "recipe": "kmeans"}}, "pipeline.runs.r.backbone 'mae_vitb16' is not in pipeline.backbones"),
        ({"r": {"backbone": "resnet50"}}, "missing key 'pipeline.runs.r.recipe'"),
        ({"r": {"backbone": "resnet50", "recipe": "padim"}}, "pipeline.runs.r.recipe 'padim' is not a section of score"),
        ({"r": ["resnet50", "knn"]}, "pipeline.runs.r must be dict"),
        ({"r.x": {"backbone": "resnet50", "recipe": "kmeans"}}, "pipeline.runs.r.x: a run name"),
        ({"r": {"backbone": "resnet50", "recipe": "kmeans", "k": 3}}, "score.kmeans with the overrides of pipeline.runs.r: params.yaml: unknown key score.kmeans.k"),
        ({"r": {"backbone": "resnet50", "recipe": "patchcore", "sigma": -1}}, "pipeline.runs.r sigma must be a number >= 0"),
        ({"r": {"backbone": "resnet50", "recipe": "patchcore", "map_upsample": "cubic"}}, "pipeline.runs.r map_upsample must be one of bilinear, nearest"),
        ({"r": {"backbone": "resnet50", "recipe": "patchcore", "embedding": {"k": 0}}}, "(image-embedding route): params.yaml: score.knn.k must be an integer >= 1"),
        ({}, "pipeline.runs must name at least one"),
    ],
)
def test_bad_runs_name_the_entry(runs, message):
    with pytest.raises(ParamsError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        run_specs(_params(runs))


def test_a_recipe_needs_a_known_method():
    recipes = {"odd": {"method": "svm"}}
    with pytest.raises(ParamsError, match=r"score\.odd\.method must be one of knn, mahalanobis, kmeans"):
        run_specs(_params({"r": {"backbone": "resnet50", "recipe": "odd"}}, recipes))
