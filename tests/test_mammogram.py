"""Mammogram mass detector (paper 002): Info.txt parsing, targets, decoding, the network,
a tiny end-to-end training + evaluation, and the shipped model through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_histo_ai.errors import HistoAIError, ImageReadError
from napari_histo_ai.models.architectures import build_architecture
from napari_histo_ai.models.architectures.detector import MassDetector
from napari_histo_ai.training import mammogram as mm

from .conftest import real

INFO = """mdb001 G CIRC B 535 425 197
mdb002 G NORM
mdb003 D CALC M *NOTE 3*
mdb004 F CIRC B
mdb005 F SPIC M 500 168 26
mdb005 F SPIC M 477 133 30
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Info.txt"
    path.write_text(text, encoding="ascii")
    return path


def test_read_info_rows(tmp_path: Path) -> None:
    rows = mm.read_info(_write(tmp_path, INFO))
    assert [r.ref for r in rows] == ["mdb001", "mdb002", "mdb003", "mdb004", "mdb005", "mdb005"]
    first = rows[0]
    assert (first.tissue, first.abnormality, first.severity) == ("G", "CIRC", "B")
    assert (first.x, first.y, first.radius, first.line) == (535, 425, 197, 1)
    assert rows[1].severity is None and rows[1].x is None
    assert rows[2].severity == "M" and rows[2].x is None  # *NOTE 3*: no centre
    assert rows[3].severity == "B" and rows[3].radius is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("mdb007 G", "2 field(s)"),
        ("film7 G NORM", "'mdbNNN'"),
        ("mdb007 X NORM", "background tissue"),
        ("mdb007 G BLOB B 1 2 3", "class 'BLOB'"),
        ("mdb007 G CIRC Q 1 2 3", "severity 'Q'"),
        ("mdb007 G CIRC B 1 2", "2 number(s)"),
        ("mdb007 G CIRC B 1 two 3", "not integers"),
        ("mdb007 G CIRC B 1 2000 3", "outside"),
        ("mdb007 G CIRC B 1 2 0", "radius 0"),
        ("mdb007 G NORM B", "extra fields"),
        ("mdb007 G CIRC", "no severity"),
    ],
)
def test_read_info_malformed_line_names_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = _write(tmp_path, "mdb001 G NORM\n" + line + "\n")
    with pytest.raises(HistoAIError) as info:
        mm.read_info(path)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and problem in message


def test_read_info_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HistoAIError, match="cannot read"):
        mm.read_info(tmp_path / "Info.txt")


def test_targets_centre_disc_and_size() -> None:
    lesion = mm.Lesion(row=500.0, col=300.0, radius=40.0, label=1, abnormality="SPIC")
    t = mm.targets([lesion])
    iy, ix = (500 + mm.HALO) // mm.STRIDE, (300 + mm.HALO) // mm.STRIDE
    assert t["heat"].shape == (2, 160, 160)
    assert t["heat"][1, iy, ix] == 1.0 and t["heat"][0].max() == 0.0
    assert np.unravel_index(t["heat"][1].argmax(), (160, 160)) == (iy, ix)
    # disc of radius 40 px = 5 output px: about pi * 25 pixels
    assert 60 <= t["mask"].sum() <= 100 and t["mask"][iy, ix] == 1.0
    assert t["size_weight"][iy, ix] == 1.0
    assert np.allclose(np.exp(t["log_size"][:, iy, ix]), 2 * 40 / mm.STRIDE)
    # a flip of the film mirrors the targets exactly (the augmentation relies on it)
    flipped = mm.Lesion(row=500.0, col=1024 - 300.0, radius=40.0, label=1, abnormality="SPIC")
    assert np.array_equal(mm.targets([flipped])["heat"], t["heat"][..., ::-1])


