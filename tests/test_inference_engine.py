"""The tiled inference engine: tiling oracle, blending, levels, regions, cancel, resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_histo_ai.errors import ModelInputError, RunStateError
from napari_histo_ai.inference.engine import RunConfig, run_model, run_model_sync
from napari_histo_ai.inference.tiling import DenseGrid, PatchGrid, taper, tile_weights
from napari_histo_ai.io.pyramid import Pyramid
from napari_histo_ai.models.architectures.tiny import TinyFCN
from napari_histo_ai.models.loading import TorchPredictor
from napari_histo_ai.models.spec import ModelSpec


def make_pyramid(
    arr: np.ndarray, *, mpp: float | None = None, n_levels: int = 1, chunk: int = 64
) -> Pyramid:
    """A lazy in-memory pyramid (2x mean levels) over a (H, W[, C]) array."""
    axes = "YXS" if arr.ndim == 3 else "YX"
    levels = [da.from_array(arr, chunks=(chunk, chunk, *arr.shape[2:]))]
    cur = arr
    for _ in range(1, n_levels):
        h, w = cur.shape[0] // 2 * 2, cur.shape[1] // 2 * 2
        c = cur[:h, :w].astype(np.float32)
        cur = (0.25 * (c[::2, ::2] + c[1::2, ::2] + c[::2, 1::2] + c[1::2, 1::2])).astype(arr.dtype)
        levels.append(da.from_array(cur, chunks=(chunk, chunk, *arr.shape[2:])))
    return Pyramid(
        levels, axes, "image", "memory.tif", "test", "test", mpp=(mpp, mpp) if mpp else None
    )


def make_spec(
    *,
    patch: int = 48,
    halo: int = 4,
    overlap: int = 8,
    stride: int = 1,
    mpp: float | None = None,
    channels: int = 3,
    outputs: list[dict] | None = None,
    dense: bool = True,
    activation: str = "none",
) -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": "test-net",
            "task": "test",
            "version": "1",
            "format": "builtin",
            "architecture": "tiny_fcn",
            "dense": dense,
            "activation": activation,
            "io": {
                "patch_size": patch,
                "halo": halo,
                "overlap": overlap,
                "output_stride": stride,
                "mpp": mpp,
                "channels": channels,
                "normalisation": {"method": "none"},
            },
            "outputs": outputs or [{"name": "p", "kind": "probability", "channels": [0, 1]}],
        }
    )


def whole_oracle(net: torch.nn.Module, img: np.ndarray, pad: int) -> np.ndarray:
    """Whole-image inference on the image padded with the engine's fill value (0)."""
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    with torch.no_grad():
        out = net(torch.from_numpy(padded).permute(2, 0, 1)[None].float())[0].numpy()
    return out


def probability(run: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(run), mode="r")["probability"]["0"]) / 255.0


# -- geometry ----------------------------------------------------------------------------


@given(overlap=st.integers(1, 40))
def test_taper_is_a_partition_of_unity(overlap: int) -> None:
    up = taper(overlap)
    np.testing.assert_allclose(up + up[::-1], 1.0, atol=1e-6)
    assert np.all(np.diff(up) > 0)


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    kept=st.integers(8, 80),
    overlap_frac=st.floats(0, 0.5),
    halo=st.integers(0, 6),
)
def test_blending_weights_sum_to_one_everywhere(
    height: int, width: int, kept: int, overlap_frac: float, halo: int
) -> None:
    overlap = int(kept * overlap_frac)
    grid = DenseGrid(height, width, kept + 2 * halo, halo, overlap)
    w = grid.weights()
    total = np.zeros((height + 2 * kept, width + 2 * kept))
    nr, nc = grid.n_tiles
    for i in range(nr):
        for j in range(nc):
            y, x = grid.kept_origin(i, j)
            total[y + kept : y + kept + grid.kept, x + kept : x + kept + grid.kept] += w
    np.testing.assert_allclose(total[kept : kept + height, kept : kept + width], 1.0, atol=1e-5)
    # every cell's contributing tiles are exactly those that claim it
    for i in range(nr):
        for j in range(nc):
            for cell in grid.cells_of_tile(i, j):
                assert (i, j) in grid.tiles_of_cell(*cell)


