"""End to end: the DVC pipeline on a tiny configuration, and its re-run granularity.

Runs the real stages (tiny models, tiny images) in a temporary copy of the project, then edits
params.yaml there and asks DVC what it would re-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RUNS = [("resnet50", "knn"), ("resnet50", "patchcore"), ("resnet50", "kmeans"), ("dinov2_vitb14", "knn")]
PROJECT_FILES = ["vitad", "stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/.gitignore", ".dvc/config", ".dvc/plots"]

pytestmark = pytest.mark.slow


def _dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _edit_params(project: Path, edit) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@contextlib.contextmanager
def _params_edited(project: Path, edit):
    """params.yaml edited for the duration of the block, then restored byte for byte."""
    path = project / "params.yaml"
    original = path.read_text()
    _edit_params(project, edit)
    try:
        yield
    finally:
        path.write_text(original)


def _stages_that_would_run(project: Path) -> set[str]:
    output = _dvc(project, "repro", "--dry").stdout
    return set(re.findall(r"Running stage '([^']+)'", output))


def _tiny(params: dict) -> None:
    params["pipeline"] = {
        "backbones": ["resnet50", "dinov2_vitb14"],
        "runs": {f"{b}-{r}": {"backbone": b, "recipe": r} for b, r in RUNS},
    }
    params["data"]["categories"] = ["weave", "mesh"]
    params["data"]["synthetic"].update(train_images=3, test_good_images=2, test_images_per_defect=1)
    params["extract"]["batch_size"] = 4
    params["backbones"]["resnet50"]["image_size"] = 64
    params["backbones"]["dinov2_vitb14"].update(
        image_size=56,
        config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    )
    params["score"]["kmeans"]["n_clusters"] = 2
    params["heatmap"]["examples_per_defect"] = 1


def copy_project(root: Path) -> Path:
    """The project's pipeline (code, dvc.yaml, params, DVC and git settings) copied into `root`."""
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        elif source.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project that has run the tiny pipeline once."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _edit_params(root, _tiny)
    _dvc(root, "repro")
    return root


def test_pipeline_writes_metrics_plots_and_figures(project):
    for pair in [f"{b}-{m}" for b, m in RUNS]:
        headline = json.loads((project / "reports" / "metrics" / f"{pair}.json").read_text())
        assert set(headline) == {"image_auroc", "pixel_auroc", "aupro"}
        detail = json.loads((project / "reports" / "metrics" / f"{pair}.detail.json").read_text())
        assert set(detail) >= {"weave", "mesh", "mean"}
        for values in detail.values():
            assert 0.0 <= values["image_auroc"] <= 1.0 and 0.0 <= values["pixel_auroc"] <= 1.0
        assert headline["aupro"] == detail["mean"]["aupro"]
        assert any((project / "reports" / "plots" / pair).iterdir())
        assert any((project / "reports" / "figures" / pair).glob("*.png"))
    shown = _dvc(project, "metrics", "show").stdout
    assert "reports/metrics/resnet50-knn.json" in shown and "image_auroc" in shown


def test_second_repro_does_no_work(project):
    assert _stages_that_would_run(project) == set()
    assert "Data and pipelines are up to date" in _dvc(project, "status").stdout


def test_knn_k_change_reruns_only_knn_scoring_and_after(project):
    with _params_edited(project, lambda p: p["score"]["knn"].update(k=2)):
        stages = _stages_that_would_run(project)
    assert stages, "changing score.knn.k must re-run something"
    assert not any(s.startswith(("download", "extract@")) for s in stages), stages
    assert {"score@resnet50-knn", "score@dinov2_vitb14-knn"} <= stages
    assert not any("kmeans" in s or "patchcore" in s for s in stages), stages  # other recipes, also of method knn


def test_one_runs_override_reruns_only_that_run(project):
    with _params_edited(project, lambda p: p["pipeline"]["runs"]["resnet50-patchcore"].update(k=2, sigma=2)):
        stages = _stages_that_would_run(project)
    # `repro --dry` lists the stages whose own deps changed; heatmap and evaluate follow the scores.
    runs = {stage.split("@")[1] for stage in stages if "@" in stage}
    assert runs == {"resnet50-patchcore"}, stages
    assert "score@resnet50-patchcore" in stages


def test_new_run_adds_only_its_own_stages(project):
    def add_run(params):
        params["pipeline"]["runs"]["dinov2_vitb14-kmeans"] = {"backbone": "dinov2_vitb14", "recipe": "kmeans"}

    # `dvc repro --dry` cannot plan stages whose inputs do not exist yet; `dvc status` can.
    with _params_edited(project, add_run):
        changed = set(json.loads(_dvc(project, "status", "--json").stdout))
    assert changed == {
        "score@dinov2_vitb14-kmeans", "heatmap@dinov2_vitb14-kmeans", "evaluate@dinov2_vitb14-kmeans", "compare", "report"
    }, changed


