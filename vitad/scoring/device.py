"""Where scorers compute: the CPU, or the CUDA device the features were extracted on.

The score stage follows ``extract.device``: a machine that extracts on a GPU fits and scores
there too (coreset selection and Gaussian fits in torch, kNN search in faiss's GPU index when
faiss was built with GPUs, else in torch).
"""

from __future__ import annotations

import glob

from vitad.core.params import ParamsError

DEVICES = ("auto", "cpu", "cuda")
KNN_BACKENDS = ("faiss-cpu", "faiss-gpu", "torch")


def resolve_compute_device(device: str, key: str = "extract.device") -> str:
    """``cpu`` or ``cuda`` from a device setting (``auto``: cuda when torch sees a GPU).

    ``auto`` on a machine without NVIDIA device nodes is ``cpu`` at once: importing torch only to
    learn that costs a second per stage on the CPU machines the default pipeline runs on.
    """
    if device not in DEVICES:
        raise ParamsError(f"params.yaml: {key} must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu" or (device == "auto" and not glob.glob("/dev/nvidia[0-9]*")):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ParamsError(f"params.yaml: {key} is cuda but no CUDA device is available; use auto or cpu")
    return "cpu"


def knn_backend(device: str, faiss_gpus: int) -> str:
    """The exact kNN search to use: faiss's GPU index on cuda when faiss has GPUs, torch on cuda
    otherwise (a faiss-cpu build on a GPU machine), faiss's CPU search on the CPU."""
    if device == "cuda":
        return "faiss-gpu" if faiss_gpus > 0 else "torch"
    return "faiss-cpu"