def test_tile_weights_without_overlap_are_ones() -> None:
    np.testing.assert_array_equal(tile_weights(16, 0), np.ones(16))


def test_patch_grid_covers_the_image() -> None:
    grid = PatchGrid(100, 50, 32, overlap=16)
    nr, nc = grid.n_tiles
    assert grid.input_origin(nr - 1, nc - 1)[0] + 32 >= 100
    assert grid.input_origin(nr - 1, nc - 1)[1] + 32 >= 50
    assert (nr, nc) == (6, 3)


# -- tiled == whole ------------------------------------------------------------------------


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    height=st.integers(5, 140),
    width=st.integers(5, 140),
    kept=st.sampled_from([8, 16, 24, 40]),
    overlap_frac=st.sampled_from([0.0, 0.25, 0.5]),
    stride=st.sampled_from([1, 2]),
    depth=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_tiled_inference_equals_whole_image_inference(
    tmp_path_factory: pytest.TempPathFactory,
    height: int,
    width: int,
    kept: int,
    overlap_frac: float,
    stride: int,
    depth: int,
    seed: int,
) -> None:
    overlap = int(kept * overlap_frac) // stride * stride
    halo = -(-depth // stride) * stride  # receptive radius, rounded up to the stride
    patch = kept + 2 * halo
    spec = make_spec(patch=patch, halo=halo, overlap=overlap, stride=stride)
    net = TinyFCN(3, 2, width=4, depth=depth, stride=stride, seed=seed)
    img = np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)
    out = tmp_path_factory.mktemp("run") / "run.zarr"
    result = run_model_sync(
        make_pyramid(img),
        TorchPredictor(net, spec, torch.device("cpu")),
        out,
        config=RunConfig(tissue=False, fill_value=0, batch_size=3),
    )
    assert result.complete
    pad = patch  # the oracle sees the same zero fill beyond the image as the tiles
    oracle = whole_oracle(net, img, pad)[:, pad // stride :, pad // stride :]
    got = probability(out)
    oh, ow = got.shape[1:]
    expected = np.clip(oracle[:, :oh, :ow], 0, 1)
    np.testing.assert_allclose(got, expected, atol=0.5 / 255 + 1e-5)


# -- resolution ----------------------------------------------------------------------------


def test_level_is_chosen_by_mpp_and_outputs_land_at_physical_scale(tmp_path: Path) -> None:
    img = np.full((256, 256, 3), 200, dtype=np.uint8)
    pyramid = make_pyramid(img, mpp=0.25, n_levels=3)  # 0.25, 0.5, 1.0 µm/px
    net = TinyFCN(3, 1, width=2, depth=1)
    cases = {0.5: (1, 1.0), 0.7: (1, 1.4), 0.2: (0, 0.8), 1.0: (2, 1.0), 4.0: (2, 4.0)}
    for mpp, (level, factor) in cases.items():
        spec = make_spec(
            patch=32, halo=2, overlap=4, mpp=mpp, outputs=[{"name": "p", "kind": "probability"}]
        )
        result = run_model_sync(
            pyramid,
            TorchPredictor(net, spec, torch.device("cpu")),
            tmp_path / f"run{mpp}.zarr",
            config=RunConfig(tissue=False),
        )
        s = result.summary
        assert s["level"] == level, mpp
        assert s["resample_factor"] == pytest.approx([factor, factor], rel=1e-6)
        # an output pixel is one model pixel: mpp µm, wherever it was read from
        assert s["scale"] == pytest.approx([mpp, mpp])
        assert s["unit"] == "um"
        geo = result.geometry["p"]
        # centre of output pixel 0 = centre of the first model pixel, in µm
        assert geo.translate[0] == pytest.approx(mpp / 2 - 0.25 / 2)


def test_missing_mpp_is_a_clear_error(tmp_path: Path) -> None:
    spec = make_spec(mpp=0.5)
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), spec, torch.device("cpu"))
    with pytest.raises(ModelInputError, match=r"no pixel size.*--mpp"):
        run_model_sync(make_pyramid(np.zeros((64, 64, 3), np.uint8)), pred, tmp_path / "r.zarr")
    # with an explicit mpp it runs
    result = run_model_sync(
        make_pyramid(np.zeros((64, 64, 3), np.uint8)),
        pred,
        tmp_path / "r.zarr",
        config=RunConfig(mpp=0.5, tissue=False),
    )
    assert result.complete and result.summary["image_mpp"] == [0.5, 0.5]


