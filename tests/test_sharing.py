"""Sharing work: a DVC remote with the run-cache, the extract matrix fanned out, queued experiments.

One tiny project (one backbone, two categories, one run) is fanned out over two workers: worker 0
in a git worktree that shares the coordinator's DVC cache, worker 1 in a clone that pushes to a
local remote. The coordinator must restore both feature banks instead of computing them. Clones
of its committed result then pull, through the local remote and through an S3 API (moto's
server, when installed), and recompute nothing but the generated dataset; and queued experiments
run two at a time on its banks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import REPO, _dvc, _edit_params, _tiny, copy_project

RUN = "resnet50-knn"
EXTRACT = ["extract@resnet50-weave", "extract@resnet50-mesh"]

pytestmark = pytest.mark.slow


def _smallest(params: dict) -> None:
    _tiny(params)
    params["pipeline"] = {"backbones": ["resnet50"], "runs": {RUN: {"backbone": "resnet50", "recipe": "knn"}}}


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, text=True).stdout


def _commit(project: Path, message: str) -> None:
    _git(project, "add", "-A")
    _git(project, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", message)


def _fanout(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vitad.fanout", *args], cwd=project, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finished_ok(process: subprocess.Popen) -> str:
    output, _ = process.communicate()
    assert process.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def fanned_out(tmp_path_factory, remote):
    """The coordinator's checkout after a fan-out over two workers, committed and pushed."""
    coordinator = copy_project(tmp_path_factory.mktemp("coordinator"))
    _edit_params(coordinator, _smallest)
    _git(coordinator, "init", "-q")
    # `make remote` as users call it; `-o setup` keeps make from building a venv in the copy.
    subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), "-o", "setup", "remote", f"REMOTE={remote}"],
        cwd=coordinator, env=_env(), check=True, capture_output=True,
    )
    _commit(coordinator, "tiny pipeline with a remote")

    [worktree] = _finished_ok(_fanout(coordinator, "worktrees", "--count", "1")).split()
    clone = tmp_path_factory.mktemp("worker") / "clone"
    _git(coordinator, "clone", "-q", str(coordinator), str(clone))
    workers = [_fanout(Path(worktree), "worker", "--index", "0", "--count", "2", "--no-push"),
               _fanout(clone, "worker", "--index", "1", "--count", "2")]
    worker_outputs = [_finished_ok(worker) for worker in workers]

    finish_output = _finished_ok(_fanout(coordinator, "finish"))
    _commit(coordinator, "results")
    return coordinator, worker_outputs, finish_output


def test_workers_compute_their_share_and_the_coordinator_no_bank(fanned_out, remote):
    coordinator, (worker_0, worker_1), finish_output = fanned_out
    assert _ran(worker_0) == {"download", EXTRACT[0]}, worker_0
    assert _ran(worker_1) == {"download", EXTRACT[1]}, worker_1
    ran = _ran(finish_output)
    assert not any(stage.startswith("extract@") for stage in ran), finish_output
    assert {f"score@{RUN}", f"evaluate@{RUN}", "report"} <= ran
    for stage in EXTRACT:  # worker 0's bank came from the shared cache, worker 1's from the remote
        assert f"Stage '{stage}' is cached - skipping run" in finish_output
    assert any((remote / "runs").iterdir()), "finish pushes the run-cache"
    assert "Data and pipelines are up to date" in _dvc(coordinator, "status").stdout


def test_a_clone_pulls_and_recomputes_nothing(fanned_out, tmp_path):
    coordinator, _, _ = fanned_out
    clone = tmp_path / "clone"
    _git(coordinator, "clone", "-q", str(coordinator), str(clone))
    _dvc(clone, "pull", "--run-cache")
    # Only the dataset is made again: `download`'s output is generated (or linked), never cached.
    assert _ran(_dvc(clone, "repro").stdout) == {"download"}
    assert _git(clone, "status", "--porcelain") == ""
    for bank in (coordinator / "featurebanks" / "resnet50").glob("*.safetensors"):
        assert (clone / "featurebanks" / "resnet50" / bank.name).read_bytes() == bank.read_bytes()


