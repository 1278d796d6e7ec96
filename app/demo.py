"""vitad web demo: score uploaded images with what the pipeline produced.

Run from the project root after the pipeline (``make run``):

    streamlit run app/demo.py --server.address 127.0.0.1      (``make demo``)

Serves the project in ``$VITAD_PROJECT`` (default: the working directory). All logic is in
:mod:`vitad.serving.demo`; this script only lays out the page.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from vitad.serving import demo  # noqa: E402
from vitad.serving.detector import Detector, ImageError, result_record, results_csv  # noqa: E402
from vitad.core.params import ParamsError  # noqa: E402

GALLERY_COLUMNS = 4


@st.cache_resource(max_entries=4, show_spinner="Loading the fitted model…")
def cached_detector(root: str, name: str, backbone: str, category: str, fingerprint: str) -> Detector:
    """One loaded detector per run, shared by all sessions; ``fingerprint`` (see
    :func:`vitad.serving.demo.detector_fingerprint`) only keys the cache, so new pipeline outputs reload."""
    return demo.load_detector(Path(root), demo.Run(name, backbone, category))


def choose_run(runs: list[demo.Run]) -> demo.Run:
    """Category, then run; both in params.yaml's order, so the page opens on the first run."""
    category = st.sidebar.selectbox("Category", list(dict.fromkeys(run.category for run in runs)))
    choices = [run for run in runs if run.category == category]
    return st.sidebar.selectbox("Run (backbone-recipe)", choices, format_func=lambda run: run.name)


def choose_threshold(detector: Detector, run: demo.Run) -> float:
    low, high = detector.threshold_range
    calibrated = detector.model.threshold
    threshold = st.sidebar.slider(
        "Threshold",
        min_value=low,
        max_value=high,
        value=(low + high) / 2 if calibrated is None else calibrated,
        step=(high - low) / 1000,
        format="%.5g",
        key=f"threshold {run.label} {calibrated!r}",  # a re-calibration resets it
        help="An image is anomalous when its score is above the threshold.",
    )
    if calibrated is None:
        st.sidebar.warning("No calibrated threshold: the run has fewer than 2 training images to hold out.")
    else:
        st.sidebar.caption(
            f"Calibrated: {demo.format_score(calibrated)}, the highest score of {len(detector.model.holdout_scores)} "
            "held-out training images (each scored by a model fitted without it); no test image or label is used."
        )
    return threshold


def single_image(detector: Detector, threshold: float) -> None:
    upload = st.file_uploader("Upload one image", key="single")
    if upload is None:
        return
    try:
        decoded, result = demo.score_upload(detector, upload.getvalue(), upload.name)
    except ImageError as error:
        st.error(str(error))
        return
    for note in decoded.notes + result.notes:
        st.warning(f"{upload.name}: {note}")
    score_column, decision_column = st.columns(2)
    score_column.metric(
        "Anomaly score",
        demo.format_score(result.score),
        delta=f"{result.score - threshold:+.4g} vs threshold {demo.format_score(threshold)}",
        delta_color="inverse",
    )
    if result.is_anomalous(threshold):
        decision_column.markdown("### :red[Anomalous]")
    else:
        decision_column.markdown("### :green[Normal]")
    image_column, overlay_column = st.columns(2)
    image = decoded.image
    image_column.image(demo.display_copy(image), caption=f"{upload.name} ({image.width}x{image.height})")
    vmin, vmax = detector.model.colour_scale
    overlay_column.image(
        demo.display_overlay(detector, decoded, result),
        caption=f"anomaly map (blue {demo.format_score(vmin)} … red {demo.format_score(vmax)})",
    )


def batch(detector: Detector, threshold: float) -> None:
    uploads = st.file_uploader("Upload several images", accept_multiple_files=True, key="batch")
    if not uploads:
        return
    progress = st.progress(0.0, text="Scoring…")
    scored_files = []
    # The code path of `vitad predict`: decoded by a thread pool, scored in batches.
    for scored in detector.score_files((upload.name, upload.getvalue) for upload in uploads):
        scored_files.append(scored)
        progress.progress(len(scored_files) / len(uploads), text=f"Scored {len(scored_files)} of {len(uploads)}")
    progress.empty()
    failed = [scored for scored in scored_files if scored.error is not None]
    if failed:
        messages = " | ".join(scored.error for scored in failed)
        st.error(f"{len(failed)} of {len(scored_files)} files could not be scored: {messages}")
    records = [result_record(scored, threshold, detector.model) for scored in scored_files]
    st.dataframe(
        [
            {
                "file": record["file"],
                "score": record["anomaly_score"],
                "decision": record["decision"],
                "size": "" if record["width"] is None else f"{record['width']}x{record['height']}",
                "message": record["message"],
            }
            for record in records
        ],
        hide_index=True,
    )
    st.download_button(
        "Download CSV",
        results_csv(scored_files, threshold, detector.model),
        file_name=f"vitad-{detector.model.run}-{detector.model.category}.csv",
        mime="text/csv",
    )
    columns = st.columns(GALLERY_COLUMNS)
    scored_images = [(scored, record) for scored, record in zip(scored_files, records) if scored.error is None]
    for index, (scored, record) in enumerate(scored_images):
        caption = f"{scored.name}: {demo.format_score(scored.result.score)} ({record['decision']})"
        columns[index % GALLERY_COLUMNS].image(demo.display_overlay(detector, scored.decoded, scored.result), caption=caption)


def main() -> None:
    st.set_page_config(page_title="vitad: anomaly detection demo", layout="wide")
    st.title("vitad: industrial anomaly detection")
    root = demo.project_root()
    try:
        runs = demo.list_runs(root)
    except ParamsError as error:
        st.error(f"Cannot list the pipeline's runs: {error}")
        return
    if not runs:
        st.error(
            f"No pipeline outputs under {root} (fitted models models/<run>/<category>.safetensors): run the "
            f"pipeline first (`make run`), or set {demo.PROJECT_ENV} to a project that has run it."
        )
        return
    run = choose_run(runs)
    try:
        fingerprint = demo.detector_fingerprint(root, run)
        detector = cached_detector(str(root), run.name, run.backbone, run.category, fingerprint)
    except demo.LOAD_ERRORS as error:
        st.error(f"Cannot serve {run.label}: {error}")
        return
    threshold = choose_threshold(detector, run)
    if detector.model.random_weights:
        st.warning(
            f"{run.backbone} is randomly initialised (params.yaml weights: random): the scores show how the pipeline "
            "works, not how well pretrained features detect defects."
        )
    else:
        st.success(f"{run.backbone} uses pretrained weights ({detector.model.weights_info.get('source', '')}).")
    st.caption(
        f"{run.label} · recipe {detector.model.recipe} · scores are distances of patch features to the defect-free "
        "training images"
    )
    single_tab, batch_tab = st.tabs(["Single image", "Batch"])
    with single_tab:
        single_image(detector, threshold)
    with batch_tab:
        batch(detector, threshold)


main()
