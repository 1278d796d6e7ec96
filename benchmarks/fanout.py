"""Wall time of the extract matrix with 1 worker and with N workers on this machine (vitad.fanout).

For each worker count, a fresh clone of this repository's HEAD (its pipeline and params, or
--backbones / --categories narrowed and committed there) gets that many git worktrees sharing
one fresh DVC cache, as `make fanout` makes them; the dataset is made in each beforehand (the
`download` stage, not timed); then all workers start together, each with 1/N of the CPU cores
for its threads (as `make fanout` gives them), and the time runs until the last one ends.
Nothing is restored from a cache: every configuration computes every cell.

The figures are wall times of whatever else the machine runs too; the load averages printed
beside them say how busy it was.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitad.fanout import add_worktrees, dvc, extract_stages  # noqa: E402


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _clone(root: Path, backbones: list[str] | None, categories: list[str] | None) -> Path:
    project = root / "project"
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
    if backbones or categories:
        path = project / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params["pipeline"]["backbones"] = backbones or params["pipeline"]["backbones"]
        params["data"]["categories"] = categories or params["data"]["categories"]
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        subprocess.run(["git", "-c", "user.name=benchmark", "-c", "user.email=benchmark@vitad.invalid",
                        "commit", "-qam", "narrowed matrix"], cwd=project, check=True)
    return project


def time_matrix(workers: int, backbones: list[str] | None, categories: list[str] | None) -> tuple[float, int]:
    """Seconds from starting `workers` workers to the last one's end, and the number of cells."""
    threads = math.ceil(os.cpu_count() / workers)
    with tempfile.TemporaryDirectory(prefix=f"vitad-fanout-{workers}-") as root:
        project = _clone(Path(root), backbones, categories)
        cells = len(extract_stages(project))
        worktrees = add_worktrees(project, workers)
        for worktree in worktrees:
            dvc(worktree, "repro", "download", capture=True)
        start = time.perf_counter()
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "vitad.fanout", "worker", "--index", str(index), "--count", str(workers), "--no-push"],
                cwd=worktree, env={**_env(), "OMP_NUM_THREADS": str(threads)},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for index, worktree in enumerate(worktrees)
        ]
        outputs = [process.communicate()[0] for process in processes]
        elapsed = time.perf_counter() - start
        for process, output in zip(processes, outputs):
            if process.returncode != 0:
                raise SystemExit(f"a worker failed:\n{output}")
    return elapsed, cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="compared with 1 worker")
    parser.add_argument("--backbones", nargs="+", help="narrow pipeline.backbones (default: params.yaml's)")
    parser.add_argument("--categories", nargs="+", help="narrow data.categories (default: params.yaml's)")
    args = parser.parse_args()

    print(f"{os.cpu_count()} CPU cores; extract matrix of {REPO}'s HEAD"
          + (f", backbones {args.backbones}" if args.backbones else "")
          + (f", categories {args.categories}" if args.categories else ""))
    times = {}
    for workers in (1, args.workers):
        load = os.getloadavg()[0]
        times[workers], cells = time_matrix(workers, args.backbones, args.categories)
        print(f"{workers} worker(s), {math.ceil(os.cpu_count() / workers)} thread(s) each: {cells} cells in "
              f"{times[workers]:.1f} s (load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)", flush=True)
    print(f"{args.workers} workers vs 1: {times[1] / times[args.workers]:.2f}x the speed")


if __name__ == "__main__":
    main()
