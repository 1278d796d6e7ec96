"""`vitad predict`: the pipeline's scores for its test images, outputs, error rows, exit status."""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_project import BACKBONE, REPO
from vitad.serving import predict
from vitad.__main__ import main as vitad_main
from vitad.core.data import index_category, split_samples
from vitad.serving.detector import CSV_COLUMNS
from vitad.serving.model import model_path
from vitad.scorefile import read_category_scores

RUN = f"{BACKBONE}-knn"


def _pipeline_scores(project: Path, category: str, run: str = RUN):
    return read_category_scores(project / "scores" / run / f"{category}.safetensors")


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_inputs_are_files_folders_and_globs_with_error_entries_for_what_names_nothing(tmp_path):
    for relative in ["a/x.png", "a/sub/y.PNG", "a/notes.txt", "b/x.png", "empty/readme.md"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    inputs = predict.collect_inputs([
        str(tmp_path / "a"), str(tmp_path / "b" / "*.png"), str(tmp_path / "a" / "notes.txt"), str(tmp_path / "nope.png"),
        str(tmp_path / "*.jpg"), str(tmp_path / "empty"),
    ])
    assert [(item.name, item.output_name, item.error) for item in inputs] == [
        (str(tmp_path / "a" / "sub" / "y.PNG"), "sub/y", None),
        (str(tmp_path / "a" / "x.png"), "x", None),
        (str(tmp_path / "b" / "x.png"), "x-2", None),
        (str(tmp_path / "a" / "notes.txt"), "notes", None),
        (str(tmp_path / "nope.png"), "nope", "no such file or folder"),
        (str(tmp_path / "*.jpg"), "*", "no file matches this pattern"),
        (str(tmp_path / "empty"), "empty", "a folder without image files (.png, .jpg, .jpeg, .bmp, .tif, .tiff)"),
    ]


@pytest.mark.parametrize("run, category", [(RUN, "weave"), (f"{BACKBONE}-mahalanobis", "mesh")])
def test_predict_gives_the_pipeline_scores_of_its_test_images(tiny_project, tiny_dataset, tmp_path, capsys, run, category):
    pipeline = _pipeline_scores(tiny_project, category, run)
    test_folder = tiny_dataset / category / "test"
    status = predict.main([str(test_folder), "--model", str(model_path(tiny_project, run, category)),
                           "-o", str(tmp_path / "results.csv"), "--maps", str(tmp_path / "maps"),
                           "--overlays", str(tmp_path / "overlays"), "--batch-size", "3", "--no-progress"])
    assert status == 0
    rows = _rows((tmp_path / "results.csv").read_text())
    # Folder files in sorted order: the dataset index's order of test images.
    assert [row["file"] for row in rows] == [str(tiny_dataset / sample.image_path) for sample in pipeline.test_samples]
    np.testing.assert_allclose([float(row["anomaly_score"]) for row in rows], pipeline.image_scores, rtol=1e-6)
    for index, sample in enumerate(pipeline.test_samples):
        relative = Path(sample.image_path).relative_to(f"{category}/test").with_suffix("")
        anomaly_map = np.load(tmp_path / "maps" / f"{relative}.npy")
        expected = pipeline.anomaly_map(index, sample.original_size)
        np.testing.assert_allclose(anomaly_map, expected, rtol=1e-6, atol=1e-6 * float(expected.max()))
        with Image.open(tmp_path / "overlays" / f"{relative}.png") as overlay:
            assert overlay.size == sample.original_size[::-1] and overlay.mode == "RGB"
    assert f"{len(rows)} files with {run}/{category}" in capsys.readouterr().err


def test_unreadable_files_get_an_error_row_and_the_batch_goes_on(tiny_project, tiny_dataset, tmp_path, capsys):
    good = [tiny_dataset / sample.image_path for sample in split_samples(index_category(tiny_dataset, "weave"), "test")[:2]]
    (tmp_path / "broken.png").write_bytes(good[0].read_bytes()[:100])
    (tmp_path / "notes.txt").write_text("not an image")
    arguments = [str(good[0]), str(tmp_path / "broken.png"), str(tmp_path / "notes.txt"), str(tmp_path / "gone.png"),
                 str(good[1])]
    status = predict.main([*arguments, "--run", RUN, "--category", "weave", "--project", str(tiny_project),
                           "--no-progress"])
    assert status == predict.EXIT_UNSCORED
    rows = _rows(capsys.readouterr().out)
    assert [row["file"] for row in rows] == arguments
    assert [row["decision"] for row in rows][1:4] == ["error"] * 3
    assert rows[1]["message"].startswith(f"{tmp_path / 'broken.png'}: the image file is truncated or corrupt")
    assert rows[2]["message"].startswith(f"{tmp_path / 'notes.txt'}: not an image")
    assert rows[3]["message"] == f"{tmp_path / 'gone.png'}: cannot be read (no such file or folder)"
    scores = _pipeline_scores(tiny_project, "weave")
    expected = {str(tiny_dataset / sample.image_path): score for sample, score in zip(scores.test_samples, scores.image_scores)}
    for row in (rows[0], rows[4]):
        assert float(row["anomaly_score"]) == pytest.approx(float(expected[row["file"]]), rel=1e-6)
        assert row["decision"] in ("normal", "anomalous") and row["run"] == RUN and row["weights"] == "random"


def test_json_lines_and_the_anomaly_gate(tiny_project, tiny_dataset, capsys):
    folder = str(tiny_dataset / "weave" / "test" / "good")
    model = str(model_path(tiny_project, RUN, "weave"))
    assert predict.main([folder, "--model", model, "--jsonl", "--threshold", "0", "--fail-on-anomaly", "--no-progress"]) == 4
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records and all(record["decision"] == "anomalous" and record["threshold"] == 0.0 for record in records)
    assert set(records[0]) == set(CSV_COLUMNS)
    assert predict.main([folder, "--model", model, "--jsonl", "--threshold", "1e9", "--fail-on-anomaly", "--no-progress"]) == 0
    assert all(json.loads(line)["decision"] == "normal" for line in capsys.readouterr().out.splitlines())


def test_what_cannot_run_exits_1_with_a_message(tiny_project, tmp_path, capsys):
    assert vitad_main(["predict", "x.png", "--run", RUN, "--category", "nope", "--project", str(tiny_project)]) == 1
    assert "error: " in capsys.readouterr().err
    assert vitad_main(["predict", "x.png"]) == 1
    assert "name the model: --model" in capsys.readouterr().err
    assert vitad_main(["unknown"]) == 2


def test_the_vitad_command_is_installed_and_runs_as_python_m_vitad():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["vitad"].split(":")
    assert getattr(importlib.import_module(module), function) is vitad_main
    # Without a command it prints its usage before importing torch (no model is loaded here).
    result = subprocess.run([sys.executable, "-m", "vitad"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "usage: vitad {predict,exps}" in result.stderr
