"""The embedded dataset is byte-identical on every machine.

Two guards: the generator's code uses no CPU-dispatched float math (numpy's and libm's
transcendental functions differ in the last bit between SSE, AVX2 and AVX-512 paths), and the
dataset this machine generates from params.yaml has exactly the hash that the committed dvc.lock
records, whatever CPU the lock was written on.
"""

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vitad import portable_math as pm

ROOT = Path(__file__).resolve().parents[1]
GENERATOR_MODULES = [ROOT / "vitad" / "synthetic.py", ROOT / "vitad" / "portable_math.py"]
# numpy functions whose results depend on the CPU's SIMD path (or call libm), and samplers that do
NOT_PORTABLE = {
    "sin", "cos", "tan", "arcsin", "arccos", "arctan", "arctan2", "sinh", "cosh", "tanh",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "power", "float_power", "hypot",
    "cbrt", "dot", "matmul", "einsum", "normal", "standard_normal", "lognormal", "exponential",
    "standard_exponential", "gamma", "standard_gamma", "beta", "vonmises", "rayleigh",
}


def _non_portable_calls(path: Path) -> list[str]:
    """``np.sin(...)``, ``rng.normal(...)``, ... in a module (calls of vitad.portable_math's
    ``pm.sin`` are fine), plus any use of the math module (libm)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [
        f"{ast.unparse(node.func)} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in NOT_PORTABLE and ast.unparse(node.func.value) != "pm"
    ]
    imports = [f"import math (line {node.lineno})" for node in ast.walk(tree) if isinstance(node, ast.Import) and any(a.name == "math" for a in node.names)]
    return calls + imports


@pytest.mark.parametrize("module", GENERATOR_MODULES, ids=lambda p: p.name)
def test_generator_uses_only_exactly_rounded_float_operations(module):
    assert _non_portable_calls(module) == []


def test_portable_functions_match_numpy_closely():
    x = np.linspace(-60.0, 60.0, 100_001)
    assert np.abs(pm.sin(x) - np.sin(x)).max() < 1e-12
    assert np.abs(pm.cos(x) - np.cos(x)).max() < 1e-12
    y = np.linspace(-700.0, 5.0, 100_001)
    assert np.abs(pm.exp(y) / np.exp(y) - 1).max() < 1e-12
    assert 0.0 <= pm.exp(-1e6) < 1e-300
    dx, dy = np.random.default_rng(0).uniform(-5, 5, (2, 1000))
    for order in (1, 2, 3, 5):
        expected = np.cos(order * np.arctan2(dy, dx) + 0.7)
        assert np.abs(pm.angular_harmonic(dx, dy, order, 0.7) - expected).max() < 1e-12
    assert pm.angular_harmonic(0.0, 0.0, 3, 0.7) == pytest.approx(np.cos(0.7))
    noise = pm.normal_noise(np.random.default_rng(0), 0.5, (200, 500))
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(0.5, rel=0.01)


def dvc_directory_md5(root: Path) -> str:
    """DVC's hash of a directory output: md5 of the sorted JSON list of (relpath, file md5)."""
    entries = [
        {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "relpath": path.relative_to(root).as_posix()}
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _locked_dataset_md5() -> str:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text(encoding="utf-8"))
    (out,) = [o for o in lock["stages"]["download"]["outs"] if o["path"] == "data/dataset"]
    return out["md5"].removesuffix(".dir")


def test_generated_dataset_has_the_hash_dvc_lock_records(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    if params["data"]["source"] != "synthetic":
        pytest.skip("params.yaml does not use the generated dataset")
    subprocess.run(
        [sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "dataset")],
        check=True, capture_output=True, cwd=ROOT,
    )
    assert dvc_directory_md5(tmp_path / "dataset") == _locked_dataset_md5(), (
        "the dataset generated here differs from the one dvc.lock records: either dvc.lock is stale "
        "(run `dvc repro` and commit it) or the generator is not portable across CPUs"
    )
