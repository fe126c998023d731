"""Uncertainty maps (entropy, MC-dropout) and the ranked region queue, on runs written by
the real engine with tiny models, checked against numpy oracles."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_histo_ai.errors import ModelInputError, RunStateError
from napari_histo_ai.inference.engine import RunConfig, run_model_sync
from napari_histo_ai.inference.tissue import TissueMask
from napari_histo_ai.inference.uncertainty import (
    MC_OUTPUT,
    MCDropoutPredictor,
    Region,
    entropy_map,
    iter_rank_regions,
    mc_dropout_map,
    mc_dropout_run,
    rank_regions,
    uncertainty_map,
)
from napari_histo_ai.models.architectures.tiny import TinyClassifier, TinyFCN
from napari_histo_ai.models.loading import TorchPredictor, load_model
from napari_histo_ai.models.spec import ModelSpec

from .test_inference_engine import make_pyramid

torch.set_num_threads(1)

MPP = 0.5
#: planted uncertain square (level-0 px): one 64 px region (32 µm at 0.5 µm/px)
SQUARE = (320, 192, 64, 64)


def spec_of(
    *,
    activation: str,
    channels: list[int],
    dense: bool = True,
    architecture: str = "tiny_fcn",
    kwargs: dict | None = None,
    patch: int = 64,
    halo: int = 0,
    overlap: int = 0,
    name: str = "tiny-net",
) -> ModelSpec:
    kind = "probability" if dense else "class"
    return ModelSpec.from_dict(
        {
            "name": name,
            "task": "test",
            "version": "1",
            "format": "builtin",
            "architecture": architecture,
            "kwargs": kwargs or {},
            "dense": dense,
            "activation": activation,
            "io": {
                "patch_size": patch,
                "halo": halo,
                "overlap": overlap,
                "mpp": MPP,
                "normalisation": {"method": "none"},
            },
            "outputs": [{"name": "p", "kind": kind, "channels": channels}],
        },
        source="test",
    )


def threshold_net() -> TinyFCN:
    """1x1 net: logit = 20 * (mean(x) - 0.5): 0 -> p ~ 0, 1 -> p ~ 1, 0.5 -> p = 0.5."""
    net = TinyFCN(3, 1, depth=0)
    with torch.no_grad():
        net.body[0].weight.fill_(20.0 / 3)
        net.body[0].bias.fill_(-10.0)
    return net


def planted_image() -> np.ndarray:
    """Left half 0, right half 1 (confident), the planted square 0.5 (unsure)."""
    img = np.zeros((600, 560, 3), np.float32)
    img[:, 280:] = 1.0
    t, left, h, w = SQUARE
    img[t : t + h, left : left + w] = 0.5
    return img


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory) -> Path:
    spec = spec_of(activation="sigmoid", channels=[0])
    out = tmp_path_factory.mktemp("sig") / "run.zarr"
    run_model_sync(
        make_pyramid(planted_image(), mpp=MPP),
        TorchPredictor(threshold_net(), spec, torch.device("cpu")),
        out,
        config=RunConfig(tissue=False, fill_value=0, batch_size=16),
    )
    return out


def binary_oracle(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-300, 1.0)
    r = np.clip(1.0 - p, 1e-300, 1.0)
    h = -(np.where(p > 0, p * np.log(q), 0.0) + np.where(p < 1, (1 - p) * np.log(r), 0.0))
    return h / np.log(2.0)


def shannon_oracle(p: np.ndarray) -> np.ndarray:
    """Normalised entropy over axis 0 of (renormalised) probabilities."""
    q = p / p.sum(axis=0, keepdims=True)
    terms = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return -terms.sum(axis=0) / np.log(p.shape[0])


def stored(run: Path, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_group(str(run), mode="r")["probability"][str(level)]) / 255.0


# -- entropy --------------------------------------------------------------------------------


def test_sigmoid_entropy_matches_the_numpy_oracle_at_every_level(sigmoid_run: Path) -> None:
    umap = entropy_map(sigmoid_run)
    assert umap.method == "entropy" and len(umap.levels) >= 2  # a multiscale map
    for k, lv in enumerate(umap.levels):
        got = lv.compute()
        np.testing.assert_allclose(got, binary_oracle(stored(sigmoid_run, k)[0]), atol=1e-5)
    level0 = umap.levels[0].compute()
    t, left, h, w = SQUARE
    assert level0[t : t + h, left : left + w].min() > 0.99  # p = 0.5: one full bit
    assert level0[:, :100].max() < 0.01  # confident background
    assert (
        umap.levels[0].chunksize[-1]
        == zarr.open_group(str(sigmoid_run))["probability"]["0"].chunks[-1]
    )  # lazily, chunk by chunk like the stored probabilities


def test_softmax_entropy_is_normalised_shannon_entropy(tmp_path: Path) -> None:
    spec = spec_of(activation="softmax", channels=[0, 1, 2], halo=4, overlap=8)
    img = np.random.default_rng(1).random((150, 130, 3)).astype(np.float32) * 4
    net = TinyFCN(3, 3, width=4, depth=2, seed=3)
    with torch.no_grad():  # sharp logits: from confident to uniform
        net.body[-1].weight.mul_(20.0)
    out = tmp_path / "soft.zarr"
    run_model_sync(
        make_pyramid(img, mpp=MPP),
        TorchPredictor(net, spec, torch.device("cpu")),
        out,
        config=RunConfig(tissue=False, fill_value=0, batch_size=8),
    )
    got = entropy_map(out).levels[0].compute()
    oracle = shannon_oracle(stored(out))
    np.testing.assert_allclose(got, oracle, atol=1e-5)
    assert np.nanmin(got) >= 0.0 and np.nanmax(got) <= 1.0
    assert np.ptp(oracle) > 0.05  # the oracle is not a constant


def test_unfinished_cells_are_nan(tmp_path: Path) -> None:
    spec = spec_of(activation="sigmoid", channels=[0])
    out = tmp_path / "roi.zarr"
    run_model_sync(
        make_pyramid(planted_image(), mpp=MPP),
        TorchPredictor(threshold_net(), spec, torch.device("cpu")),
        out,
        config=RunConfig(tissue=False, fill_value=0, roi=(0, 0, 100, 100)),
    )
    got = entropy_map(out).levels[0].compute()
    assert np.isfinite(got[:64, :64]).all()  # the region's cells were computed
    assert np.isnan(got[300:, 300:]).all()  # never computed: NaN, not 0
    # ranking ignores them
    regions = rank_regions(entropy_map(out), region_um=32, top_k=None)
    assert regions and all(r.top < 128 and r.left < 128 for r in regions)


def test_tile_model_entropy_per_tile_with_nan_for_tiles_not_computed(tmp_path: Path) -> None:
    spec = spec_of(activation="softmax", channels=[0, 1], dense=False, patch=32)
    img = np.random.default_rng(2).random((160, 128, 3)).astype(np.float32)
    out = tmp_path / "tiles.zarr"
    run_model_sync(
        make_pyramid(img, mpp=MPP),
        TorchPredictor(TinyClassifier(3, 2, width=4), spec, torch.device("cpu")),
        out,
        config=RunConfig(tissue=False, fill_value=0, roi=(0, 0, 64, 128)),
    )
    tiles = np.asarray(zarr.open_group(str(out))["tiles"]["0"])
    umap = entropy_map(out)
    got = umap.levels[0].compute()
    assert got.shape == tiles.shape[1:]
    done = ~np.isnan(tiles).any(axis=0)
    assert done.any() and not done.all()
    np.testing.assert_allclose(got[done], shannon_oracle(tiles[:, done]), atol=1e-6)
    assert np.isnan(got[~done]).all()


def test_entropy_of_something_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunStateError, match="not a run folder"):
        entropy_map(tmp_path)


# -- ranking ----------------------------------------------------------------------------------


def test_the_planted_square_ranks_first(sigmoid_run: Path) -> None:
    umap = uncertainty_map(sigmoid_run)
    regions = rank_regions(umap, region_um=32.0, top_k=5)  # 64 px at 0.5 µm/px
    first = regions[0]
    assert (first.top, first.left, first.height, first.width) == SQUARE
    assert first.rank == 1 and first.score > 0.99
    assert [r.rank for r in regions] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in itertools.pairwise(regions))
    # the region is reported in µm too
    assert first.to_dict(umap.image_mpp)["top_um"] == pytest.approx(SQUARE[0] * MPP)


def test_a_tissue_mask_keeps_background_out(sigmoid_run: Path) -> None:
    umap = entropy_map(sigmoid_run)
    mask = np.ones((60, 56), bool)
    mask[32:39, 19:26] = False  # the planted square (10 level-0 px per mask px)
    tissue = TissueMask(mask, (10.0, 10.0), "test")
    regions = rank_regions(umap, region_um=32.0, top_k=3, tissue=tissue, min_tissue=0.9)
    assert all((r.top, r.left) != SQUARE[:2] for r in regions)


def test_ranking_a_coarse_level(sigmoid_run: Path) -> None:
    umap = entropy_map(sigmoid_run)
    (first,) = rank_regions(umap, region_um=32.0, top_k=1, level=1)
    assert (first.top, first.left) == SQUARE[:2]


@settings(max_examples=30, deadline=None)
@given(
    a=st.integers(0, 4),
    b=st.integers(0, 5),
    value=st.floats(0.3, 1.0),
    quantile=st.sampled_from([None, 0.5, 0.9]),
)
def test_ranking_an_array_finds_the_planted_square_and_breaks_ties_stably(
    a: int, b: int, value: float, quantile: float | None
) -> None:
    arr = np.full((5 * 32 - 7, 6 * 32), 0.1, np.float32)  # last region row is cut short
    arr[a * 32 : (a + 1) * 32, b * 32 : (b + 1) * 32] = value
    regions = rank_regions(arr, region_um=32, top_k=None, quantile=quantile)
    assert (regions[0].top, regions[0].left) == (a * 32, b * 32)
    assert regions[0].score == pytest.approx(value)
    rest = [(r.top, r.left) for r in regions[1:]]
    assert rest == sorted(rest)  # equal scores: row-major order
    assert regions[-1].top + regions[-1].height <= arr.shape[0]


def test_mean_and_quantile_scores() -> None:
    arr = np.zeros((64, 64), np.float32)
    arr[:32, :32][:8] = 1.0  # a quarter of the region's rows unsure
    arr[32:, 32:] = 0.3  # uniformly a little unsure
    by_mean = rank_regions(arr, region_um=32, top_k=2, quantile=None)
    by_q90 = rank_regions(arr, region_um=32, top_k=2, quantile=0.9)
    assert (by_mean[0].top, by_mean[0].left) == (32, 32)  # 0.3 > 0.25
    assert by_mean[1].score == pytest.approx(0.25)
    assert (by_q90[0].top, by_q90[0].left) == (0, 0)  # a quarter unsure: q0.9 = 1


def test_ranking_is_a_generator_with_progress_and_cancel(sigmoid_run: Path) -> None:
    import threading

    umap = entropy_map(sigmoid_run)
    gen = iter_rank_regions(umap, region_um=32.0)
    records = []
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            ranking = stop.value
            break
    assert records and records[-1].done == records[-1].total
    assert ranking.complete and ranking.level == 0 and ranking.statistic == "q0.9"
    cancel = threading.Event()
    cancel.set()
    gen = iter_rank_regions(umap, region_um=32.0, cancel=cancel)
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert not stop.value.value.complete and stop.value.value.regions == []


def test_bad_ranking_arguments() -> None:
    with pytest.raises(ModelInputError, match="region_um"):
        rank_regions(np.zeros((8, 8)), region_um=0)
    with pytest.raises(ModelInputError, match="min_tissue"):
        rank_regions(np.zeros((8, 8)), region_um=4, min_tissue=2)


def test_region_round_trips_through_a_dict() -> None:
    r = Region(3, 10, 20, 30, 40, 0.5, (2,), 0.75)
    assert Region.from_dict(json.loads(json.dumps(r.to_dict((0.25, 0.25))))) == r


# -- MC-dropout -------------------------------------------------------------------------------


def dropout_spec() -> ModelSpec:
    return spec_of(
        activation="sigmoid",
        channels=[0],
        architecture="mitosis_fcn",
        kwargs={"filters": [4, 8], "dense": 8, "dropout": 0.3, "out_channels": 1},
        patch=64,
        halo=8,
        overlap=8,
        name="tiny-dropout",
    )


def test_mc_dropout_variance_through_the_engine(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):  # a fixed initialisation, global RNG kept
        torch.manual_seed(0)
        predictor = load_model(dropout_spec(), device="cpu")
    with torch.no_grad():  # logits that depend strongly on the dropped channels
        predictor.module.score_dense.weight.mul_(30.0)
    img = np.random.default_rng(4).random((120, 100, 3)).astype(np.float32)
    out = tmp_path / "mc.zarr"
    gen = mc_dropout_run(
        make_pyramid(img, mpp=MPP),
        predictor,
        out,
        passes=6,
        config=RunConfig(tissue=False, fill_value=0, batch_size=4),
    )
    n_progress = 0
    while True:
        try:
            next(gen)
            n_progress += 1
        except StopIteration as stop:
            result = stop.value
            break
    assert result.complete and n_progress >= 2
    assert result.spec.name == "tiny-dropout-mc6"
    assert [o.name for o in result.spec.outputs] == ["mean", MC_OUTPUT]
    umap = uncertainty_map(out)
    assert umap.method == "mc-dropout"
    u = umap.levels[0].compute()
    assert np.isfinite(u).all() and u.max() > 0.01 and u.min() >= 0
    # the stored mean is the average of the dropout passes: between their extremes
    mean = stored(out)[0]
    assert 0 < mean.mean() < 1
    # dropout is off again afterwards: the plain predictor is deterministic
    x = torch.from_numpy(np.moveaxis(img[:64, :64], -1, 0)[None].copy())
    np.testing.assert_array_equal(predictor(x).numpy(), predictor(x).numpy())
    # and the MC-dropout wrapper is reproducible (seeded)
    wrapped = MCDropoutPredictor(predictor, passes=3, seed=1)
    np.testing.assert_array_equal(wrapped(x).numpy(), wrapped(x).numpy())
    assert wrapped(x)[:, 1].max() > 0  # variance > 0
    # resume: nothing left to do, same map
    again = mc_dropout_run(
        make_pyramid(img, mpp=MPP),
        predictor,
        out,
        passes=6,
        config=RunConfig(tissue=False, fill_value=0, batch_size=4),
    )
    while True:
        try:
            next(again)
        except StopIteration as stop:
            assert stop.value.tiles_done == result.tiles_done
            break
    np.testing.assert_array_equal(mc_dropout_map(out).levels[0].compute(), u)


def test_mc_dropout_refuses_a_model_without_dropout() -> None:
    spec = spec_of(activation="sigmoid", channels=[0], name="no-dropout-net")
    predictor = TorchPredictor(TinyFCN(3, 1), spec, torch.device("cpu"))
    with pytest.raises(ModelInputError, match=r"'no-dropout-net' has no dropout.*entropy"):
        MCDropoutPredictor(predictor)


def test_mc_dropout_map_of_a_plain_run(sigmoid_run: Path) -> None:
    with pytest.raises(RunStateError, match="without MC-dropout"):
        mc_dropout_map(sigmoid_run)


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_ranks_a_run_of_the_sample_slide_and_writes_importable_geojson(
    tmp_path: Path, capsys
) -> None:
    from napari_histo_ai._napari.sample import sample_path
    from napari_histo_ai.cli import main
    from napari_histo_ai.io import open_image

    slide = sample_path()
    spec = spec_of(activation="sigmoid", channels=[0], halo=4, overlap=8)
    spec = ModelSpec.from_dict({**spec.to_dict(), "io": {**spec.to_dict()["io"], "mpp": 8.0}})
    net = TinyFCN(3, 1, width=4, depth=2, seed=5)
    run = tmp_path / "slide.zarr"
    pyramid = open_image(slide)
    try:
        run_model_sync(pyramid, TorchPredictor(net, spec, torch.device("cpu")), run)
    finally:
        pyramid.close()
    geo = tmp_path / "queue.geojson"
    code = main(
        [
            "uncertainty",
            str(run),
            "--top",
            "5",
            "--region-um",
            "256",
            "--geojson",
            str(geo),
            "--json-out",
            str(tmp_path / "q.json"),
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["method"] == "entropy" and len(out["regions"]) == 5
    first = out["regions"][0]
    assert first["rank"] == 1 and first["width_um"] == pytest.approx(first["width_px"] * 0.499)
    assert json.loads((tmp_path / "q.json").read_text()) == out
    features = json.loads(geo.read_text())["features"]
    assert len(features) == 5 and features[0]["geometry"]["type"] == "Polygon"
    store = tmp_path / "slide.sqlite"
    code = main(["import", str(geo), "--image", str(slide), "--store", str(store)])
    imported = json.loads(capsys.readouterr().out)
    assert code == 0 and imported["imported"] == 5 and imported["by_kind"] == {"box": 5}


def test_cli_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    from napari_histo_ai.cli import main

    assert main(["uncertainty", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


# -- layers -------------------------------------------------------------------------------------


def test_layers_sit_where_the_probability_layer_sits(sigmoid_run: Path) -> None:
    from napari_histo_ai._napari.results import run_folder_layers
    from napari_histo_ai._napari.uncertainty import regions_layer, uncertainty_layer

    (prob,) = run_folder_layers(sigmoid_run)
    umap = entropy_map(sigmoid_run)
    data, kwargs, kind = uncertainty_layer(umap, image="memory.tif")
    assert kind == "image" and kwargs["name"] == "memory.tif · tiny-net · uncertainty"
    assert kwargs["scale"] == prob[1]["scale"] and kwargs["translate"] == prob[1]["translate"]
    assert [lv.shape for lv in data] == [lv.shape for lv in prob[0]]  # same pyramid
    np.testing.assert_allclose(data[0].compute(), umap.levels[0].compute())
    regions = rank_regions(umap, region_um=32.0, top_k=2)
    rects, skw, skind = regions_layer(regions, umap, image="memory.tif")
    assert skind == "shapes" and skw["name"] == "memory.tif · tiny-net · review queue"
    # rectangle corners (level-0 px) land on the region in world µm like the map's pixels
    world = rects[0] * np.asarray(skw["scale"]) + np.asarray(skw["translate"])
    t, left, h, w = SQUARE
    np.testing.assert_allclose(world.min(axis=0), [(t - 0.5) * MPP, (left - 0.5) * MPP])
    np.testing.assert_allclose(world.max(axis=0), [(t + h - 0.5) * MPP, (left + w - 0.5) * MPP])
    # map pixel (t, left)'s centre is half a pixel inside the rectangle's corner
    centre = np.asarray(kwargs["translate"]) + np.asarray([t, left]) * np.asarray(kwargs["scale"])
    np.testing.assert_allclose(centre - world.min(axis=0), [0.5 * MPP, 0.5 * MPP])
    assert list(skw["features"]["rank"]) == [1, 2]
    assert skw["metadata"]["regions"][0]["top_px"] == t


def test_mc_dropout_of_the_shipped_tile_model_on_the_sample_slide(tmp_path: Path) -> None:
    """mitosis-convnet (dropout 0.5, softmax over 2 classes): one uncertainty per tile."""
    from napari_histo_ai._napari.sample import sample_path
    from napari_histo_ai.io import open_image
    from napari_histo_ai.models.registry import load_registry

    predictor = load_model(load_registry().get("mitosis-convnet"), device="cpu")
    pyramid = open_image(sample_path())
    out = tmp_path / "mc.zarr"
    try:
        gen = mc_dropout_run(
            pyramid, predictor, out, passes=4, config=RunConfig(roi=(1000, 800, 256, 256))
        )
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                assert stop.value.complete
                break
    finally:
        pyramid.close()
    u = mc_dropout_map(out).levels[0].compute()
    tiles = np.asarray(zarr.open_group(str(out))["tiles"]["0"])
    assert tiles.shape[0] == 3  # mean of 2 classes + one uncertainty for the softmax group
    done = np.isfinite(u)
    assert done.any() and not done.all()  # tiles outside the region: NaN
    assert u[done].max() > 0 and u[done].max() <= 1
    np.testing.assert_allclose(tiles[:2, done].sum(axis=0), 1.0, atol=1e-5)  # mean of softmax
