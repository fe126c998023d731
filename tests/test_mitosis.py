"""Mitosis models of paper 000: exp(-a·d) targets, rare-hinge loss, negative feed, the
networks, a tiny training run, and the shipped weights on held-out real crops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_histo_ai.errors import HistoAIError
from napari_histo_ai.models.architectures import build_architecture
from napari_histo_ai.models.architectures.mitosis import BasicConvNet, MitosisFCN
from napari_histo_ai.training.mitosis import (
    MODEL_MPP,
    _negative_feed,
    convnet_weights_path,
    detect_peaks,
    fcn_map,
    load_ami_crops,
    probability_map,
    rare_hinge_loss,
    split_by_image,
    tile_labels,
    train_mitosis_sync,
)

from .conftest import real

WEIGHTS = Path(__file__).resolve().parents[1] / "src/napari_histo_ai/models/weights"


# ----------------------------------------------------------------------------- targets
def test_probability_map_matches_the_papers_figure_2() -> None:
    """Figure 2 of paper 000 is exactly a = 1 per px: 1.00 at the point, 0.37 beside it,
    0.24 on the diagonal, 0.14 two away, 0.11 at (2, 1), 0.06 at (2, 2), 0.05 three away."""
    m = probability_map((9, 7), [(4, 3)], a=1.0)
    assert m.shape == (9, 7) and m.dtype == np.float32
    for (r, c), value in {
        (4, 3): 1.00, (4, 4): 0.37, (3, 4): 0.24, (4, 5): 0.14,
        (2, 4): 0.11, (2, 2): 0.11, (1, 3): 0.05, (2, 1): 0.06, (1, 1): 0.03,
    }.items():  # fmt: skip
        assert m[r, c] == pytest.approx(value, abs=0.006), (r, c)


def test_probability_map_nearest_point_and_edges() -> None:
    m = probability_map((20, 30), [(2, 2), (15, 25)], a=0.5)
    assert m[2, 2] == pytest.approx(1) and m[15, 25] == pytest.approx(1)
    d = min(math.hypot(10 - 2, 12 - 2), math.hypot(10 - 15, 12 - 25))
    assert m[10, 12] == pytest.approx(math.exp(-0.5 * d), rel=1e-5)
    # a point outside the map still raises its edge
    outside = probability_map((4, 4), [(-1.0, 1.0)], a=1.0)
    assert outside[0, 1] == pytest.approx(math.exp(-1.0))
    assert not probability_map((3, 3), np.zeros((0, 2)), a=1.0).any()
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(HistoAIError, match="decay"):
            probability_map((3, 3), [(1, 1)], a=bad)
    with pytest.raises(HistoAIError, match="points"):
        probability_map((3, 3), [(1, 1, 1)], a=1.0)


def test_tile_labels_follow_the_threshold() -> None:
    m = probability_map((16, 16), [(2, 2)], a=0.5)
    # tile (0, 0) holds the point; tile (0, 1) starts 6 px away: exp(-3) ≈ 0.05
    assert tile_labels(m, 8, threshold=0.5).tolist() == [[True, False], [False, False]]
    assert tile_labels(m, 8, threshold=0.04)[0, 1]
    assert tile_labels(m, 8, threshold=0.04)[1, 1] == (m[8:, 8:].max() >= 0.04)
    with pytest.raises(HistoAIError, match="threshold"):
        tile_labels(m, 8, threshold=0.0)


# ----------------------------------------------------------------------------- losses
def test_rare_hinge_amplifies_positives_by_e_to_the_a() -> None:
    s = torch.tensor([0.0])
    neg = rare_hinge_loss(s, torch.tensor([0.0]), a=2.0)
    pos = rare_hinge_loss(s, torch.tensor([1.0]), a=2.0)
    assert float(neg) == pytest.approx(1.0)  # max(0, 1 - (-1)·0) · e^0
    assert float(pos) == pytest.approx(math.exp(2.0))
    assert float(rare_hinge_loss(s, torch.tensor([1.0]), a=4.0)) == pytest.approx(math.exp(4.0))
    # beyond the margin the loss is zero, for both classes
    assert float(rare_hinge_loss(torch.tensor([2.0]), torch.tensor([1.0]), a=4.0)) == 0.0
    assert float(rare_hinge_loss(torch.tensor([-1.5]), torch.tensor([0.0]), a=4.0)) == 0.0


def test_negative_feed_takes_every_mistake_and_some_correct_tiles() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([True] * 10 + [False] * 90)
    probability = np.where(labels, 0.9, 0.1)
    probability[[0, 1, 50, 51, 52]] = [0.1, 0.2, 0.8, 0.9, 0.6]  # 5 mistakes
    feed = _negative_feed((probability >= 0.5) != labels, rng, correct_share=1.0)
    assert {0, 1, 50, 51, 52} <= set(feed.tolist())
    assert len(feed) == len(set(feed.tolist())) == 5 + 32  # at least 32 correct ones
    assert set(feed.tolist()) - {0, 1, 50, 51, 52} <= set(range(100))


# ----------------------------------------------------------------------------- networks
def test_networks_shapes_and_registry_names() -> None:
    torch.manual_seed(0)
    net = build_architecture("mitosis_convnet", filters=[8, 16], dense=16)
    assert isinstance(net, BasicConvNet)
    assert net.eval()(torch.rand(3, 3, 24, 24)).shape == (3, 2)
    assert net(torch.rand(1, 3, 40, 40)).shape == (1, 2)  # adaptive pool: any side ≥ 4
    with pytest.raises(ValueError, match="at least 4"):
        net(torch.rand(1, 3, 2, 2))
    fcn = build_architecture("mitosis_fcn", filters=[8, 16, 32], dense=16)
    assert isinstance(fcn, MitosisFCN) and fcn.size_multiple == 4
    assert fcn.eval()(torch.rand(2, 3, 48, 64)).shape == (2, 1, 48, 64)
    with pytest.raises(ValueError, match="multiples of 4"):
        fcn(torch.rand(1, 3, 30, 32))


def test_fcn_is_translation_equivariant_in_steps_of_its_size_multiple() -> None:
    """What tiled inference relies on: a shift by 4 px shifts the map (away from edges)."""
    torch.manual_seed(1)
    fcn = MitosisFCN(filters=(8, 16, 32), dense=16).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        a = fcn(x)[0, 0, 40:56, 40:56]
        b = fcn(torch.roll(x, shifts=(4, 8), dims=(2, 3)))[0, 0, 44:60, 48:64]
    assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def ami() -> Path:
    return real("ami_br_mitosis/AMI-BR.csv").parent


@pytest.fixture(scope="module")
def crops(ami: Path) -> list:
    return load_ami_crops(ami)


def test_real_crops_are_resampled_and_split_by_source_image(crops: list) -> None:
    assert len(crops) == 680
    sizes = {c.image.shape[:2] for c in crops}
    assert sizes == {(59, 59), (64, 64)}  # 128 px at 0.23 / 0.25 µm/px → 0.5 µm/px
    for c in crops[:50]:
        h = c.image.shape[0]
        assert c.centre == pytest.approx([(h - 1) / 2 + 0.5 * h / 128] * 2, abs=0.01)
        assert len(c.inside()) >= 1
    # some crops hold a second labelled mitosis (from AMI-BR.csv)
    assert sum(len(c.inside()) > 1 for c in crops) >= 5
    train, test = split_by_image(crops)
    assert not {c.case_id for c in train} & {c.case_id for c in test}
    assert 0.18 < len(test) / len(crops) < 0.3
    assert {c.case_id.split("/")[0] for c in test} == {"MIDOG21", "TUPAC16"}
    assert split_by_image(crops)[1] == test  # deterministic


def test_training_refits_the_shipped_stain_reference(crops: list) -> None:
    """``train-default mitosis`` must reproduce the reference the registry entries carry."""
    from napari_histo_ai.models.registry import load_registry
    from napari_histo_ai.training.mitosis import reference_stains

    train, _ = split_by_image(crops)
    fitted = reference_stains(train, seed=0)
    for name in ("mitosis-fcn", "mitosis-convnet"):
        shipped = load_registry().get(name).io.normalisation.stain
        assert shipped is not None
        assert np.allclose(fitted.stain_matrix, shipped.stain_matrix, atol=1e-5)
        assert np.allclose(fitted.max_concentrations, shipped.max_concentrations, atol=1e-5)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HistoAIError, match=r"AMI-BR\.csv"):
        load_ami_crops(tmp_path)


# ----------------------------------------------------------------------------- training
def _synthetic_ami(folder: Path, n_slides: int = 6, per_slide: int = 3) -> Path:
    """A tiny AMi-Br-like folder: pink crops with a dark 'mitosis' blob at the centre."""
    rng = np.random.default_rng(0)
    rows = [
        "idx,slide,dataset,uid,x,y,expert1_label,expert2_label,expert1_atypical,"
        "expert2_atypical,expert3_atypical,majority_atypical"
    ]
    (folder / "normal").mkdir(parents=True)
    (folder / "atypical").mkdir()
    yy, xx = np.mgrid[:128, :128]
    uid = 0
    for s in range(n_slides):
        for k in range(per_slide):
            uid += 1
            x, y = 1000 + 400 * k, 2000
            rows.append(f"{uid},{s:03d}.tiff,MIDOG21,{uid},{x},{y},NMF,NMF,False,False,False,False")
            img = np.empty((128, 128, 3), np.float32)
            img[:] = (225, 160, 195)
            img += rng.normal(0, 6, img.shape)
            for _ in range(4):  # ordinary pale nuclei
                r, c = rng.integers(10, 118, 2)
                img[(yy - r) ** 2 + (xx - c) ** 2 < 60] = (150, 110, 170)
            img[(yy - 64) ** 2 + (xx - 64) ** 2 < 90] = (60, 20, 90)  # the mitosis
            sub = "normal" if k % 2 else "atypical"
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                folder / sub / f"MIDOG21_{uid}.png"
            )
    (folder / "AMI-BR.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def test_tiny_training_run_writes_both_models(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _synthetic_ami(tmp_path / "ami_br_mitosis")
    out = tmp_path / "weights" / "mitosis-fcn-v1.safetensors"
    seen: list[dict] = []
    result = train_mitosis_sync(
        data, out, progress=seen.append, seed=0, epochs=2, samples_per_epoch=48,
        batch_size=16, fcn_filters=(8, 16, 16), convnet_filters=(8, 8),
    )  # fmt: skip
    convnet_path = convnet_weights_path(out)
    assert convnet_path.name == "mitosis-convnet-v1.safetensors"
    for path in (out, convnet_path):
        assert path.is_file() and path.with_suffix(".json").is_file()
        record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        assert record["seed"] == 0 and record["negative_feed"] is True
        assert record["split"]["test_images"] and not (
            set(record["split"]["test_images"]) & set(record["split"]["train_images"])
        )
    # progress: 2 convnet epochs then 2 FCN epochs, each with a negative-feed pass
    assert [(r["model"], r["epoch"]) for r in seen] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all("feed" in r and "misclassified" in r for r in seen)
    det = result["fcn"]["metrics"]["detection"]
    assert 0 <= det["detection_f1_7.5um"] <= 1
    assert result["convnet"]["metrics"]["tiles"]["crops"]["tiles"] > 0
    from safetensors.torch import load_file

    state = load_file(str(out))
    net = MitosisFCN(filters=(8, 16, 16), dense=64)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_rare_hinge_training_option(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _synthetic_ami(tmp_path / "ami_br_mitosis", n_slides=5, per_slide=2)
    result = train_mitosis_sync(
        data, tmp_path / "m-fcn.safetensors", epochs=1, samples_per_epoch=32, batch_size=16,
        loss="rare_hinge", hinge_a=4.0, negative_feed=False, stain_normalise=False,
        fcn_filters=(8, 8, 8), convnet_filters=(8, 8),
    )  # fmt: skip
    assert result["fcn"]["loss"] == "rare_hinge (a = 4.0)"
    assert result["fcn"]["stain_reference"] is None
    with pytest.raises(HistoAIError, match="loss"):
        train_mitosis_sync(data, tmp_path / "x.safetensors", loss="focal")


# ----------------------------------------------------------------------------- shipped
@pytest.fixture(scope="module")
def shipped() -> dict:
    from napari_histo_ai.models.loading import load_model
    from napari_histo_ai.models.registry import load_registry

    registry = load_registry(entry_points=False)
    out = {}
    for name in ("mitosis-convnet", "mitosis-fcn"):
        spec = registry.get(name)
        predictor = load_model(spec, device="cpu")
        predictor.check()
        out[name] = (spec, predictor.module)
    return out


def test_shipped_fcn_peaks_near_the_centre_of_held_out_crops(crops: list, shipped: dict) -> None:
    """On held-out real crops the map's best peak lies within 4 µm of the mitosis."""
    from napari_histo_ai.models.preprocessing import macenko_apply

    spec, net = shipped["mitosis-fcn"]
    stain = spec.io.normalisation.stain
    points = next(o for o in spec.outputs if o.kind == "points")
    _, test = split_by_image(crops)
    chosen = test[:: max(1, len(test) // 12)][:12]
    near = 0
    for crop in chosen:
        prob = fcn_map(net, macenko_apply(crop.image, stain))
        peaks = detect_peaks(
            prob, threshold=points.threshold, min_distance_px=points.min_distance_um / MODEL_MPP
        )
        if len(peaks):
            best = peaks[np.argmax(prob[peaks[:, 0].astype(int), peaks[:, 1].astype(int)])]
            near += np.hypot(*(best - crop.centre)) * MODEL_MPP <= 4.0
    assert near >= 0.6 * len(chosen), f"{near} of {len(chosen)} crops"


def test_shipped_convnet_prefers_the_centre_tile(crops: list, shipped: dict) -> None:
    """Held-out crops: the tile over the mitosis scores above two corner tiles, with the
    registry's preprocessing (Macenko per tile, then / 255) as the engine applies it."""
    from napari_histo_ai.models.preprocessing import normalise

    spec, net = shipped["mitosis-convnet"]
    assert spec.io.normalisation.stain is not None
    _, test = split_by_image(crops)
    wins = 0
    chosen = test[::10][:12]
    for crop in chosen:
        r = round(crop.centre[0]) - 12
        tiles = [crop.image[r : r + 24, r : r + 24], crop.image[:24, :24], crop.image[-24:, -24:]]
        x = normalise(np.stack(tiles), spec.io.normalisation)
        with torch.no_grad():
            p = torch.softmax(net(torch.from_numpy(x)), dim=1)[:, 1].numpy()
        wins += p[0] > max(p[1], p[2])
    assert wins >= 0.75 * len(chosen), f"{wins} of {len(chosen)}"


def test_predict_cli_on_real_crops_and_the_cmu_slide(tmp_path: Path, crops: list) -> None:
    """The engine path. A held-out crop PNG (no mpp → ``--mpp 0.25``) runs and gives a
    map; a 3 × 3 mosaic of nine held-out crops of one TUPAC16 image (the held-out image
    with most crops; one stain, 384 px so the 256 px patch is mostly tissue) gives
    points at most crop centres; a CMU-1 region runs to the end."""
    from collections import Counter

    import zarr

    from napari_histo_ai.cli import main

    _, test = split_by_image(crops)
    folder = real("ami_br_mitosis")
    counts = Counter(c.case_id for c in test if c.case_id.startswith("TUPAC16"))
    case = counts.most_common(1)[0][0]
    tupac = [c for c in test if c.case_id == case][:9]
    paths = [next(folder.glob(f"*/{c.name}.png")) for c in tupac]
    out = tmp_path / "run"
    assert main(["predict", str(paths[1]), "--model", "mitosis-fcn", "--out", str(out),
                 "--mpp", "0.25", "--no-tissue"]) == 0  # fmt: skip
    run = next(out.glob("*.mitosis-fcn.zarr"))
    prob = np.asarray(zarr.open_group(run, mode="r")["probability"]["0"])
    assert prob.shape == (1, 64, 64) and prob.max() > 0  # 128 px at 0.25 → 64 px at 0.5

    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    mosaic = np.concatenate([np.concatenate(tiles[i : i + 3], axis=1) for i in (0, 3, 6)])
    png = tmp_path / "mosaic.png"
    Image.fromarray(mosaic).save(png)
    out = tmp_path / "mosaic_run"
    assert main(["predict", str(png), "--model", "mitosis-fcn", "--out", str(out),
                 "--mpp", "0.25", "--no-tissue"]) == 0  # fmt: skip
    geo = json.loads(next(out.glob("*/*.geojson")).read_text(encoding="utf-8"))
    xy = np.array([f["geometry"]["coordinates"] for f in geo["features"]], float).reshape(-1, 2)
    centres = np.array([(64 + 128 * (k % 3), 64 + 128 * (k // 3)) for k in range(9)], float)
    # a point within 4 µm (16 px at 0.25 µm/px) of the centre of most crops
    found = sum(len(xy) and np.hypot(*(xy - c).T).min() <= 16 for c in centres)
    assert found >= 5, f"points {xy.tolist()}"

    svs = real("wsi/CMU-1-Small-Region.svs")
    out = tmp_path / "cmu"
    assert main(["predict", str(svs), "--model", "mitosis-fcn", "--out", str(out),
                 "--roi", "800,1200,400,400"]) == 0  # fmt: skip
    summary = json.loads(next(out.glob("*/summary.json")).read_text(encoding="utf-8"))
    assert summary["complete"] and "mitoses" in summary["objects"]
    # the tile classifier through the engine: per-tile classes and a vote over the region
    out = tmp_path / "cmu_convnet"
    assert main(["predict", str(svs), "--model", "mitosis-convnet", "--out", str(out),
                 "--roi", "800,1200,200,200"]) == 0  # fmt: skip
    summary = json.loads(next(out.glob("*/summary.json")).read_text(encoding="utf-8"))
    vote = summary["aggregates"]["mitosis tiles"]
    assert vote["n_tiles"] > 0 and vote["class"] == "no mitosis"
    assert vote["scores"]["mitosis"] < 0.2  # skin stroma: few tiles called mitosis
