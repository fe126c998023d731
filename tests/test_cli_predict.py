"""``napari-histo-ai models`` and ``predict``: run folders, summaries, regions, resume,
one-line errors, and a local Dask cluster giving the same outputs as a local run."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_histo_ai.cli import main
from napari_histo_ai.inference.batch import image_stem, predict_paths, run_folder
from napari_histo_ai.inference.engine import RunConfig

from .conftest import real

MODEL = "tiny-nuclei"

MODEL_YAML = f"""
models:
  - name: {MODEL}
    task: nucleus detection (test)
    version: "1"
    format: safetensors
    architecture: tiny_fcn
    kwargs: {{in_channels: 3, out_channels: 2, depth: 2}}
    weights: tiny.safetensors
    activation: sigmoid
    io:
      mpp: 1.0
      patch_size: 128
      halo: 4
      overlap: 16
      normalisation: {{method: scale, scale: 255}}
    outputs:
      - {{name: foreground, kind: probability, channels: [0]}}
      - {{name: nuclei, kind: points, channels: [1], threshold: 0.3, min_distance_um: 4}}
  - name: no-weights
    task: a model whose weights file is missing
    version: "1"
    format: safetensors
    architecture: tiny_fcn
    weights: missing.safetensors
    io: {{mpp: 1.0, patch_size: 64}}
    outputs:
      - {{name: foreground, kind: probability, channels: [0]}}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user model folder: a tiny FCN with a probability and a points output."""
    from safetensors.torch import save_file

    from napari_histo_ai.models.architectures import build_architecture

    folder = tmp_path_factory.mktemp("models")
    net = build_architecture("tiny_fcn", in_channels=3, out_channels=2, depth=2, seed=3)
    save_file(net.state_dict(), str(folder / "tiny.safetensors"))
    (folder / "tiny.yaml").write_text(MODEL_YAML, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def user_models(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(model_dir))
    return model_dir


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small pyramidal TIFFs of real H&E pixels (0.499 µm/px)."""
    from importlib.resources import files

    from napari_histo_ai.io.synthetic import make_slide

    source = Path(str(files("napari_histo_ai").joinpath("data", "CMU-1-Small-Region.svs")))
    folder = tmp_path_factory.mktemp("slides")
    return [
        make_slide(folder / "alpha.tif", width=1024, height=1024, source=source),
        make_slide(folder / "beta.tif", width=768, height=640, source=source),
    ]


def probability(run: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(run), mode="r")["probability"]["0"])


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- models --------------------------------------------------------------------------------


def test_models_json_lists_the_user_model(capsys):
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in data["models"]]
    assert MODEL in names
    entry = data["models"][names.index(MODEL)]
    assert entry["available"] is True
    assert isinstance(data["problems"], list)


def test_models_prints_cards_and_problems(user_models, capsys):
    (user_models / "broken.yaml").write_text("models: [{name: broken}]\n", encoding="utf-8")
    try:
        assert main(["models"]) == 0
    finally:
        (user_models / "broken.yaml").unlink()
    captured = capsys.readouterr()
    assert f"{MODEL} 1 — nucleus detection (test)" in captured.out
    assert "nuclei: points" in captured.out
    assert "broken" in captured.err and captured.err.startswith("warning: ")


# -- predict, here -------------------------------------------------------------------------


