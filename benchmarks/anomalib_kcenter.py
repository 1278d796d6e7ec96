"""anomalib's KCenterGreedy on given vectors, for benchmarks/scale.py (run with .venv-anomalib's
python, never imported by vitad).

    python anomalib_kcenter.py points.npy ratio

points.npy holds [N, p] float32 vectors already projected; they are passed as [N, p, 1], which
KCenterGreedy takes as they are (no projection of its own). Prints one JSON line: the random
start it drew (seeded), the selected indices in order and the selection's wall and CPU seconds.
"""

import json
import sys
import time

import numpy as np
import torch
from anomalib.models.components.sampling import KCenterGreedy


def main() -> None:
    points = torch.from_numpy(np.load(sys.argv[1]))
    ratio = float(sys.argv[2])
    torch.manual_seed(0)
    start = int(torch.randint(high=len(points), size=(1,)).squeeze())
    sampler = KCenterGreedy(embedding=points[:, :, None], sampling_ratio=ratio)
    torch.manual_seed(0)  # the same draw inside select_coreset_idxs
    began, began_cpu = time.perf_counter(), time.process_time()
    selected = sampler.select_coreset_idxs()
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
    print(json.dumps({"start": start, "selected": [int(index) for index in selected], "seconds": seconds,
                      "cpu_seconds": cpu_seconds}))


if __name__ == "__main__":
    main()
