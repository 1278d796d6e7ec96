"""Web demo: the logic in vitad.serving.demo and vitad.serving.detector (shared with `vitad predict`), the
threshold calibration, and the Streamlit page driven by streamlit.testing.

The served project is built by the real extract and score stages (tiny random DINOv2, tiny
generated dataset) in a temporary directory; the page finds it through $VITAD_PROJECT.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import ExifTags, Image
from streamlit.testing.v1 import AppTest

from tiny_project import BACKBONE, REPO, rescore
from vitad.serving import demo
from vitad.serving.calibration import holdout_image_scores
from vitad.core.data import index_category, split_samples
from vitad.serving.detector import Detector, ImageError, decode_image, results_csv
from vitad.featurebank import read_bank, write_bank
from vitad.figures import overlay_image
from vitad.core.io import load_arrays, save_arrays
from vitad.serving.model import ModelError, read_model
from vitad.core.params import ParamsError
from vitad.scorefile import read_category_scores
from vitad.scoring import ScoringError, aggregate_image_scores, few_shot_indices, make_scorer

APP = REPO / "app" / "demo.py"
APP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def project(tiny_project) -> Path:
    return tiny_project


@pytest.fixture(scope="module")
def knn_weave(project) -> Detector:
    return demo.load_detector(project, demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _test_image(dataset: Path, category: str, index: int = 0) -> tuple[str, bytes]:
    sample = split_samples(index_category(dataset, category), "test")[index]
    return Path(sample.image_path).name, (dataset / sample.image_path).read_bytes()


# --- what the pipeline produced ----------------------------------------------------------------


def _touch_model(root: Path, relative: str, backbone: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    save_arrays(path, {"scorer.train_shape": np.zeros(4, np.int64)}, {"backbone": backbone})


def test_list_runs_needs_a_fitted_model(tmp_path):
    assert demo.list_runs(tmp_path) == []
    for relative, backbone in [
        ("models/a-knn/weave.safetensors", "a"), ("scores/a-knn/mesh.safetensors", "a"),  # scores, no model
        ("models/x-y-padim/washer.safetensors", "x-y"),
    ]:
        _touch_model(tmp_path, relative, backbone)
    assert demo.list_runs(tmp_path) == [demo.Run("a-knn", "a", "weave"), demo.Run("x-y-padim", "x-y", "washer")]


def test_list_runs_serves_only_what_params_yaml_describes_in_its_order(tmp_path):
    # Outputs of a run and of a category since removed from params.yaml stay in the workspace.
    for relative in ["models/a-knn/weave.safetensors", "models/a-knn/mesh.safetensors", "models/a-kmeans/weave.safetensors"]:
        _touch_model(tmp_path, relative, "a")
    params = {"pipeline": {"backbones": ["a"], "runs": {"a-knn": {"backbone": "a", "recipe": "knn"}}},
              "data": {"categories": ["weave"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert demo.list_runs(tmp_path) == [demo.Run("a-knn", "a", "weave")]
    params["pipeline"]["runs"] = {"a-knn": {"backbone": "a", "recipe": "knn"}, "a-kmeans": {"backbone": "a", "recipe": "kmeans"}}
    params["data"]["categories"].append("mesh")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert demo.list_runs(tmp_path) == [demo.Run("a-knn", "a", "weave"), demo.Run("a-knn", "a", "mesh"),
                                        demo.Run("a-kmeans", "a", "weave")]
    params["pipeline"]["runs"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="pipeline.runs must name at least one run"):
        demo.list_runs(tmp_path)


def test_project_root_comes_from_the_environment(tmp_path):
    assert demo.project_root({demo.PROJECT_ENV: str(tmp_path)}) == tmp_path.resolve()
    assert demo.project_root({}) == Path.cwd().resolve()


def test_fingerprint_changes_when_an_input_file_changes(project, tmp_path):
    copy = shutil.copytree(project, tmp_path / "copy")
    run = demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave")
    before = demo.detector_fingerprint(copy, run)
    assert demo.detector_fingerprint(copy, run) == before
    (copy / "params.yaml").write_text((copy / "params.yaml").read_text() + "\n")
    assert demo.detector_fingerprint(copy, run) != before


# --- decoding uploaded and predicted files -------------------------------------------------------------------------------------


def test_rgb_upload_decodes_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    decoded = decode_image(_png(Image.fromarray(pixels)), "a.png")
    assert decoded.notes == () and decoded.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded.image), pixels)


@pytest.mark.parametrize(
    "mode, note",
    [("L", "grayscale image: converted to RGB"), ("RGBA", "alpha (transparency) channel dropped"),
     ("LA", "alpha (transparency) channel dropped"), ("P", "P image: converted to RGB"),
     ("CMYK", "CMYK image: converted to RGB")],
)
def test_other_colour_modes_become_rgb_like_the_pipeline_with_a_note(mode, note):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    source.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    decoded = decode_image(buffer.getvalue(), f"x.{mode}")
    assert decoded.image.mode == "RGB" and decoded.image.size == (16, 12)
    assert len(decoded.notes) == 1 and note in decoded.notes[0]
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(source.convert("RGB")))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), "photo.jpg")
    assert decoded.image.size == (20, 40) and "EXIF orientation" in decoded.notes[0]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty.bin: the file is empty"),
        (b"width,height\n1,2\n", "notes.csv: not an image"),
        (_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "cut.png: the image file is truncated or corrupt"),
        (_png_claiming(5000, 5000), "bomb.png: the image is larger than the limit of 16,777,216 pixels"),
        (_png_claiming(10000, 10000), "bomb.png: the image is larger than the limit"),  # PIL's bomb warning
        (_png_claiming(20000, 20000), "bomb.png: the image is larger than the limit"),  # PIL's bomb error
        (_png(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))), "16bit.png: I;16 images"),
    ],
    ids=["empty", "not-an-image", "truncated", "too-many-pixels", "bomb-warning", "bomb-error", "16-bit"],
)
def test_bad_uploads_raise_an_upload_error_naming_the_file(data, message):
    name = message.split(":")[0]
    with pytest.raises(ImageError, match=message.replace(".", r"\.")):
        decode_image(data, name)


# --- threshold on training images only -------------------------------------------------------------


def _nearest_cosine_distances(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    queries = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    bank = bank / np.linalg.norm(bank, axis=-1, keepdims=True)
    return 1.0 - (queries @ bank.T).max(axis=1)


def test_holdout_scores_score_each_training_image_without_it():
    train = np.random.default_rng(2).standard_normal((6, 2, 2, 4)).astype(np.float32)
    indices, scores = holdout_image_scores("knn", {"k": 1}, train, max_images=6, n_folds=6)
    np.testing.assert_array_equal(indices, np.arange(6))
    for index in range(6):
        others = np.delete(train, index, axis=0).reshape(-1, 4)
        expected = _nearest_cosine_distances(train[index].reshape(-1, 4), others).max()
        assert scores[index] == pytest.approx(expected, abs=1e-5)
    fewer_indices, fewer_scores = holdout_image_scores("knn", {"k": 1}, train, max_images=3, n_folds=2)
    assert len(fewer_indices) == 3 and fewer_indices[0] == 0 and fewer_indices[-1] == 5
    assert np.all(np.diff(fewer_indices) > 0) and np.isfinite(fewer_scores).all()


def test_few_shot_holdout_uses_the_images_the_scorer_never_sees():
    train = np.random.default_rng(3).standard_normal((6, 2, 2, 4)).astype(np.float32)
    indices, scores = holdout_image_scores("knn", {"k": 1, "few_shot": 4, "seed": 3}, train)
    seen = few_shot_indices(6, 4, seed=3)
    np.testing.assert_array_equal(indices, np.setdiff1d(np.arange(6), seen))
    fitted = make_scorer("knn", {"k": 1}).fit(train[seen])
    np.testing.assert_allclose(scores, aggregate_image_scores(fitted.score_samples(train[indices]), "max"), rtol=1e-6)


def test_one_training_image_cannot_calibrate():
    with pytest.raises(ScoringError, match="at least 2 are needed"):
        holdout_image_scores("knn", {}, np.ones((1, 2, 2, 4), dtype=np.float32))


def _bank_path(root: Path, category: str = "weave") -> Path:
    return root / "featurebanks" / BACKBONE / f"{category}.safetensors"


def test_score_stage_calibrates_the_threshold_on_training_features_only(project, knn_weave, tmp_path):
    copy = shutil.copytree(project, tmp_path / "copy")
    bank = read_bank(_bank_path(copy))
    rng = np.random.default_rng(4)
    write_bank(
        _bank_path(copy),
        train_embeddings=bank.train_embeddings, train_patches=bank.train_patches,
        test_embeddings=rng.standard_normal(bank.test_embeddings.shape).astype(np.float32),
        test_patches=rng.standard_normal(bank.test_patches.shape).astype(np.float32),
        train_samples=bank.train_samples, test_samples=bank.test_samples, info=bank.info,
    )
    rescore(copy, "knn")
    model = read_model(demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave").model_path(copy))
    assert model.threshold == knn_weave.model.threshold
    np.testing.assert_array_equal(model.holdout_scores, knn_weave.model.holdout_scores)
    _, expected = holdout_image_scores("knn", model.scorer.get_params(), bank.train_patches)
    np.testing.assert_array_equal(model.holdout_scores, expected)
    assert model.threshold == float(expected.max()) > 0
    assert model.holdout_files == tuple(sample.image_path for sample in bank.train_samples)


# --- the detector reproduces the pipeline --------------------------------------------------------


def _test_files(dataset: Path, samples) -> list:
    return [(sample.image_path, (dataset / sample.image_path).read_bytes) for sample in samples]


@pytest.mark.parametrize("method, category", [("knn", "weave"), ("mahalanobis", "mesh")])
def test_detector_scores_test_images_as_the_pipeline_did(project, tiny_dataset, method, category):
    run = demo.Run(f"{BACKBONE}-{method}", BACKBONE, category)
    detector = demo.load_detector(project, run)
    pipeline = read_category_scores(project / "scores" / run.name / f"{category}.safetensors")
    scored = list(detector.score_files(_test_files(tiny_dataset, pipeline.test_samples), batch_size=2))
    np.testing.assert_allclose([item.result.score for item in scored], pipeline.image_scores, rtol=1e-6)
    for index, (item, sample) in enumerate(zip(scored, pipeline.test_samples)):
        assert item.result.notes == () and item.decoded.image.size[::-1] == sample.original_size
        expected_map = pipeline.anomaly_map(index, sample.original_size)
        np.testing.assert_allclose(detector.anomaly_map(item.result.patch_scores, sample.original_size), expected_map,
                                   rtol=1e-6, atol=1e-6 * float(expected_map.max()))
    assert detector.model.random_weights and detector.model.colour_scale[1] == float(pipeline.patch_scores.max())


def test_a_size_unlike_the_training_images_gets_a_note(knn_weave, tiny_dataset):
    name, data = _test_image(tiny_dataset, "weave")
    resized = decode_image(data, name).image.resize((300, 200))
    decoded, result = demo.score_upload(knn_weave, _png(resized), name)
    assert decoded.image.size == (300, 200)
    assert len(result.notes) == 1 and "300x200 px, the weave training images are 256x256" in result.notes[0]


def test_an_image_that_cannot_be_scored_is_an_error_row_and_the_batch_goes_on(knn_weave, tiny_dataset):
    class FailsOnTheFirstImage:
        """Refuses every batch and then the first image alone, as features beyond the float16 range do."""

        def __init__(self):
            self.single_images = 0

        def image_scores(self, features, model_map=None):
            self.single_images += len(features) == 1
            if len(features) > 1 or self.single_images == 1:
                raise ScoringError("test features contain 3 NaN/inf values")
            return knn_weave.model.scorer.image_scores(features, model_map)

    def broken() -> Detector:
        return dataclasses.replace(knn_weave, model=dataclasses.replace(knn_weave.model, scorer=FailsOnTheFirstImage()))

    files = [_test_image(tiny_dataset, "weave", index) for index in (0, 1)]
    first, second = broken().score_files([(name, lambda data=data: data) for name, data in files])
    assert first.result is None and first.error.startswith(f"{files[0][0]}: cannot be scored (test features contain 3")
    _, expected = demo.score_upload(knn_weave, files[1][1], files[1][0])
    assert second.error is None and second.result.score == expected.score
    with pytest.raises(ImageError, match=f"{files[0][0]}: cannot be scored"):
        demo.score_upload(broken(), files[0][1], files[0][0])


def test_cnn_batches_run_in_cpu_streams_as_in_the_extract_stage_and_on_a_gpu_in_the_calling_thread(
    knn_weave, tiny_dataset, monkeypatch, forward_teams, two_torch_threads
):
    import torch

    files = [_test_image(tiny_dataset, "weave", index) for index in range(4)]
    files.insert(2, ("broken.png", b"not a png"))
    sources = [(name, lambda data=data: data) for name, data in files]
    assert knn_weave.extractor.cpu_streams == 1  # the tiny ViT: its batches run in the calling thread
    serial = list(knn_weave.score_files(sources, batch_size=2))
    teams = forward_teams(knn_weave.extractor)  # (thread, torch threads) of every batch's forward pass
    monkeypatch.setattr(knn_weave.extractor, "cpu_streams", 2)  # as a CNN's
    streamed = list(knn_weave.score_files(sources, batch_size=2))
    # three batches: two side by side on one thread each, the third after them on both threads
    assert len(teams) == 3 and {threads for _, threads in teams[:2]} == {1}
    assert threading.get_ident() not in {thread for thread, _ in teams[:2]} and teams[2] == (threading.get_ident(), 2)
    assert [item.name for item in streamed] == [name for name, _ in files]
    assert streamed[2].result is None and streamed[2].error.startswith("broken.png")
    for item, reference in zip(streamed[:2] + streamed[3:], serial[:2] + serial[3:]):
        assert item.error is None and item.decoded.image.size == reference.decoded.image.size
        np.testing.assert_allclose(item.result.score, reference.result.score, rtol=1e-5)
        np.testing.assert_allclose(item.result.patch_scores, reference.result.patch_scores, rtol=1e-5, atol=1e-6)
    assert two_torch_threads() == (2, 2)

    class OnAGpu:
        """The tiny ViT as the detector sees an extractor on a GPU (computing on the CPU here)."""

        device = torch.device("cuda")

        def __getattr__(self, name):
            return getattr(knn_weave.extractor, name)

    teams.clear()
    on_a_gpu = list(dataclasses.replace(knn_weave, extractor=OnAGpu()).score_files(sources, batch_size=2))
    assert {thread for thread, _ in teams} == {threading.get_ident()}  # the model in the calling thread
    assert [item.name for item in on_a_gpu] == [name for name, _ in files] and on_a_gpu[2].error == streamed[2].error
    for item, reference in zip(on_a_gpu[:2] + on_a_gpu[3:], serial[:2] + serial[3:]):
        np.testing.assert_allclose(item.result.score, reference.result.score, rtol=1e-5)


def _copy_with_other_model_weights(project: Path, destination: Path, run: demo.Run) -> Path:
    """A copy of the project whose model of ``run`` records another weights fingerprint."""
    copy = shutil.copytree(project, destination)
    arrays, metadata = load_arrays(run.model_path(copy))
    metadata["extractor"]["weights_info"]["fingerprint"] = "sha256:" + "0" * 64
    save_arrays(run.model_path(copy), arrays, metadata)
    return copy


def test_a_model_of_other_weights_is_refused(project, tmp_path):
    run = demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave")
    copy = _copy_with_other_model_weights(project, tmp_path / "copy", run)
    with pytest.raises(ModelError, match="fingerprint sha256:0{64}, but the weights loaded now .* have fingerprint sha256:"):
        demo.load_detector(copy, run)


# --- what the page shows ---------------------------------------------------------------------------


def test_overlay_uses_the_pipeline_colours_and_shrinks_for_display():
    image = Image.new("RGB", (3000, 1500), (255, 255, 255))
    heat = np.zeros((1500, 3000), dtype=np.float32)
    heat[:, 1500:] = 10.0
    overlay = overlay_image(image, heat, (0.0, 10.0), max_side=300)
    assert overlay.shape == (150, 300, 3) and overlay.dtype == np.uint8
    # White (255) half-covered by jet's ends as 8-bit colours: dark blue (0, 0, 127), dark red (127, 0, 0).
    np.testing.assert_array_equal(overlay[75, 10], [128, 128, 191])
    np.testing.assert_array_equal(overlay[75, 290], [191, 128, 128])
    assert overlay_image(image, heat, (0.0, 10.0)).shape == (1500, 3000, 3)
    with pytest.raises(ValueError, match="does not match the image"):
        overlay_image(image, heat[:10], (0.0, 1.0))


def test_results_csv_has_one_row_per_file_with_the_decision(knn_weave, tiny_dataset):
    files = [_test_image(tiny_dataset, "weave", index) for index in (0, 1)] + [("c.txt", b"not an image")]
    scored = list(knn_weave.score_files([(name, lambda data=data: data) for name, data in files]))
    threshold = (scored[0].result.score + scored[1].result.score) / 2
    records = list(csv.DictReader(io.StringIO(results_csv(scored, threshold, knn_weave.model))))
    assert [record["file"] for record in records] == [name for name, _ in files]
    low, high = sorted(range(2), key=lambda index: scored[index].result.score)
    assert records[high]["decision"] == "anomalous" and records[low]["decision"] == "normal"
    assert records[2]["decision"] == "error" and records[2]["anomaly_score"] == ""
    assert records[2]["message"] == "c.txt: not an image (no image format recognised; use a PNG, JPEG, BMP or TIFF)"
    assert float(records[0]["anomaly_score"]) == scored[0].result.score and records[0]["width"] == "256"
    assert records[1]["category"] == "weave" and records[1]["weights"] == "random"
    assert float(records[1]["threshold"]) == threshold


# --- the Streamlit page ---------------------------------------------------------------------------


@pytest.fixture
def app(project, monkeypatch) -> AppTest:
    monkeypatch.setenv(demo.PROJECT_ENV, str(project))
    page = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S)
    page.run()
    assert not page.exception, page.exception
    return page


def test_page_without_pipeline_outputs_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.PROJECT_ENV, str(tmp_path))
    page = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S).run()
    assert not page.exception and len(page.error) == 1
    assert "No pipeline outputs under" in page.error[0].value and "make run" in page.error[0].value


def test_page_with_invalid_params_names_the_parameter(project, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["data"]["categories"] = []
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv(demo.PROJECT_ENV, str(copy))
    page = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S).run()
    assert not page.exception and len(page.error) == 1
    assert page.error[0].value.startswith("Cannot list the pipeline's runs: params.yaml: data.categories must be")


def test_page_with_stale_outputs_says_so(project, tmp_path, monkeypatch):
    # The page opens on the first category and run of params.yaml: weave, knn.
    copy = _copy_with_other_model_weights(project, tmp_path / "copy", demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave"))
    monkeypatch.setenv(demo.PROJECT_ENV, str(copy))
    page = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S).run()
    assert not page.exception and len(page.error) == 1
    assert page.error[0].value.startswith(f"Cannot serve {BACKBONE}-knn · weave:")
    assert "fingerprint" in page.error[0].value and not page.file_uploader


def test_page_offers_what_the_pipeline_produced(app):
    options = {box.label: box.options for box in app.selectbox}
    assert options == {"Category": ["weave", "mesh"], "Run (backbone-recipe)": [f"{BACKBONE}-knn", f"{BACKBONE}-mahalanobis"]}
    assert "randomly initialised" in app.warning[0].value


def test_single_upload_shows_score_decision_and_follows_the_slider(app, project, tiny_dataset):
    app.selectbox[0].select("weave").run()
    detector = demo.load_detector(project, demo.Run(f"{BACKBONE}-knn", BACKBONE, "weave"))
    slider = app.slider[0]
    assert slider.value == pytest.approx(detector.model.threshold)
    name, data = _test_image(tiny_dataset, "weave", index=-1)
    app.file_uploader[0].upload(name, data, "image/png").run()
    assert not app.exception and not app.error
    expected = demo.score_upload(detector, data, name)[1].score
    assert app.metric[0].label == "Anomaly score" and app.metric[0].value == demo.format_score(expected)
    app.slider[0].set_value(0.0).run()
    assert any(":red[Anomalous]" in block.value for block in app.markdown)
    app.slider[0].set_value(app.slider[0].max).run()
    assert any(":green[Normal]" in block.value for block in app.markdown)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("notes.txt", b"not an image at all", "notes.txt: not an image"),
        ("cut.png", _png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "cut.png: the image file is truncated or corrupt"),
        ("bomb.png", _png_claiming(20000, 20000), "bomb.png: the image is larger than the limit"),
    ],
    ids=["not-an-image", "truncated", "bomb"],
)
def test_bad_single_upload_shows_an_error_and_the_page_keeps_working(app, tiny_dataset, name, data, message):
    app.file_uploader[0].upload(name, data).run()
    assert not app.exception and len(app.error) == 1 and message in app.error[0].value
    assert not app.metric
    good_name, good_data = _test_image(tiny_dataset, "mesh")
    app.file_uploader[0].set_value((good_name, good_data, "image/png")).run()
    assert not app.exception and not app.error and app.metric[0].label == "Anomaly score"


@pytest.mark.parametrize(
    "image, note",
    [(Image.new("LA", (256, 256), (90, 128)), "alpha (transparency) channel dropped"),
     (Image.new("RGB", (100, 50), (90, 90, 90)), "the image is 100x50 px, the weave training images are 256x256")],
    ids=["alpha", "other-size"],
)
def test_converted_or_resized_uploads_are_scored_with_a_warning(app, image, note):
    app.file_uploader[0].upload("odd.png", _png(image), "image/png").run()
    assert not app.exception and not app.error and app.metric[0].label == "Anomaly score"
    assert any(note in warning.value for warning in app.warning)


def test_batch_lists_every_file_and_offers_the_csv(app, tiny_dataset):
    uploads = [_test_image(tiny_dataset, "mesh", index) for index in (0, 1)] + [("broken.png", b"\x89PNG broken")]
    app.file_uploader[1].set_value([(name, data, "image/png") for name, data in uploads]).run()
    assert not app.exception
    assert len(app.error) == 1 and "1 of 3 files could not be scored" in app.error[0].value
    table = app.dataframe[0].value
    assert list(table["file"]) == [name for name, _ in uploads]
    assert list(table["decision"])[2] == "error" and set(list(table["decision"])[:2]) <= {"normal", "anomalous"}
    assert np.isfinite(table["score"][:2].astype(float)).all()
    downloads = app.get("download_button")
    assert len(downloads) == 1 and "Download CSV" in downloads[0].proto.label
    captions = [caption for image in app.image for caption in image.captions]
    assert [caption.split(":")[0] for caption in captions] == [name for name, _ in uploads[:2]]
