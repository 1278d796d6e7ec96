"""The narrow experiments view (vitad.experiments) over `dvc exp show --json` records."""

from vitad.experiments import experiments_from_exp_show, render


def _record(rev, name, k, knn_auroc, padim_auroc=0.7):
    return {
        "rev": rev, "name": name, "error": None,
        "data": {
            "rev": rev, "timestamp": None,
            "params": {"params.yaml": {"data": {"score": {"knn": {"k": k}}, "data": {"categories": ["weave", "mesh"]}}}},
            "metrics": {
                "reports/metrics/resnet50-knn.json": {"data": {"image_auroc": knn_auroc, "pixel_auroc": 0.9, "aupro": None}},
                "reports/metrics/resnet18_padim-padim.json": {"data": {"image_auroc": padim_auroc, "pixel_auroc": 0.8, "aupro": 0.5}},
            },
        },
    }


def exp_show():
    baseline = _record("0123456789abcdef", "main", 1, 0.61)
    baseline["experiments"] = [
        {"name": "k-three", "executor": None, "revs": [_record("aaaaaaa1", "k-three", 3, 0.655)]},
        {"name": "queued", "executor": "workspace", "revs": [{"rev": "bbbbbbb2", "name": None, "data": {}}]},
    ]
    return [_record("workspace", None, 3, 0.655), baseline]


def test_shows_changed_params_and_only_runs_whose_metrics_differ():
    experiments = experiments_from_exp_show(exp_show())
    assert [e.name for e in experiments] == ["workspace", "main", "  k-three"]  # the queued one has no results
    lines = render(experiments).splitlines()
    assert lines[0].split() == ["experiment", "score.knn.k", "run", "image", "AUROC", "pixel", "AUROC", "AU-PRO"]
    assert lines[2].split() == ["workspace", "3", "resnet50-knn", "65.5", "90.0", "n/a"]
    assert lines[3].split() == ["main", "1", "resnet50-knn", "61.0", "90.0", "n/a"]
    assert not any("padim" in line or "categories" in line for line in lines)  # equal everywhere


def test_all_runs_lists_every_run_on_its_own_line():
    lines = render(experiments_from_exp_show(exp_show()), all_runs=True).splitlines()
    assert [line.split()[-4] for line in lines[2:4]] == ["resnet50-knn", "resnet18_padim-padim"]
    assert lines[3].startswith(" ")  # the experiment's name and params only on its first line


def test_no_experiments():
    assert "no experiments" in render([])