def test_decode_detections_box_class_score() -> None:
    out = np.zeros((5, 160, 160), dtype=np.float32)
    # a malignant centre at film (row 400, col 600): output pixel ((400+128)/8, (600+128)/8)
    # (the engine finds peaks on a 3 x 3 mean: centres are small blobs, as trained)
    out[1, 65:68, 90:93] = 0.6
    out[1, 66, 91] = 0.9
    out[0, 66, 91] = 0.2
    out[0, 119:122, 39:42] = 0.1  # below the threshold
    out[3:, 66, 91] = 10.0  # 10 output px = 80 film px
    out[2, 60:72, 85:97] = 0.8
    dets = mm.decode_detections(out, threshold=0.3)
    assert dets.labels.tolist() == [1]
    assert dets.scores[0] == pytest.approx(round(0.9 * 255) / 255)
    row = (66 - 16 + 0.5) * 8
    col = (91 - 16 + 0.5) * 8
    assert np.allclose(dets.boxes[0], [row - 40, col - 40, row + 40, col + 40])
    assert dets.mask.shape == (128, 128) and dets.mask.sum() == 144
    assert len(mm.decode_detections(out, threshold=0.05).scores) == 2
    assert len(mm.decode_detections(out, threshold=0.95).scores) == 0


def test_mass_detector_shapes_and_sizes() -> None:
    net = build_architecture("mass_detector", in_channels=1, width=4, downsample=2)
    assert isinstance(net, MassDetector)
    net.eval()
    with torch.no_grad():
        y = net(torch.rand(2, 1, 64, 96))
    assert y.shape == (2, 5, 16, 24)
    assert bool((y[:, 3:] > 0).all())
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.rand(1, 1, 60, 64))
    # the seed fixes the initialisation and leaves the global RNG alone
    state = torch.random.get_rng_state()
    a, b = MassDetector(width=4, seed=3), MassDetector(width=4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _synthetic_folder(tmp_path: Path, n_films: int = 8) -> Path:
    """``n_films`` 1024² films of ``n_films / 2`` women: bright discs on a dark breast."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "mini_mias"
    folder.mkdir()
    lines = []
    yy, xx = np.mgrid[0:1024, 0:1024]
    for n in range(1, n_films + 1):
        film = rng.normal(60, 10, (1024, 1024)).clip(0, 255)
        film[:, 800:] = 0  # background
        if n % 2:
            x, y, r = int(rng.integers(200, 600)), int(rng.integers(200, 800)), 40
            film[(yy - (1024 - y)) ** 2 + (xx - x) ** 2 <= r * r] += 120
            lines.append(f"mdb{n:03d} G CIRC {'BM'[n % 4 == 1]} {x} {y} {r}")
        else:
            lines.append(f"mdb{n:03d} F NORM")
        Image.fromarray(film.clip(0, 255).astype(np.uint8)).save(folder / f"mdb{n:03d}.png")
    (folder / "Info.txt").write_text("\n".join(lines) + "\n", encoding="ascii")
    return folder


def test_load_and_split_by_woman(tmp_path: Path) -> None:
    folder = _synthetic_folder(tmp_path)
    films = mm.load_mias(folder)
    assert [f.case_id for f in films[:2]] == ["mdb001+mdb002"] * 2
    first = films[0]
    row = next(line for line in (folder / "Info.txt").read_text().splitlines())
    x, y = (int(v) for v in row.split()[4:6])
    assert (first.lesions[0].row, first.lesions[0].col) == (1024 - y, x)  # origin bottom-left
    train, val = mm.split_by_woman(films, seed=1, val_fraction=0.25)
    assert {f.case_id for f in train}.isdisjoint({f.case_id for f in val})
    assert len(val) == 2 and len(train) == 6
    assert mm.split_by_woman(films, seed=1, val_fraction=0.25)[1] == val
    Path(folder / "mdb009.png").write_bytes((folder / "mdb001.png").read_bytes())
    with pytest.raises(HistoAIError, match="mdb009 has no row"):
        mm.load_mias(folder)


def test_load_rejects_wrong_film_size(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "mias"
    folder.mkdir()
    (folder / "Info.txt").write_text("mdb001 G NORM\n", encoding="ascii")
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(folder / "mdb001.png")
    with pytest.raises(ImageReadError, match="120 × 100 px"):
        mm.load_mias(folder)


def test_train_and_evaluate_tiny(tmp_path: Path) -> None:
    folder = _synthetic_folder(tmp_path, n_films=4)
    out = tmp_path / "w" / "tiny-detector.safetensors"
    steps = []
    record = mm.train_mammogram_sync(
        folder, out, progress=steps.append, epochs=2, batch_size=2, width=4, val_fraction=0.5
    )
    assert [s["step"] for s in steps] == [1, 2]
    assert out.is_file() and out.with_suffix(".json").is_file()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["split"]["validation"] == record["split"]["validation"]
    assert set(saved["split"]["validation"]).isdisjoint(saved["split"]["train"])
    m = saved["metrics"]
    assert m["n_films"] == 2 and len(m["sweep"]) == len(mm.SWEEP)
    for row in m["sweep"]:
        assert 0.0 <= row["mean_sensitivity"] <= 1.0 and row["fppi"] >= 0.0
    assert saved["threshold"] in mm.SWEEP

    # evaluate() through the registry loader with these weights (width 4 != shipped 16,
    # so the registered entry's kwargs would not fit: use an entry of its own)
    import dataclasses

    from napari_histo_ai.models import registry

    spec = registry.load_registry().get("mias-mass-detector")
    tiny = dataclasses.replace(spec, kwargs={**spec.kwargs, "width": 4})
    original = registry.Registry.get

    def get(self: registry.Registry, name: str) -> object:
        return tiny if name == "mias-mass-detector" else original(self, name)

    mp = pytest.MonkeyPatch()
    mp.setattr(registry.Registry, "get", get)
    try:
        result = mm.evaluate(folder, model="mias-mass-detector", weights=out)
    finally:
        mp.undo()
    assert result["split"]["validation"] == saved["split"]["validation"]
    assert result["n_films"] == 2
    assert set(result["at_threshold"]) >= {"mean_sensitivity", "fppi", "paper_map"}


def test_shipped_model_predicts_boxes_and_mask(tmp_path: Path) -> None:
    """The engine on a held-out real film gives classed, scored boxes and a mask, and the
    boxes are those the evaluation decodes (same input, same peaks)."""
    from napari_histo_ai._napari.results import run_folder_layers
    from napari_histo_ai.inference.engine import RunConfig, run_model_sync
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    spec = load_registry().get("mias-mass-detector")
    assert spec.weights is not None
    record = json.loads(spec.weights.with_suffix(".json").read_text())
    folder = real("mini_mias")
    located = {r.ref for r in mm.read_info(folder / "Info.txt") if r.x is not None}
    ref = next(r for r in record["split"]["validation"] if r in located)  # held out, a lesion
    path = next(p for p in folder.iterdir() if p.stem == ref)

    threshold = 0.05
    predictor = load_model(spec, device="cpu")
    result = run_model_sync(
        open_image(path), predictor, tmp_path / "run.zarr", config=RunConfig(threshold=threshold)
    )
    boxes = result.objects["masses"]
    assert result.complete and len(boxes) >= 1
    assert set(boxes.labels.tolist()) <= {0, 1} and boxes.classes == ("benign", "malignant")
    assert bool((boxes.scores >= threshold).all())

    film = mm.load_mias(folder, refs=[ref])[0]
    x = torch.from_numpy(mm.film_input(film.image))[None, None]
    with torch.inference_mode():
        y = predictor(x)[0].float().numpy()
    dets = mm.decode_detections(mm._probabilities(y), threshold=threshold)
    order_e, order_d = np.argsort(-boxes.scores), np.argsort(-dets.scores)
    assert len(dets.scores) == len(boxes)
    assert np.allclose(boxes.coords[order_e], dets.boxes[order_d], atol=0.5)
    assert np.array_equal(boxes.labels[order_e], dets.labels[order_d])

    layers = {
        meta["name"]: (data, meta, kind) for data, meta, kind in run_folder_layers(result.path)
    }
    kinds = {kind for _, _, kind in layers.values()}
    assert "shapes" in kinds and "labels" in kinds
    shapes = next(v for v in layers.values() if v[2] == "shapes")
    assert set(shapes[1]["features"]) >= {"class", "score"}