def test_backbone_change_reruns_only_that_backbone(project):
    with _params_edited(project, lambda p: p["backbones"]["resnet50"].update(image_size=96)):
        stages = _stages_that_would_run(project)
    assert {"extract@resnet50-weave", "extract@resnet50-mesh"} <= stages
    assert not any("dinov2" in s for s in stages), stages
    assert "download" not in stages


# Injected into the stage process only (never into dvc itself): the second rename of a finished
# temporary file onto its output announces itself and hangs, so the test can SIGKILL the stage
# while one output file is in place and the next one is a half-written temporary.
_HANG_BEFORE_SECOND_RENAME = """
import os, sys, time
from pathlib import Path
if Path(sys.argv[0]).name == "score.py":
    _replace, _done = os.replace, []
    def _replace_or_hang(source, target, *args, **kwargs):
        if str(source).endswith(".tmp") and _done:
            Path(os.environ["VITAD_TEST_MARKER"]).write_text(f"{os.getpid()} {source}")
            time.sleep(600)
        _done.append(target)
        return _replace(source, target, *args, **kwargs)
    os.replace = _replace_or_hang
"""


def _locked_out_hash(project: Path, stage: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return lock["stages"][stage]["outs"][0]["md5"]


def test_stage_killed_mid_write_leaves_nothing_dvc_hashes_and_repro_recovers(project, tmp_path):
    run, stage = "resnet50-knn", "score@resnet50-knn"
    locked = _locked_out_hash(project, stage)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_HANG_BEFORE_SECOND_RENAME)
    marker = tmp_path / "marker"
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(tmp_path / "hook"), "VITAD_TEST_MARKER": str(marker),
    }
    repro = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            if marker.exists() and marker.read_text() or repro.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), f"the stage never reached its second write:\n{repro.communicate()[0] if repro.poll() is not None else ''}"
        pid, temporary = marker.read_text().split(" ", 1)
        os.kill(int(pid), signal.SIGKILL)
        output = repro.communicate(timeout=120)[0]
    finally:
        if repro.poll() is None:
            repro.kill()
    assert repro.returncode != 0, output
    temporary = Path(temporary)
    assert temporary.exists() and temporary.parent in {project / "scores" / run, project / "models" / run}  # killed mid-write

    assert _dvc(project, "check-ignore", str(temporary.relative_to(project))).returncode == 0
    status = json.loads(_dvc(project, "status", "--json").stdout)
    # the killed stage, and only what reads its output directory
    assert stage in status and set(status) <= {stage, f"heatmap@{run}", f"evaluate@{run}", "compare"}, status
    assert temporary.name not in json.dumps(status)

    _dvc(project, "repro")
    assert "Data and pipelines are up to date" in _dvc(project, "status").stdout
    assert not temporary.exists()
    assert _locked_out_hash(project, stage) == locked  # recomputed, identical


def test_new_category_runs_only_new_extraction(project):
    _edit_params(project, lambda p: p["data"].update(categories=["weave", "mesh", "washer"]))
    output = _dvc(project, "repro").stdout
    ran = set(re.findall(r"Running stage '([^']+)'", output))
    assert {"extract@resnet50-washer", "extract@dinov2_vitb14-washer"} <= ran
    assert not any(s.startswith("extract@") and not s.endswith("-washer") for s in ran), ran
    detail = json.loads((project / "reports" / "metrics" / "resnet50-knn.detail.json").read_text())
    assert "washer" in detail


def test_bad_category_fails_with_its_name_and_keeps_data(project):
    before = sorted(p.name for p in (project / "data" / "dataset").iterdir())
    with _params_edited(project, lambda p: p["data"].update(categories=["weave", "wool"])):
        result = _dvc(project, "repro", check=False)
    assert result.returncode != 0
    assert "wool" in result.stdout + result.stderr
    assert sorted(p.name for p in (project / "data" / "dataset").iterdir()) == before


def test_experiment_sweeps_read_as_one_narrow_table(project):
    git = ["git", "-c", "user.name=vitad-test", "-c", "user.email=test@vitad.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True)
    for k in (2, 3):
        _dvc(project, "exp", "run", "-S", f"++pipeline.runs.resnet50-knn.k={k}")  # ++: add or override
    shown = subprocess.run([sys.executable, "-m", "vitad", "exps"], cwd=project, capture_output=True, text=True, check=True).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120, shown
    assert lines[0].split()[:2] == ["experiment", "pipeline.runs.resnet50-knn.k"], shown
    experiment_rows = [line.split() for line in lines[2:] if not line.startswith(" " * 4)]
    assert sorted(row[1] for row in experiment_rows if row[0] != "workspace") == ["2", "3", "n/a"], shown  # baseline + 2 sweeps
    assert {line.split()[-4] for line in lines[2:]} <= {"resnet50-knn", "differs)"}, shown  # no other run changed
