"""params.yaml readers: pipeline.runs."""

from __future__ import annotations

import pytest

from vitad.params import ParamsError, pipeline_runs


def _params(runs: dict) -> dict:
    return {"pipeline": {"backbones": ["resnet50", "dinov2_vitb14"], "runs": runs}}


def test_pipeline_runs_in_params_order():
    runs = {
        "dinov2_vitb14-knn": {"backbone": "dinov2_vitb14", "method": "knn"},
        "resnet50-kmeans": {"backbone": "resnet50", "method": "kmeans"},
    }
    assert pipeline_runs(_params(runs)) == [("dinov2_vitb14", "knn"), ("resnet50", "kmeans")]


@pytest.mark.parametrize(
    "runs, message",
    [
        ({"resnet50-knn": {"backbone": "resnet50", "method": "kmeans"}}, "pipeline.runs.resnet50-knn must be keyed resnet50-kmeans"),
        ({"mae_vitb16-knn": {"backbone": "mae_vitb16", "method": "knn"}}, "pipeline.runs.mae_vitb16-knn.backbone 'mae_vitb16' is not in pipeline.backbones"),
        ({"resnet50-knn": {"backbone": "resnet50"}}, "missing key 'pipeline.runs.resnet50-knn.method'"),
        ({"resnet50-knn": ["resnet50", "knn"]}, "missing key 'pipeline.runs.resnet50-knn.backbone'"),
        ({}, "pipeline.runs must name at least one"),
    ],
)
def test_bad_pipeline_runs_name_the_entry(runs, message):
    with pytest.raises(ParamsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        pipeline_runs(_params(runs))


def test_pipeline_runs_must_be_a_mapping():
    with pytest.raises(ParamsError, match="pipeline.runs must be dict"):
        pipeline_runs({"pipeline": {"backbones": ["resnet50"], "runs": ["resnet50-knn"]}})