def test_make_pull_restores_from_the_run_cache_what_no_dvc_lock_records(fanned_out, tmp_path):
    """Params someone else ran (here: the commit before the coordinator's dvc.lock) are restored."""
    coordinator, _, _ = fanned_out
    clone = tmp_path / "clone"
    _git(coordinator, "clone", "-q", str(coordinator), str(clone))
    _git(clone, "checkout", "-q", "HEAD~1")
    assert not (clone / "dvc.lock").exists()
    make = subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", "setup", "pull"],
                          cwd=clone, env=_env(), capture_output=True, text=True)
    assert make.returncode == 0, make.stdout + make.stderr
    for stage in [*EXTRACT, f"score@{RUN}", f"heatmap@{RUN}", "compare"]:
        assert f"Stage '{stage}' is cached - skipping run" in make.stdout, make.stdout
    # Outputs kept in git rather than the cache (metrics, the summary) are recomputed, in seconds.
    assert _ran(make.stdout) <= {"download", f"evaluate@{RUN}", "report"}, make.stdout


def test_round_trip_through_an_s3_api(fanned_out, tmp_path):
    pytest.importorskip("dvc_s3", reason="S3 remotes need the dvc-s3 plugin (pip install -e '.[test]')")
    server_module = pytest.importorskip("moto.server", reason="the S3 server is moto's (pip install 'moto[server]')")
    boto3 = pytest.importorskip("boto3")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(Bucket="vitad")
        coordinator, _, _ = fanned_out
        clone = tmp_path / "clone"
        _git(coordinator, "clone", "-q", str(coordinator), str(clone))
        for project in (coordinator, clone):  # endpoint and keys in config.local, as for a real bucket
            (project / ".dvc" / "config.local").write_text(
                '[\'remote "s3"\']\n    url = s3://vitad/cache\n'
                f"    endpointurl = {endpoint}\n    access_key_id = testing\n    secret_access_key = testing\n"
            )
        _dvc(coordinator, "push", "--run-cache", "-r", "s3")
        _dvc(clone, "pull", "--run-cache", "-r", "s3")
        assert _ran(_dvc(clone, "repro").stdout) == {"download"}
        assert _git(clone, "status", "--porcelain") == ""
    finally:
        server.stop()


def _experiments(project: Path) -> dict[str, dict]:
    """name -> {'params': params.yaml's values, 'metrics': the run's headline metrics} of each experiment."""
    shown = json.loads(_dvc(project, "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev.get("data") or {}
                found[rev["name"]] = {
                    "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                    "metrics": data.get("metrics", {}).get(f"reports/metrics/{RUN}.json", {}).get("data", {}),
                }
    return found


def test_queued_experiments_run_two_at_a_time(fanned_out):
    coordinator, _, _ = fanned_out
    # A sweep of the AU-PRO limit re-runs only evaluate and report: two cheap experiments.
    limits = {"pro-20": 0.2, "pro-25": 0.25}
    for name, limit in limits.items():
        _dvc(coordinator, "exp", "run", "--queue", "-n", name, "-S", f"evaluate.fpr_limit={limit}")
    try:
        assert "Started '2' new experiments task queue workers" in _dvc(coordinator, "queue", "start", "-j", "2").stdout
        deadline = time.monotonic() + 600
        while re.search(r"\b(Queued|Running)\b", status := _dvc(coordinator, "queue", "status").stdout):
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        _dvc(coordinator, "queue", "stop", check=False)
    assert len(re.findall(r"pro-2\d .*Success", status)) == 2 and "Failed" not in status, status

    experiments = _experiments(coordinator)
    assert set(experiments) >= set(limits), experiments
    for name, limit in limits.items():
        assert experiments[name]["params"]["evaluate"]["fpr_limit"] == limit
        assert 0.0 <= experiments[name]["metrics"]["aupro"] <= 1.0  # the run's headline metrics
        log = _dvc(coordinator, "queue", "logs", name).stdout
        assert f"Running stage 'evaluate@{RUN}'" in log, log
        assert not _ran(log) & {*EXTRACT, f"score@{RUN}"}, "the banks and scores come from the cache"