def test_channels_that_do_not_fit_are_a_clear_error(tmp_path: Path) -> None:
    spec = make_spec()
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), spec, torch.device("cpu"))
    grey = make_pyramid(np.zeros((64, 64), np.uint8))
    with pytest.raises(ModelInputError, match=r"expects 3-channel input.*1 channel"):
        run_model_sync(grey, pred, tmp_path / "r.zarr", config=RunConfig(tissue=False))


def test_model_whose_layers_do_not_fit_the_spec_is_refused(tmp_path: Path) -> None:
    spec = make_spec(channels=3)
    pred = TorchPredictor(TinyFCN(1, 2, depth=1), spec, torch.device("cpu"))
    with pytest.raises(ModelInputError, match="test-net"):
        run_model_sync(make_pyramid(np.zeros((64, 64, 3), np.float32)), pred, tmp_path / "r.zarr")


# -- regions and tissue ----------------------------------------------------------------------


def half_tissue(size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(1)
    img = np.full((size, size, 3), 245, dtype=np.uint8)
    img[:, : size // 2] = rng.integers(60, 160, (size, size // 2, 3), dtype=np.uint8)
    return img


def test_background_tiles_are_skipped(tmp_path: Path) -> None:
    spec = make_spec(patch=40, halo=4, overlap=8)
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), spec, torch.device("cpu"))
    pyramid = make_pyramid(half_tissue())
    full = run_model_sync(pyramid, pred, tmp_path / "all.zarr", config=RunConfig(tissue=False))
    part = run_model_sync(pyramid, pred, tmp_path / "tissue.zarr", config=RunConfig(tissue=True))
    assert part.tiles_skipped > 0
    assert part.tiles_total + part.tiles_skipped == full.tiles_total
    a, b = probability(tmp_path / "all.zarr"), probability(tmp_path / "tissue.zarr")
    # tissue side identical; far background side never computed (fill 0)
    np.testing.assert_allclose(a[:, :, :80], b[:, :, :80], atol=1 / 255)
    assert not b[:, :, 150:].any()


def test_roi_and_polygon_limit_the_tiles(tmp_path: Path) -> None:
    spec = make_spec(patch=40, halo=4, overlap=8)
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), spec, torch.device("cpu"))
    pyramid = make_pyramid(np.random.default_rng(0).random((192, 192, 3)).astype(np.float32))
    full = run_model_sync(pyramid, pred, tmp_path / "all.zarr", config=RunConfig(tissue=False))
    roi = run_model_sync(
        pyramid, pred, tmp_path / "roi.zarr", config=RunConfig(tissue=False, roi=(0, 0, 50, 50))
    )
    assert roi.tiles_total < full.tiles_total / 4
    a, b = probability(tmp_path / "all.zarr"), probability(tmp_path / "roi.zarr")
    np.testing.assert_allclose(a[:, :40, :40], b[:, :40, :40], atol=1 / 255)
    assert not b[:, 120:, 120:].any()
    tri = ((150.0, 150.0), (190.0, 150.0), (190.0, 190.0))
    poly = run_model_sync(
        pyramid, pred, tmp_path / "poly.zarr", config=RunConfig(tissue=False, polygon=tri)
    )
    assert 0 < poly.tiles_total < full.tiles_total / 4
    with pytest.raises(ModelInputError, match="outside the image"):
        run_model_sync(
            pyramid, pred, tmp_path / "bad.zarr", config=RunConfig(roi=(500, 500, 10, 10))
        )


