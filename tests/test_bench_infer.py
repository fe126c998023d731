"""The inference benchmark runs end to end on tiny slides with a tiny model (no timing
thresholds: the machine is shared; only that every figure is there and sane)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from napari_histo_ai.bench import infer as bench
from napari_histo_ai.cli import main
from napari_histo_ai.errors import ModelNotFoundError
from napari_histo_ai.io import open_image
from napari_histo_ai.models.registry import load_registry

MODEL = "tiny-bench"

MODEL_YAML = f"""
models:
  - name: {MODEL}
    task: foreground (test)
    version: "1"
    format: safetensors
    architecture: tiny_fcn
    kwargs: {{in_channels: 3, out_channels: 1, depth: 2}}
    weights: tiny.safetensors
    activation: sigmoid
    io:
      mpp: 1.0
      patch_size: 96
      halo: 4
      overlap: 8
      normalisation: {{method: scale, scale: 255}}
    outputs:
      - {{name: foreground, kind: probability, channels: [0]}}
"""

REQUIRED = (
    "engine_tiles_per_s",
    "engine_mp_per_s",
    "bare_tiles_per_s",
    "ratio_vs_bare",
    "peak_rss_mb_small",
    "peak_rss_mb_large",
    "rss_ratio_large_vs_small",
    "max_gui_stall_ms",
    "device",
    "model",
    "batch_size",
    "tiles",
    "large_tiles_run",
    "targets_met",
)


@pytest.fixture(autouse=True)
def user_models(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    from safetensors.torch import save_file

    from napari_histo_ai.models.architectures import build_architecture

    folder = tmp_path_factory.mktemp("models")
    net = build_architecture("tiny_fcn", in_channels=3, out_channels=1, depth=2)
    save_file(net.state_dict(), str(folder / "tiny.safetensors"))
    (folder / "tiny.yaml").write_text(MODEL_YAML, encoding="utf-8")
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(folder))
    return folder


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_histo_ai.io.synthetic import make_slide

    folder = tmp_path_factory.mktemp("slide")
    return make_slide(folder / "s.tif", width=1024, height=1024, source=bench._sample_slide())


def _qt_available() -> bool:
    try:
        import napari.qt.threading  # noqa: F401
        import qtpy.QtWidgets  # noqa: F401
    except Exception:
        return False
    return True


def test_benchmark_reports_every_figure(slide, tmp_path):
    result = bench.run_infer_benchmark(
        slide,
        model=MODEL,
        generate=True,
        n_tiles=9,
        device="cpu",
        batch_size=4,
        repeats=1,
        bench_dir=tmp_path / "bench",
        slide_sizes=(512, 1024),  # never the real 10k / 100k slides in tests
    )
    for key in REQUIRED:
        assert key in result, key
    assert json.loads(json.dumps(result)) == result  # JSON as it is
    assert result["device"] == "cpu" and result["gpu"] is None
    assert result["model"] == MODEL and result["batch_size"] == 4
    assert result["tiles"] == 9  # the centre region is laid on the engine's tile grid
    for key in ("engine_tiles_per_s", "engine_mp_per_s", "bare_tiles_per_s", "ratio_vs_bare"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    ratio = result["engine_tiles_per_s"] / result["bare_tiles_per_s"]
    assert result["ratio_vs_bare"] == pytest.approx(ratio, abs=2e-3)

    assert (tmp_path / "bench" / "infer-512.tif").is_file()
    assert (tmp_path / "bench" / "infer-1024.tif").is_file()
    small, large = result["small_slide"], result["large_slide"]
    assert small["complete"] is True and small["tiles_run"] == small["tiles_total"]
    assert result["small_tiles_run"] == small["tiles_run"]
    # the large run stops after about twice the small run's tiles (plus batches in flight)
    assert large["tiles_total"] > 2 * small["tiles_run"]
    assert 2 * small["tiles_run"] <= result["large_tiles_run"] < large["tiles_total"]
    for entry in (small, large):
        assert 0 < entry["peak_rss_before_run_mb"] <= entry["peak_rss_mb"]
    ratio = result["peak_rss_mb_large"] / result["peak_rss_mb_small"]
    assert result["rss_ratio_large_vs_small"] == pytest.approx(ratio, abs=2e-3)

    if _qt_available():
        stall = result["gui_stall"]
        assert result["max_gui_stall_ms"] >= 0 and stall["tiles"] == 9
        assert stall["n_ticks"] > 1 and stall["progress_events"] >= 1
    else:
        assert result["max_gui_stall_ms"] is None and result["gui_stall_error"]
    assert set(result["targets_met"]) == {
        "ratio_vs_bare",
        "rss_ratio_large_vs_small",
        "max_gui_stall_ms",
    }


def test_missing_memory_slides_are_null_with_a_reason(slide, tmp_path):
    result = bench.run_infer_benchmark(
        slide,
        model=MODEL,
        n_tiles=4,
        device="cpu",
        batch_size=4,
        repeats=1,
        bench_dir=tmp_path,
        slide_sizes=(512, 1024),
        gui=False,
    )
    assert result["peak_rss_mb_small"] is None and result["peak_rss_mb_large"] is None
    assert "--generate" in result["rss_error"] and "infer-512.tif" in result["rss_error"]
    assert result["targets_met"]["rss_ratio_large_vs_small"] is None
    assert result["engine_tiles_per_s"] > 0 and result["tiles"] == 4
    assert not list(tmp_path.iterdir())  # nothing generated


def test_default_model_missing_names_the_available(monkeypatch, slide):
    monkeypatch.setattr(bench, "DEFAULT_MODEL", "no-such-default")
    with pytest.raises(ModelNotFoundError, match=rf"'no-such-default'.*{MODEL}.*--model"):
        bench.run_infer_benchmark(slide)


@pytest.mark.parametrize("n_tiles", [1, 6, 16])
def test_region_for_tiles_covers_that_many_tiles(slide, n_tiles, tmp_path):
    from napari_histo_ai.inference.engine import RunConfig, run_model_sync
    from napari_histo_ai.models.loading import load_model

    spec = load_registry().get(MODEL)
    pyramid = open_image(slide)
    try:
        roi = bench.region_for_tiles(pyramid, spec, n_tiles)
        result = run_model_sync(
            pyramid,
            load_model(spec, device="cpu"),
            tmp_path / "run.zarr",
            config=RunConfig(roi=roi, tissue=False, batch_size=8),
        )
    finally:
        pyramid.close()
    rows = math.ceil(math.sqrt(n_tiles))
    assert result.tiles_total == rows * math.ceil(n_tiles / rows)


def test_cli_bench_infer_passes_options_and_writes_json(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return {"engine_tiles_per_s": 1.0}

    monkeypatch.setattr(bench, "run_infer_benchmark", fake)
    out = tmp_path / "infer.json"
    args = ["--model", MODEL, "--tiles", "7", "--device", "cpu", "--batch-size", "3"]
    assert main(["bench", "infer", "s.tif", *args, "--generate", "--json-out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert seen["path"] == "s.tif" and seen["model"] == MODEL and seen["n_tiles"] == 7
    assert seen["generate"] is True and seen["batch_size"] == 3 and seen["device"] == "cpu"


def test_cli_bench_infer_bad_tiles_is_one_line(capsys):
    assert main(["bench", "infer", "s.tif", "--tiles", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--tiles" in err
