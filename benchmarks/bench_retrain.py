"""Human-in-the-loop benchmark: 50 corrections -> retrain -> re-run on a 2k x 2k region.

The same as ``napari-histo-ai bench retrain`` (same arguments); prints JSON. Example::

    python benchmarks/bench_retrain.py --data ../shared/data/ami_br_mitosis \\
        --json-out .bench/retrain.json

See :mod:`napari_histo_ai.bench.retrain` for what each number means (loop seconds,
held-out false points before / after, validation metrics, ratios against bare
forward/backward steps), and ``docs/benchmarks.md`` for measured figures.
"""

from __future__ import annotations

import sys

from napari_histo_ai.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "retrain", *sys.argv[1:]]))