def test_viewport_tiles_run_first(tmp_path: Path) -> None:
    spec = make_spec(patch=40, halo=4, overlap=8)
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), spec, torch.device("cpu"))
    pyramid = make_pyramid(np.random.default_rng(0).random((256, 256, 3)).astype(np.float32))
    cancel = threading.Event()
    gen = run_model(
        pyramid,
        pred,
        tmp_path / "v.zarr",
        config=RunConfig(tissue=False, batch_size=9, priority=(200, 200, 40, 40)),
        cancel=cancel,
    )
    next(gen)  # the plan
    next(gen)  # one batch
    cancel.set()
    with pytest.raises(StopIteration):
        while True:
            next(gen)
    done = np.load(tmp_path / "v.zarr" / "progress.npz")["cells_done"]
    rows, cols = np.nonzero(done)
    assert len(rows) and rows.min() >= 4 and cols.min() >= 4  # bottom-right first


# -- cancel and resume -----------------------------------------------------------------------


def test_cancel_leaves_a_consistent_partial_result_that_resumes(tmp_path: Path) -> None:
    spec = make_spec(patch=40, halo=4, overlap=8)
    pred = TorchPredictor(TinyFCN(3, 2, depth=2), spec, torch.device("cpu"))
    pyramid = make_pyramid(np.random.default_rng(2).random((200, 230, 3)).astype(np.float32))
    config = RunConfig(tissue=False, batch_size=5)
    reference = run_model_sync(pyramid, pred, tmp_path / "ref.zarr", config=config)
    cancel = threading.Event()
    seen = []

    def stop_after_two(progress: object) -> None:
        seen.append(progress)
        if len(seen) == 6:
            cancel.set()

    out = tmp_path / "run.zarr"
    partial = run_model_sync(
        pyramid, pred, out, config=config, cancel=cancel, on_progress=stop_after_two
    )
    assert partial.cancelled and not partial.complete
    assert 0 < partial.tiles_done < partial.tiles_total
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cancelled"] is True
    ref, got = probability(tmp_path / "ref.zarr"), probability(out)
    written = got.any(axis=0)
    assert written.any() and not written.all()
    # whatever is on disk is final: equal to the uninterrupted run
    np.testing.assert_array_equal(got[:, written], ref[:, written])
    resumed = run_model_sync(pyramid, pred, out, config=config)
    assert resumed.complete
    assert resumed.summary["tiles_done"] == reference.tiles_total
    np.testing.assert_array_equal(probability(out), ref)


def test_an_abandoned_generator_resumes_too(tmp_path: Path) -> None:
    spec = make_spec(patch=40, halo=4, overlap=8)
    pred = TorchPredictor(TinyFCN(3, 2, depth=2), spec, torch.device("cpu"))
    pyramid = make_pyramid(np.random.default_rng(3).random((160, 160, 3)).astype(np.float32))
    config = RunConfig(tissue=False, batch_size=3)
    ref = run_model_sync(pyramid, pred, tmp_path / "ref.zarr", config=config)
    gen = run_model(pyramid, pred, tmp_path / "run.zarr", config=config)
    for _ in range(4):
        next(gen)
    gen.close()  # a killed worker: no summary, progress saved
    result = run_model_sync(pyramid, pred, tmp_path / "run.zarr", config=config)
    assert result.complete and result.tiles_total == ref.tiles_total
    np.testing.assert_array_equal(
        probability(tmp_path / "run.zarr"), probability(tmp_path / "ref.zarr")
    )


def test_a_different_model_starts_again_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    pyramid = make_pyramid(np.random.default_rng(0).random((64, 64, 3)).astype(np.float32))
    out = tmp_path / "run.zarr"
    spec1 = make_spec(patch=40, halo=4, overlap=8)
    spec2 = make_spec(patch=32, halo=4, overlap=8)
    run_model_sync(pyramid, TorchPredictor(TinyFCN(3, 2, depth=1), spec1, torch.device("cpu")), out)
    r2 = run_model_sync(
        pyramid, TorchPredictor(TinyFCN(3, 2, depth=1), spec2, torch.device("cpu")), out
    )
    assert r2.complete and r2.summary["tiles_done"] == r2.tiles_total
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(RunStateError, match="not a napari-histo-ai run"):
        run_model_sync(
            pyramid, TorchPredictor(TinyFCN(3, 2, depth=1), spec1, torch.device("cpu")), foreign
        )
    assert (foreign / "holiday.jpg").exists()


