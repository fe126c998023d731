"""Inference benchmark: engine vs bare model throughput, peak memory, GUI stalls.

The same as ``napari-histo-ai bench infer`` (same arguments); prints JSON. Example::

    python benchmarks/bench_infer.py ../shared/data/wsi/CMU-1.svs --generate \\
        --tiles 256 --json-out .bench/infer.json

``--generate`` writes the 10k x 10k and 100k x 100k memory slides into ``.bench/`` (once;
later runs reuse them). See :mod:`napari_histo_ai.bench.infer` for what each number
means, and ``docs/benchmarks.md`` for measured figures.
"""

from __future__ import annotations

import sys

from napari_histo_ai.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "infer", *sys.argv[1:]]))
