"""Fuzz the readers with mutated copies of real slides.

Each case is a damaged copy of a real file: truncated, bit-flipped, a TIFF tag's value
or an image data offset corrupted. A worker subprocess opens each case with
``open_image`` and reads its smallest level and a few level-0 regions. Every outcome
must be either a valid image or one of our clean errors (``HistoAIError``). The parent
watches the worker: a crash (signal), a hang (per-case timeout) or memory over the
limit (RLIMIT_AS in the worker) is a failure, recorded with the case and the worker
restarted.

Usage::

    python scripts/fuzz_readers.py [FILES...] --cases 200 --seed 0 [--json]

Exit status 0 when every case was clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_FILES = [
    "wsi/CMU-1-Small-Region.svs",
    "wsi/TCGA-CR-7395-01A-01-TS1.svs",
    "wsi/test3-TRITC-2-560.ndpi",
]
CASE_TIMEOUT_S = 30.0
MEMORY_LIMIT_BYTES = 6 * 2**30
MAX_READ_PIXELS = 2048 * 2048


# ------------------------------------------------------------------ mutations (parent)
def _tag_positions(path: Path) -> list[tuple[str, int, int]]:
    """(tag name, file offset of its value, value byte count) for every tag of every page."""
    import tifffile

    out = []
    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                for tag in page.tags.values():
                    size = max(1, min(int(tag.count) * 8, 64))
                    out.append((tag.name, int(tag.valueoffset), size))
    except Exception:
        pass
    return out


def mutate(data: bytes, rng: random.Random, tags: list[tuple[str, int, int]]) -> tuple[bytes, str]:
    """Return a damaged copy of ``data`` and a description of the damage."""
    kind = rng.choice(["truncate", "bitflip", "bitflip_header", "tag", "offsets", "zero_run"])
    buf = bytearray(data)
    n = len(buf)
    if kind == "truncate":
        cut = rng.randrange(0, n)
        return bytes(buf[:cut]), f"truncate at {cut}/{n}"
    if kind == "bitflip":
        flips = rng.randint(1, 64)
        for _ in range(flips):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{flips} bit flips anywhere"
    if kind == "bitflip_header":
        flips = rng.randint(1, 8)
        for _ in range(flips):
            i = rng.randrange(min(n, 4096))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{flips} bit flips in the first 4 KiB"
    if kind == "zero_run":
        start = rng.randrange(n)
        length = rng.randint(1, 65536)
        buf[start : start + length] = b"\x00" * len(buf[start : start + length])
        return bytes(buf), f"zeroed {length} bytes at {start}"
    if not tags:
        return bytes(buf[: n // 2]), "truncate at half (no tags found)"
    if kind == "tag":
        name, off, size = rng.choice(tags)
        value = rng.choice([b"\x00", b"\xff", bytes([rng.randrange(256)])]) * size
        buf[off : off + size] = value[: max(0, min(size, n - off))]
        return bytes(buf), f"tag {name} value at {off} set to {value[:4].hex()}…"
    offset_tags = [
        t
        for t in tags
        if t[0] in ("TileOffsets", "StripOffsets", "TileByteCounts", "StripByteCounts")
    ]
    name, off, size = rng.choice(offset_tags or tags)
    for _ in range(rng.randint(1, 8)):
        i = off + rng.randrange(size)
        if i < n:
            buf[i] = rng.randrange(256)
    return bytes(buf), f"{name} entries near {off} randomised"


# ------------------------------------------------------------------------ worker side
def _worker(case_dir: Path) -> None:
    """Read each case named on stdin; print one JSON line per case."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    import numpy as np

    from napari_histo_ai.errors import HistoAIError
    from napari_histo_ai.io import open_image

    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        path = case_dir / name
        t0 = time.perf_counter()
        outcome, detail = "valid", ""
        try:
            pyr = open_image(path)
            try:
                small = pyr.levels[-1]
                if small.size <= MAX_READ_PIXELS * 4:
                    np.asarray(small)
                lv = pyr.levels[0]
                rng = np.random.default_rng(0)
                for _ in range(3):
                    sl = []
                    for s in lv.shape:
                        start = int(rng.integers(0, max(1, s - 256)))
                        sl.append(slice(start, start + 256))
                    np.asarray(lv[tuple(sl)])
                pyr.info()
            finally:
                pyr.close()
        except HistoAIError as exc:
            outcome, detail = "clean_error", str(exc)[:300]
        except MemoryError as exc:
            outcome, detail = "memory", repr(exc)[:300]
        except Exception as exc:
            outcome, detail = "unclean_error", f"{type(exc).__name__}: {exc}"[:500]
        print(
            json.dumps(
                {
                    "case": name,
                    "outcome": outcome,
                    "detail": detail,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            ),
            flush=True,
        )


# ------------------------------------------------------------------------ parent side
class _Worker:
    def __init__(self, case_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(case_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def run(self, name: str, timeout: float) -> dict:
        import selectors

        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.kill()
            return {"case": name, "outcome": "hang", "detail": f"no answer in {timeout} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"case": name, "outcome": "crash", "detail": f"worker exit status {code}"}
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def fuzz(files: list[Path], *, cases: int, seed: int, timeout: float = CASE_TIMEOUT_S) -> dict:
    """Run ``cases`` mutated cases spread over ``files``; return the summary dict."""
    rng = random.Random(seed)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="histo-fuzz-") as tmp:
        case_dir = Path(tmp)
        sources = [(f, f.read_bytes(), _tag_positions(f)) for f in files]
        plan = []
        for i in range(cases):
            src, data, tags = sources[i % len(sources)]
            damaged, what = mutate(data, rng, tags)
            name = f"case{i:04d}{''.join(src.suffixes)}"
            (case_dir / name).write_bytes(damaged)
            plan.append((name, src.name, what))
        worker = _Worker(case_dir)
        t0 = time.perf_counter()
        for name, source, what in plan:
            res = worker.run(name, timeout)
            res.update(source=source, mutation=what)
            results.append(res)
            if res["outcome"] in ("hang", "crash"):
                worker = _Worker(case_dir)
            (case_dir / name).unlink()
        worker.kill()
        elapsed = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    bad = [r for r in results if r["outcome"] not in ("valid", "clean_error")]
    return {
        "cases": cases,
        "seed": seed,
        "seconds": round(elapsed, 1),
        "counts": counts,
        "failures": bad,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    files = args.files
    if not files:
        data = Path(
            os.environ.get("HISTO_AI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
        )
        files = [data / f for f in DEFAULT_FILES]
    summary = fuzz(files, cases=args.cases, seed=args.seed, timeout=args.timeout)
    print(json.dumps(summary, indent=2))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