# -- objects and tile outputs -----------------------------------------------------------------


class BlobNet(torch.nn.Module):
    """Probability = darkness of the input (1 - mean RGB); box sizes constant 6 x 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = 1.0 - x.mean(dim=1, keepdim=True)
        return torch.cat([p, torch.full_like(p, 6.0), torch.full_like(p, 10.0)], dim=1)


def blobs(centres: list[tuple[int, int]], shape: tuple[int, int] = (160, 200)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dark = np.zeros(shape)
    for cy, cx in centres:
        dark = np.maximum(dark, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2)))
    return np.repeat((1.0 - dark)[..., None], 3, axis=2).astype(np.float32)


def test_points_and_boxes_are_found_across_tile_borders(tmp_path: Path) -> None:
    centres = [(20, 20), (31, 31), (32, 100), (90, 63), (150, 190), (5, 150)]
    spec = make_spec(
        patch=40,
        halo=4,
        overlap=8,
        outputs=[
            {
                "name": "centres",
                "kind": "points",
                "channels": [0],
                "threshold": 0.5,
                "min_distance_um": 4,
            },
            {
                "name": "boxes",
                "kind": "boxes",
                "channels": [0],
                "size_channels": [1, 2],
                "threshold": 0.5,
            },
        ],
    )
    result = run_model_sync(
        make_pyramid(blobs(centres)),
        TorchPredictor(BlobNet(), spec, torch.device("cpu")),
        tmp_path / "objects.zarr",
        config=RunConfig(tissue=False, fill_value=1.0, batch_size=4),
    )
    points = result.objects["centres"]
    found = sorted((round(r - 0.5), round(c - 0.5)) for r, c in points.coords)
    assert found == sorted(centres)
    assert np.all(points.scores > 0.9)
    boxes = result.objects["boxes"].coords
    assert len(boxes) == len(centres)
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 6.0)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 10.0)
    geo = json.loads((tmp_path / "objects.zarr" / "centres.geojson").read_text())
    assert len(geo["features"]) == len(centres)
    x, y = geo["features"][0]["geometry"]["coordinates"]
    assert (round(y - 0.5), round(x - 0.5)) in centres


def test_tile_classifier_gives_a_heatmap_and_an_aggregate(tmp_path: Path) -> None:
    class MeanClassifier(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([1 - m, m], dim=1) * 10  # logits: bright = class 1

    img = np.zeros((100, 160, 3), np.float32)
    img[:, 96:] = 1.0
    spec = make_spec(
        patch=32,
        halo=0,
        overlap=0,
        dense=False,
        activation="softmax",
        outputs=[
            {
                "name": "kind",
                "kind": "class",
                "channels": [0, 1],
                "classes": ["dark", "bright"],
                "aggregate": "vote",
            }
        ],
    )
    result = run_model_sync(
        make_pyramid(img),
        TorchPredictor(MeanClassifier(), spec, torch.device("cpu")),
        tmp_path / "cls.zarr",
        config=RunConfig(tissue=False),
    )
    tiles = np.asarray(zarr.open_group(str(tmp_path / "cls.zarr"))["tiles"]["0"])
    assert tiles.shape == (2, 4, 5)
    assert (tiles[1, :, 3:] > 0.99).all() and (tiles[0, :, :3] > 0.99).all()
    agg = result.aggregates["kind"]
    assert agg["class"] == "dark" and agg["n_tiles"] == 20
    assert agg["scores"]["bright"] == pytest.approx(8 / 20)


# -- model formats and stacks -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_onnx_and_torchscript_models_run_through_the_same_engine(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from napari_histo_ai.models.loading import load_model

    net = TinyFCN(3, 2, width=4, depth=2, seed=5).eval()
    x = torch.zeros(1, 3, 40, 40)
    torch.jit.trace(net, x).save(str(tmp_path / "net.pt"))
    torch.onnx.export(
        net,
        (x,),
        str(tmp_path / "net.onnx"),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
    )
    pyramid = make_pyramid(np.random.default_rng(4).random((120, 90, 3)).astype(np.float32))
    config = RunConfig(tissue=False, batch_size=4)
    base = make_spec(patch=40, halo=4, overlap=8)
    ref = run_model_sync(
        pyramid, TorchPredictor(net, base, torch.device("cpu")), tmp_path / "t.zarr", config=config
    )
    for fmt, weights in (("torchscript", "net.pt"), ("onnx", "net.onnx")):
        data = base.to_dict()
        data.update(format=fmt, architecture=None, weights=weights, name=f"net-{fmt}")
        data.pop("source")
        spec = ModelSpec.from_dict(data, base_dir=tmp_path)
        result = run_model_sync(
            pyramid, load_model(spec, device="cpu"), tmp_path / f"{fmt}.zarr", config=config
        )
        assert result.complete and result.tiles_total == ref.tiles_total
        np.testing.assert_allclose(
            probability(tmp_path / f"{fmt}.zarr"), probability(tmp_path / "t.zarr"), atol=1.01 / 255
        )


def test_a_stack_runs_plane_by_plane(tmp_path: Path) -> None:
    vol = np.random.default_rng(6).random((3, 70, 50)).astype(np.float32)
    pyramid = Pyramid(
        [da.from_array(vol, chunks=(1, 32, 32))], "ZYX", "volume", "vol.nii", "test", "test"
    )
    spec = make_spec(
        patch=40, halo=4, overlap=8, channels=1, outputs=[{"name": "p", "kind": "probability"}]
    )
    net = TinyFCN(1, 1, width=4, depth=2, seed=1)
    result = run_model_sync(
        pyramid, TorchPredictor(net, spec, torch.device("cpu")), tmp_path / "v.zarr"
    )
    assert result.complete and result.planes == (3,)
    got = probability(tmp_path / "v.zarr")
    assert got.shape == (1, 3, 70, 50)
    for z in range(3):
        oracle = whole_oracle(net, vol[z][..., None], 40)[:, 40:110, 40:90]
        np.testing.assert_allclose(got[:, z], np.clip(oracle, 0, 1), atol=0.5 / 255 + 1e-5)


def test_out_of_memory_halves_the_batch(tmp_path: Path) -> None:
    """A device that cannot hold a full batch still finishes, with smaller batches."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    spec = make_spec(patch=40, halo=4, overlap=8)
    net = TinyFCN(3, 2, depth=1)
    sizes: list[int] = []

    class Small(TorchPredictor):
        def __call__(self, batch: torch.Tensor) -> torch.Tensor:
            sizes.append(len(batch))
            if len(batch) > 2:
                raise oom("CUDA out of memory (simulated)")
            return super().__call__(batch)

    pyramid = make_pyramid(np.random.default_rng(0).random((100, 100, 3)).astype(np.float32))
    ref = run_model_sync(
        pyramid,
        TorchPredictor(net, spec, torch.device("cpu")),
        tmp_path / "a.zarr",
        config=RunConfig(tissue=False, batch_size=2),
    )
    got = run_model_sync(
        pyramid,
        Small(net, spec, torch.device("cpu")),
        tmp_path / "b.zarr",
        config=RunConfig(tissue=False, batch_size=8),
    )
    assert got.complete and max(sizes) == 8 and 2 in sizes
    np.testing.assert_array_equal(
        probability(tmp_path / "a.zarr"), probability(tmp_path / "b.zarr")
    )
    assert ref.complete