def test_predict_writes_run_folder_geojson_and_summary(slides, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["predict", str(slides[0]), "--model", MODEL, "--out", str(out), "--batch-size", "8"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = out / f"alpha.{MODEL}.zarr"
    assert run.is_dir()
    assert probability(run).shape[0] == 2  # foreground, and the map the points come from
    assert (run / "summary.json").is_file()
    geojson = json.loads((run / "nuclei.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"

    printed = json.loads(captured.out)
    (entry,) = printed["runs"]
    assert entry["input"] == str(slides[0]) and entry["run"] == str(run)
    assert entry["error"] is None and entry["complete"] is True
    assert entry["tiles_done"] == entry["tiles_total"] > 0
    assert entry["objects"]["nuclei"] == len(geojson["features"])
    assert json.loads((out / "summary.json").read_text()) == printed
    assert "done] alpha.tif: finished" in captured.err


def test_roi_limits_the_tiles_and_is_x_y_w_h(slides, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["predict", str(slides[0]), "--model", MODEL, "--out", str(out), "--no-tissue"]) == 0
    )
    whole = json.loads(capsys.readouterr().out)["runs"][0]
    args = ["--roi", "100,300,400,150", "--no-tissue", "--out", str(tmp_path / "roi")]
    assert main(["predict", str(slides[0]), "--model", MODEL, *args]) == 0
    part = json.loads(capsys.readouterr().out)["runs"][0]
    assert part["roi"] == [300, 100, 150, 400]  # (top, left, height, width)
    assert 0 < part["tiles_total"] < whole["tiles_total"]
    assert part["run"].endswith(f"alpha.{MODEL}.zarr")  # one region: the plain name


def test_several_rois_get_their_own_run_folders(slides, tmp_path, capsys):
    out = tmp_path / "out"
    rois = ["--roi", "0,0,300,300", "--roi", "400,400,300,200"]
    assert main(["predict", str(slides[0]), "--model", MODEL, "--out", str(out), *rois]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [Path(r["run"]).name for r in runs] == [
        f"alpha.{MODEL}.roi-0-0-300-300.zarr",
        f"alpha.{MODEL}.roi-400-400-300-200.zarr",
    ]
    assert all(Path(r["run"]).is_dir() and r["complete"] for r in runs)
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 2


def test_interrupted_run_resumes(slides, tmp_path):
    """A cancelled batch leaves runs that the next call finishes, computing only the rest."""
    config = RunConfig(batch_size=4, tissue=False)
    cancel = threading.Event()
    seen = []

    def stop_early(p):
        seen.append(p)
        if p.done >= 8:
            cancel.set()

    first = predict_paths(
        slides, MODEL, tmp_path / "out", config=config, cancel=cancel, on_progress=stop_early
    )
    assert first[0]["cancelled"] is True and first[0]["complete"] is False
    assert first[1]["cancelled"] is True and first[1]["tiles_done"] == 0  # never started

    progress = []
    again = predict_paths(
        slides, MODEL, tmp_path / "out", config=config, on_progress=progress.append
    )
    assert all(e["complete"] for e in again)
    # resumed: tiles whose output cells were all finished are not computed again
    assert progress[0].label == "alpha.tif" and 0 < progress[0].done < progress[0].total

    fresh = predict_paths(slides[:1], MODEL, tmp_path / "fresh", config=config)
    np.testing.assert_array_equal(
        probability(Path(again[0]["run"])), probability(Path(fresh[0]["run"]))
    )


def test_later_calls_add_to_the_folder_summary(slides, tmp_path):
    config = RunConfig(batch_size=8, tissue=False)
    predict_paths(slides[:1], MODEL, tmp_path, config=config)
    predict_paths(slides[1:], MODEL, tmp_path, config=config)
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert sorted(Path(r["input"]).name for r in runs) == ["alpha.tif", "beta.tif"]


# -- errors --------------------------------------------------------------------------------


def test_unknown_model_is_one_line_naming_it_and_the_available(slides, tmp_path, capsys):
    code = main(["predict", str(slides[0]), "--model", "no-such-net", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert len(err.strip().splitlines()) == 1
    assert "no-such-net" in line and MODEL in line


@pytest.mark.parametrize("where", [[], ["--local-cluster", "1"]], ids=["here", "cluster"])
def test_missing_weights_fail_once_in_one_line(slides, tmp_path, capsys, where):
    args = ["--model", "no-weights", "--out", str(tmp_path), *where]
    assert main(["predict", str(slides[0]), str(slides[1]), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "missing.safetensors" in one_error_line(err) and "no-weights" in err


@pytest.mark.parametrize("roi", ["1,2,3", "a,b,c,d", "0,0,0,10", "-5,0,10,10", "0,0,10,nan"])
def test_malformed_roi_is_one_line(slides, tmp_path, capsys, roi):
    args = ["--model", MODEL, "--out", str(tmp_path), f"--roi={roi}"]  # "-5,..." is no option
    code = main(["predict", str(slides[0]), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--roi" in one_error_line(err) and "X,Y,W,H" in err


def test_roi_outside_the_image_fails_that_input(slides, tmp_path, capsys):
    args = ["--out", str(tmp_path), "--roi", "5000,5000,100,100"]
    assert main(["predict", str(slides[0]), "--model", MODEL, *args]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert str(slides[0]) in line and "outside the image" in line
    (entry,) = json.loads(captured.out)["runs"]
    assert "outside the image" in entry["error"]


def test_a_failing_input_does_not_stop_the_others(slides, tmp_path, capsys):
    missing = tmp_path / "missing.tif"
    args = ["--out", str(tmp_path / "out"), "--no-tissue", "--batch-size", "8"]
    assert main(["predict", str(missing), str(slides[1]), "--model", MODEL, *args]) == 2
    captured = capsys.readouterr()
    assert str(missing) in one_error_line(captured.err)
    bad, good = json.loads(captured.out)["runs"]
    assert bad["error"] and "traceback" not in bad
    assert good["error"] is None and good["complete"] is True


def test_two_inputs_with_the_same_name_are_refused(slides, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = Path(shutil.copy(slides[0], other / slides[0].name))
    args = ["--model", MODEL, "--out", str(tmp_path / "out")]
    assert main(["predict", str(slides[0]), str(twin), *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "same" in line and str(twin) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--batch-size", "0"), ("--threshold", "1.5"), ("--mpp", "-1")]
)
def test_bad_numbers_are_one_line(slides, tmp_path, capsys, option, value):
    args = ["--model", MODEL, "--out", str(tmp_path), option, value]
    assert main(["predict", str(slides[0]), *args]) == 2
    assert option in one_error_line(capsys.readouterr().err)


def test_run_folder_names():
    assert image_stem("/d/a.ome.tiff") == "a" and image_stem("b.svs") == "b"
    assert image_stem("/d/c.ome.zarr/") == "c" and image_stem("v.nii.gz") == "v"
    roi = (20.0, 10.0, 40.0, 30.0)  # (top, left, height, width)
    assert run_folder("/o", "/d/s.svs", "m", roi) == Path("/o/s.m.roi-10-20-30-40.zarr")


# -- a local Dask cluster ------------------------------------------------------------------


def test_local_cluster_gives_the_same_outputs_as_a_local_run(slides, tmp_path, capsys):
    paths = [str(p) for p in slides]
    common = ["--model", MODEL, "--batch-size", "8"]
    assert main(["predict", *paths, *common, "--out", str(tmp_path / "here")]) == 0
    here = json.loads(capsys.readouterr().out)["runs"]
    code = main(
        ["predict", *paths, *common, "--out", str(tmp_path / "dask"), "--local-cluster", "2"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    there = json.loads(captured.out)["runs"]
    assert json.loads((tmp_path / "dask" / "summary.json").read_text())["runs"] == there
    for a, b in zip(here, there, strict=True):
        assert b["error"] is None and b["complete"] is True
        assert Path(b["run"]).parent == tmp_path / "dask"
        assert Path(a["run"]).name == Path(b["run"]).name
        assert a["tiles_done"] == b["tiles_done"] and a["objects"] == b["objects"]
        pa, pb = probability(Path(a["run"])), probability(Path(b["run"]))
        assert pa.shape == pb.shape
        # one worker thread vs several: float sums may differ in the last bit
        assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1
    assert "2/2 done" in captured.err


def test_local_cluster_reports_a_failing_input_and_finishes_the_rest(slides, tmp_path, capsys):
    missing = tmp_path / "missing.tif"
    args = ["--model", MODEL, "--out", str(tmp_path / "out"), "--no-tissue", "--local-cluster", "2"]
    assert main(["predict", str(slides[1]), str(missing), *args]) == 2
    captured = capsys.readouterr()
    assert str(missing) in one_error_line(captured.err)
    good, bad = json.loads(captured.out)["runs"]
    assert good["complete"] is True and bad["error"]


def test_train_default_names_a_missing_data_folder(tmp_path, capsys) -> None:
    from napari_histo_ai.cli import main

    status = main(
        [
            "train-default",
            "nuclei",
            "--data",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "w.safetensors"),
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "absent" in err
    assert not (tmp_path / "w.safetensors").exists()


def test_train_default_lists_every_paper_task(capsys) -> None:
    from napari_histo_ai.cli import main
    from napari_histo_ai.training.defaults import TASKS

    with pytest.raises(SystemExit):
        main(["train-default", "no-such-task", "--data", ".", "--out", "x"])
    err = capsys.readouterr().err
    tasks = ("nuclei", "mitosis", "idc", "tissue", "breakhis", "mri", "mammogram", "magnification")
    for name in tasks:
        assert name in TASKS and name in err


def test_evaluate_prints_the_held_out_metrics_of_the_shipped_model(tmp_path, capsys) -> None:
    from napari_histo_ai.cli import main

    data = real("miccai_nuclei_seg")
    out = tmp_path / "metrics.json"
    status = main(
        ["evaluate", "--model", "nuclei-unet", "--data", str(data), "--json-out", str(out)]
    )
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert set(result["per_image"]) == {"image03", "image11"}
    # the card's figures come from the same computation
    from napari_histo_ai.models.registry import load_registry

    card = load_registry().get("nuclei-unet").card.metrics
    assert result["per_image"]["image03"]["dice"] == pytest.approx(card["dice_image03_20x"])


def test_evaluate_names_an_unknown_model_and_a_missing_folder(tmp_path, capsys) -> None:
    from napari_histo_ai.cli import main

    assert main(["evaluate", "--model", "no-such", "--data", str(tmp_path)]) == 2
    assert "no-such" in capsys.readouterr().err
    status = main(["evaluate", "--model", "nuclei-unet", "--data", str(tmp_path / "absent")])
    assert status == 2
    assert "absent" in capsys.readouterr().err
