"""Report benchmark: a slide report from existing runs vs its bare limits.

The same as ``napari-histo-ai bench report`` (same arguments); prints JSON. Example::

    python benchmarks/bench_report.py --repeats 3 --json-out .bench/report.json

See :mod:`napari_histo_ai.bench.report` for what each number means (report seconds by
step, the raw read of the thumbnail level and the tissue mask, the model runs' own wall
time, and their ratios), and ``docs/benchmarks.md`` for measured figures.
"""

from __future__ import annotations

import sys

from napari_histo_ai.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "report", *sys.argv[1:]]))