# -- stain normalisation: one source fit per run (paper 000) ------------------------------


def stained_slide(shape: tuple[int, int] = (160, 200), seed: int = 4) -> np.ndarray:
    """Synthetic H&E (Beer–Lambert, io 240): H-rich left half, E-rich right half, a
    background band at the bottom."""
    rng = np.random.default_rng(seed)
    h_od = np.array([0.650, 0.704, 0.286])
    e_od = np.array([0.072, 0.990, 0.105])
    conc = rng.gamma(3.0, 0.3, size=(*shape, 2))
    conc[:, : shape[1] // 2, 1] *= 0.3
    conc[:, shape[1] // 2 :, 0] *= 0.3
    conc[-30:] = 0.0
    od = conc @ np.stack([h_od / np.linalg.norm(h_od), e_od / np.linalg.norm(e_od)])
    return np.clip(np.rint(240 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def stain_spec(fit: str = "slide") -> ModelSpec:
    d = make_spec(patch=48, halo=4, overlap=8).to_dict()
    d["io"]["normalisation"] = {"method": "scale", "scale": 255, "stain": {"fit": fit}}
    d.pop("weights", None)
    return ModelSpec.from_dict(d)


def spy_sources(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    from napari_histo_ai.models import preprocessing

    seen: list[object] = []
    original = preprocessing.macenko_apply

    def spy(rgb: np.ndarray, target: object, **kw: object) -> np.ndarray:
        seen.append(kw.get("source"))
        return original(rgb, target, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(preprocessing, "macenko_apply", spy)
    return seen


def test_one_stain_fit_is_used_for_every_tile_and_kept_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_histo_ai.inference import engine
    from napari_histo_ai.inference.engine import RECORD_KEY

    seen = spy_sources(monkeypatch)
    spec = stain_spec()
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), spec, torch.device("cpu"))
    pyramid = make_pyramid(stained_slide())
    config = RunConfig(tissue=False, batch_size=2)
    out = tmp_path / "run.zarr"
    res = run_model_sync(pyramid, pred, out, config=config)
    info = res.summary["stain_source"]
    assert info["fit"] == "slide" and res.summary["warnings"] == []
    record = dict(zarr.open_group(str(out), mode="r").attrs[RECORD_KEY])
    assert record["stain_source"] == info
    # every tile (H-rich and E-rich ones alike) got the same source fit, the record's
    assert len(seen) == res.tiles_done
    first = seen[0]
    assert first is not None and all(s == first for s in seen)
    assert [list(v) for v in first.stain_matrix] == info["stain_matrix"]  # type: ignore[attr-defined]
    assert len(info["regions"]) >= 2

    # a resumed run uses the saved fit, it does not fit again
    def no_refit(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the stains were fitted again on resume")

    cancel = threading.Event()
    calls = []

    def stop(progress: object) -> None:
        calls.append(progress)
        if len(calls) == 2:
            cancel.set()

    out2 = tmp_path / "partial.zarr"
    partial = run_model_sync(pyramid, pred, out2, config=config, cancel=cancel, on_progress=stop)
    assert partial.cancelled
    monkeypatch.setattr(engine, "_fit_slide_stains", no_refit)
    seen.clear()
    resumed = run_model_sync(pyramid, pred, out2, config=config)
    assert resumed.complete and resumed.summary["stain_source"] == info
    assert seen and all(s == first for s in seen)
    np.testing.assert_array_equal(probability(out2), probability(out))


def test_per_patch_stain_fit_and_fallback_warn_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_sources(monkeypatch)
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), stain_spec("patch"), torch.device("cpu"))
    res = run_model_sync(
        make_pyramid(stained_slide()),
        pred,
        tmp_path / "patch.zarr",
        config=RunConfig(tissue=False),
    )
    assert res.summary["stain_source"] is None and seen and all(s is None for s in seen)
    # a single-stain image cannot be fitted: per-patch, with a warning in the summary
    seen.clear()
    grey = np.full((120, 120, 3), 120, np.uint8)
    pred = TorchPredictor(TinyFCN(3, 2, depth=1), stain_spec(), torch.device("cpu"))
    res = run_model_sync(
        make_pyramid(grey), pred, tmp_path / "grey.zarr", config=RunConfig(tissue=False)
    )
    assert res.complete and res.summary["stain_source"]["fit"] == "patch"
    assert "per-patch" in res.summary["warnings"][0]
    assert seen and all(s is None for s in seen)
