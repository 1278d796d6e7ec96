"""Fan the extract matrix out over workers; a coordinator finishes the pipeline.

The extract stages (backbone x category) take most of a run's time and do not depend on each
other. Each worker runs `dvc repro --single-item` on its share of them in its own checkout (a
clone on a cluster node, or a git worktree on a machine with several GPUs) and leaves what it
computed, DVC's run-cache entry plus the feature bank, where the coordinator finds it: in the DVC
remote it pushes to, or in a DVC cache the checkouts share. The coordinator's `dvc repro` then
restores every bank from the run-cache instead of computing it, and runs the rest.

There is no scheduler here: whatever starts processes starts the workers (`make -j`, a SLURM or
Kubernetes array job); this module says which cells are whose and calls DVC.

    python -m vitad.fanout worker --index I --count N [--no-push]
    python -m vitad.fanout finish [--no-pull]
    python -m vitad.fanout worktrees --count N     (one machine: N worktrees sharing this cache)
    python -m vitad.fanout cells [--count N]       (the extract stages, or each worker's share)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

EXTRACT_PREFIX = "extract@"
WORKTREES = Path(".dvc") / "tmp" / "fanout"  # ignored by git (.dvc/.gitignore) and by DVC's walk
# What the workers' stages are made of: it must be committed, as worktrees and clones check out
# HEAD, not the coordinator's edits.
PIPELINE_FILES = ["dvc.yaml", "params.yaml", "stages", "vitad"]


class FanoutError(RuntimeError):
    """A fan-out step cannot proceed; the message names the command or setting and what to do."""


def _run(command: list[str], project: Path, capture: bool = False) -> str:
    result = subprocess.run(command, cwd=project, text=True, capture_output=capture)
    if result.returncode != 0:
        detail = f":\n{result.stdout}{result.stderr}" if capture else " (its output is above)"
        raise FanoutError(f"`{' '.join(command)}` failed in {project} with exit code {result.returncode}{detail}")
    return result.stdout if capture else ""


def dvc(project: Path, *args: str, capture: bool = False) -> str:
    return _run(["dvc", *args], project, capture)


def extract_stages(project: Path) -> list[str]:
    """The extract matrix's stage names (extract@<backbone>-<category>), in dvc.yaml's order."""
    listed = dvc(project, "stage", "list", "--name-only", capture=True)
    return [name for name in listed.split() if name.startswith(EXTRACT_PREFIX)]


def share(stages: list[str], index: int, count: int) -> list[str]:
    """Worker `index` of `count` takes every count-th stage, starting at its index.

    The matrix lists a backbone's categories together, so round-robin spreads each backbone (the
    slow ViTs and the fast CNNs) over all workers instead of giving one worker all of a slow one.
    """
    if count < 1:
        raise FanoutError(f"the worker count must be at least 1, got {count}")
    if not 0 <= index < count:
        raise FanoutError(f"the worker index must be in 0..{count - 1} for {count} workers, got {index}")
    return stages[index::count]


def run_worker(project: Path, index: int, count: int, push: bool = True) -> list[str]:
    """Compute this worker's extract stages; push them (banks and run-cache) to the default remote.

    With `push`, cells some earlier worker already pushed are restored from the remote, not
    recomputed (`repro --pull`), so a re-submitted array job only does what is missing.
    Returns the stages this worker was given.
    """
    mine = share(extract_stages(project), index, count)
    if not mine:
        print(f"worker {index} of {count}: no extract stage left for this worker")
        return mine
    print(f"worker {index} of {count}: {' '.join(mine)}", flush=True)
    # Every cell hashes its category of the dataset, which is generated or linked here, never
    # taken from a cache (the download stage's output is not cached).
    dvc(project, "repro", "download")
    dvc(project, "repro", "--single-item", *(["--pull"] if push else []), *mine)
    if push:
        dvc(project, "push", "--run-cache", *mine)
    return mine


def finish(project: Path, pull: bool = True) -> None:
    """The coordinator: restore the workers' banks from the run-cache, run the rest, push it all.

    `download` runs first on its own: `repro --pull` counts an uncached output that is missing as
    pulled and would leave the dataset out.
    """
    dvc(project, "repro", "download")
    dvc(project, "repro", *(["--pull"] if pull else []))
    if pull:
        dvc(project, "push", "--run-cache")


def add_worktrees(project: Path, count: int) -> list[Path]:
    """`count` git worktrees of HEAD under .dvc/tmp/fanout, each using this checkout's DVC cache.

    A shared cache holds the run-cache too, so what a worker computes is restored by the
    coordinator's `dvc repro` with no remote in between. Existing worktrees are moved to HEAD.
    """
    project = project.resolve()
    changed = _run(["git", "status", "--porcelain", "--", *PIPELINE_FILES], project, capture=True)
    if changed.strip():
        raise FanoutError(
            "worktrees check out HEAD, but these pipeline files differ from it; commit them first:\n" + changed
        )
    head = _run(["git", "rev-parse", "HEAD"], project, capture=True).strip()
    cache = dvc(project, "cache", "dir", capture=True).strip()
    paths = []
    for index in range(count):
        path = project / WORKTREES / f"worker-{index}"
        if (path / ".git").exists():
            _run(["git", "checkout", "--quiet", "--force", "--detach", head], path)
        else:
            _run(["git", "worktree", "add", "--quiet", "--force", "--detach", str(path), head], project)
        dvc(path, "cache", "dir", "--local", cache)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vitad.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="the checkout to work in")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="compute this worker's share of the extract matrix")
    worker.add_argument("--index", type=int, required=True, help="this worker's index, 0-based")
    worker.add_argument("--count", type=int, required=True, help="the number of workers")
    worker.add_argument("--no-push", dest="push", action="store_false",
                        help="leave the results in the (shared) cache instead of pushing them")
    coordinator = commands.add_parser("finish", help="restore the workers' results, run the rest")
    coordinator.add_argument("--no-pull", dest="pull", action="store_false",
                             help="the workers shared this cache: nothing to pull or push")
    cells = commands.add_parser("cells", help="print the extract stages, or each worker's share")
    cells.add_argument("--count", type=int, help="the number of workers")
    worktrees = commands.add_parser("worktrees", help="create N worktrees of HEAD sharing this DVC cache")
    worktrees.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)

    try:
        if args.command == "worker":
            run_worker(args.project, args.index, args.count, args.push)
        elif args.command == "cells":
            stages = extract_stages(args.project)
            if args.count is None:
                print("\n".join(stages))
            for index in range(args.count or 0):
                print(f"worker {index}: {' '.join(share(stages, index, args.count))}")
        elif args.command == "finish":
            finish(args.project, args.pull)
        else:
            for path in add_worktrees(args.project, args.count):
                print(path)
    except FanoutError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
