"""Crash safety: a process editing a store is killed (SIGKILL) mid-loop; the reopened
store is sound and holds every operation the process reported committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_histo_ai.annotations.model import ImageRef
from napari_histo_ai.annotations.store import AnnotationStore

REF = ImageRef("/slides/a.svs", "sha256:aaaa", (10_000, 10_000), mpp=(0.25, 0.25))

# op 2k adds point k (measurement "k"), op 2k+1 moves it to (k, k + 1); after each
# commit the child prints the number of committed ops
CHILD = """
import sys
from napari_histo_ai.annotations.model import Annotation
from napari_histo_ai.annotations.store import AnnotationStore
store = AnnotationStore.open(sys.argv[1], annotator="child")
done = 0
k = 0
while True:
    (i,) = store.add([Annotation("point", [[1.0, 1.0]], "mitosis", measurements={"k": k})])
    done += 1
    print(done, flush=True)
    store.update(i, coords=[[float(k), float(k + 1)]], review="corrected")
    done += 1
    print(done, flush=True)
    k += 1
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_writer_loses_at_most_the_op_in_flight(tmp_path: Path):
    path = tmp_path / "crash.sqlite"
    AnnotationStore.create(path, REF, classes=["mitosis"]).close()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    reported = 0
    deadline = time.monotonic() + 8.0
    # kill at a pseudo-random point, while the child is busy writing
    target = int(np.random.default_rng().integers(15, 60))
    try:
        assert proc.stdout is not None
        while reported < target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # what the child printed before it died but we had not read yet
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout.read().split():
        reported = int(line)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert reported >= 2, "the child committed nothing before the kill"

    with AnnotationStore.open(path, image=REF) as store:
        assert store.integrity_check() == "ok"
        history = store.history()
        # everything reported is there; at most the op in flight after it
        assert reported <= len(history) <= reported + 1
        adds = (len(history) + 1) // 2
        objects = sorted(store.iter_all(), key=lambda a: a.measurements["k"])
        assert [int(a.measurements["k"]) for a in objects] == list(range(adds))
        for a in objects:
            k = int(a.measurements["k"])
            if 2 * k + 2 <= len(history):  # its move was committed
                np.testing.assert_array_equal(a.coords, [[k, k + 1]])
                assert a.review == "corrected" and a.annotator == "child"
            else:
                np.testing.assert_array_equal(a.coords, [[1.0, 1.0]])
        # the store is still usable: undo the last op, add more
        assert store.undo() in ("add", "edit")
        store.add([store.get(objects[0].id).copy(id=None)])
        assert store.integrity_check() == "ok"
