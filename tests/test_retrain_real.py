"""The retraining loop on real data (issue 6): baseline → simulated corrections → retrain →
the held-out metric improves.

mitosis-fcn places ~270 points on the mitosis-free CMU-1 sample. An annotator rejects 50
of them in the left half; the model is fine-tuned on those hard negatives (plus random
tissue negatives) and the AMi-Br crops (the positives it must keep), then re-run on a
2k × 2k region. Held out: the region's right half (never corrected) and the AMi-Br test
crops of the fixed validation split. Directions are asserted, never times.
"""

from __future__ import annotations

import pytest

from napari_histo_ai.bench.retrain import run_retrain_benchmark

from .conftest import real

pytestmark = pytest.mark.slow


def test_corrections_retrain_rerun_lowers_held_out_false_points(tmp_path):
    ami = real("ami_br_mitosis")
    out = run_retrain_benchmark(
        data=[ami], epochs=4, work_dir=tmp_path, threads=1, device="cpu", measure_bare=False
    )
    assert out["corrections"] == 50 and out["new_version"] == "mitosis-fcn-v2 2.0"
    # held-out part of the slide: far fewer false points than the parent's
    assert out["held_out_points_before"] > 50
    assert out["held_out_points_after"] < 0.5 * out["held_out_points_before"]
    # the fixed validation items (held-out AMi-Br crops, MICCAI negatives and corrections
    # never trained on); recall is not asserted: it falls (see docs/retraining.md)
    before, after = out["validation_before"], out["validation_after"]
    assert after["hard_negative_fp_rate"] < before["hard_negative_fp_rate"]
    assert after["precision"] >= before["precision"]
    assert after["loss"] < before["loss"]
    # the new version is registered with its card and its plots are in the run folder
    run = tmp_path / "run"
    assert (run / "training_curves.png").is_file() and (run / "comparison.png").is_file()
    assert (tmp_path / "models" / "mitosis-fcn-v2.yaml").is_file()
