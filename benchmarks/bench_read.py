"""Read benchmark: open time, memory and region throughput vs OpenSlide and raw decoding.

The same as ``napari-histo-ai bench read`` (same arguments); prints JSON. Example::

    python benchmarks/bench_read.py ../shared/data/wsi/*.svs ../shared/data/wsi/*.ndpi \\
        --generate .bench/big.tif --reads 200 --region 512

See :mod:`napari_histo_ai.bench.read` for what each number means, and
``docs/benchmarks.md`` for measured figures.
"""

from __future__ import annotations

import sys

from napari_histo_ai.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "read", *sys.argv[1:]]))
