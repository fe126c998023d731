"""Cohort benchmark: ``batch`` on a local Dask cluster vs the same reports one by one.

The same as ``napari-histo-ai bench cohort`` (same arguments); prints JSON. Examples::

    python benchmarks/bench_cohort.py --copies 4 --json-out .bench/cohort.json
    python benchmarks/bench_cohort.py ../shared/data/wsi/*.svs --workers 2

See :mod:`napari_histo_ai.bench.cohort` for what each number means, and
``docs/benchmarks.md`` for measured figures.
"""

from __future__ import annotations

import sys

from napari_histo_ai.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "cohort", *sys.argv[1:]]))
