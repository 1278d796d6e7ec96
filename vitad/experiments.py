"""A narrow view of ``dvc exp show``: one row per experiment and run, only what differs.

``dvc exp show`` gives every metric of every metrics file a column headed by the file's path
(``reports/metrics/efficientnet_lite0-knn.json:image_auroc``): 12 runs x 3 headline metrics do not
fit a terminal even with ``--only-changed``. This view reads the same data (``dvc exp show
--json``) and turns it on its side: the params that differ between the experiments shown, then
one line per run whose headline metrics differ (all runs with ``--all-runs``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Sequence

METRICS_DIR = "reports/metrics"
COLUMNS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AU-PRO"))


@dataclass(frozen=True)
class Experiment:
    name: str
    params: dict[str, Any]  # flattened: "score.knn.k" -> 5
    metrics: dict[str, dict[str, float | None]]  # run -> {metric: value}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree) if isinstance(tree, list) else tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _experiment(name: str, record: dict) -> Experiment | None:
    data = record.get("data") or {}
    if not data.get("metrics") and not data.get("params"):
        return None  # queued, running or failed: nothing to show yet
    params: dict[str, Any] = {}
    for params_file in (data.get("params") or {}).values():
        params.update(_flatten(params_file.get("data") or {}))
    metrics = {}
    for path, content in (data.get("metrics") or {}).items():
        path = PurePosixPath(path)
        if str(path.parent) == METRICS_DIR:
            metrics[path.stem] = content.get("data") or {}
    return Experiment(name, params, metrics)


def experiments_from_exp_show(records: Sequence[dict]) -> list[Experiment]:
    """The workspace, each baseline commit and its experiments, in ``dvc exp show``'s order."""
    experiments = []
    for record in records:
        name = record.get("name") or (record["rev"] if record["rev"] == "workspace" else record["rev"][:7])
        found = _experiment(name, record)
        if found is not None:
            experiments.append(found)
        for experiment in record.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                label = experiment.get("name") or revision.get("name") or revision["rev"][:7]
                found = _experiment(f"  {label}", revision)
                if found is not None:
                    experiments.append(found)
    return experiments


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def render(experiments: Sequence[Experiment], all_runs: bool = False) -> str:
    """Plain-text table: experiment | params that differ | run | headline metrics in %."""
    if not experiments:
        return "no experiments with results (dvc exp show lists none)\n"
    param_names = sorted({key for e in experiments for key in e.params})
    changed_params = [k for k in param_names if len({json.dumps(e.params.get(k)) for e in experiments}) > 1]
    runs = list(dict.fromkeys(run for e in experiments for run in e.metrics))
    if not all_runs and len(experiments) > 1:
        runs = [r for r in runs if len({json.dumps(e.metrics.get(r), sort_keys=True) for e in experiments}) > 1]
    header = ["experiment", *changed_params, "run", *(title for _, title in COLUMNS)]
    rows = []
    for experiment in experiments:
        params = [_cell(experiment.params.get(k)) for k in changed_params]
        shown = [r for r in runs if r in experiment.metrics] or ["(no run differs)"]
        for index, run in enumerate(shown):
            values = experiment.metrics.get(run, {})
            first = index == 0
            rows.append([
                experiment.name if first else "", *(params if first else [""] * len(params)), run,
                *(_cell(values.get(key)) if run in experiment.metrics else "" for key, _ in COLUMNS),
            ])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    numeric = set(range(len(header) - len(COLUMNS), len(header)))
    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vitad exps",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments go to `dvc exp show` (e.g. -A, -n 3, --rev main).",
    )
    parser.add_argument("--all-runs", action="store_true", help="show every run, not only those whose metrics differ")
    args, dvc_args = parser.parse_known_args(argv)
    result = subprocess.run(["dvc", "exp", "show", "--json", *dvc_args], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: dvc exp show failed: {result.stderr.strip() or result.stdout.strip()}", file=sys.stderr)
        sys.exit(1)
    print(render(experiments_from_exp_show(json.loads(result.stdout)), args.all_runs), end="")


if __name__ == "__main__":
    main()
