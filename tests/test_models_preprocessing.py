"""Normalisation methods and Macenko stain normalisation on synthetic H&E."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_histo_ai.errors import ModelInputError
from napari_histo_ai.models.preprocessing import macenko_apply, macenko_fit, normalise
from napari_histo_ai.models.spec import Normalisation, StainReference

IO = 240
# Ruifrok & Johnston H and E optical-density vectors, and a second, different staining
RUIFROK_H = (0.650, 0.704, 0.286)
RUIFROK_E = (0.072, 0.990, 0.105)
PALE_H = (0.50, 0.80, 0.33)
PALE_E = (0.15, 0.85, 0.50)


def unit(v: tuple[float, ...] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def synthetic_he(
    h: tuple[float, float, float],
    e: tuple[float, float, float],
    *,
    side: int = 128,
    seed: int = 0,
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """An 8-bit RGB image rendered from known stains (Beer–Lambert, io = 240).

    A quarter of the pixels is background, a quarter pure H, a quarter pure E and a
    quarter a mixture, so both stain directions are extremes of the angle distribution.
    """
    rng = np.random.default_rng(seed)
    n = side * side
    conc = rng.gamma(3.0, 0.3, size=(n, 2)) * np.asarray(scale)
    kind = rng.integers(0, 4, n)
    conc[kind == 0] = 0
    conc[kind == 1, 1] = 0
    conc[kind == 2, 0] = 0
    od = conc @ np.stack([unit(h), unit(e)])
    rgb = IO * np.exp(-od) - 1 + rng.normal(0, 0.5, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(side, side, 3)


def cosine(a: np.ndarray | tuple[float, ...], b: np.ndarray | tuple[float, ...]) -> float:
    return float(unit(a) @ unit(b))


# ----------------------------------------------------------------------------- normalise
@pytest.fixture
def batch() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(2, 6, 5, 3), dtype=np.uint8)


def test_none_and_scale(batch: np.ndarray) -> None:
    out = normalise(batch, Normalisation(method="none"))
    assert out.shape == (2, 3, 6, 5) and out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, batch.transpose(0, 3, 1, 2))
    scaled = normalise(batch, Normalisation(method="scale", scale=255.0))
    np.testing.assert_allclose(scaled, batch.transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)
    assert scaled.min() >= 0 and scaled.max() <= 1
    floats = normalise(batch.astype(np.float64) / 255, Normalisation(method="scale", scale=1))
    np.testing.assert_allclose(floats, scaled, rtol=1e-6)


def test_meanstd(batch: np.ndarray) -> None:
    norm = Normalisation(method="meanstd", mean=(0.1, 0.5, 0.9), std=(0.5, 0.25, 2.0))
    out = normalise(batch, norm)
    x = batch.transpose(0, 3, 1, 2) / 255.0
    for c in range(3):
        want = (x[:, c] - norm.mean[c]) / norm.std[c]
        np.testing.assert_allclose(out[:, c], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelInputError, match="3 mean"):
        normalise(batch[..., :1], norm)


def test_zscore(batch: np.ndarray) -> None:
    out = normalise(batch, Normalisation(method="zscore"))
    np.testing.assert_allclose(out.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(2, 3)), 1, atol=1e-4)
    flat = normalise(np.full((1, 4, 4, 2), 7, np.uint8), Normalisation(method="zscore"))
    assert np.all(flat == 0)  # constant patch: no 0 / 0


def test_normalise_rejects_bad_input(batch: np.ndarray) -> None:
    with pytest.raises(ModelInputError, match=r"\(N, H, W, C\)"):
        normalise(batch[0], Normalisation())
    stain = Normalisation(stain=StainReference())
    with pytest.raises(ModelInputError, match="8-bit RGB"):
        normalise(batch.astype(np.float32), stain)


def test_normalise_with_stain() -> None:
    patches = np.stack([synthetic_he(PALE_H, PALE_E, side=64, seed=s) for s in (0, 1)])
    patches = np.concatenate([patches, np.full((1, 64, 64, 3), 255, np.uint8)])
    out = normalise(patches, Normalisation(method="none", stain=StainReference()))
    assert out.shape == (3, 3, 64, 64)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[2], 255)  # white: unchanged
    expected = macenko_apply(patches[0], StainReference())
    np.testing.assert_array_equal(out[0], expected.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- Macenko
def test_fit_recovers_stains() -> None:
    ref = macenko_fit(synthetic_he(RUIFROK_H, RUIFROK_E))
    h, e = ref.stain_matrix
    assert cosine(h, RUIFROK_H) > 0.995
    assert cosine(e, RUIFROK_E) > 0.995
    assert np.linalg.norm(h) == pytest.approx(1) and np.linalg.norm(e) == pytest.approx(1)
    assert all(c > 0 for c in ref.max_concentrations)
    assert ref.method == "macenko"


def test_fit_orders_h_first_whatever_the_input_order() -> None:
    """H is the stain with the larger red OD, whichever percentile it came from."""
    ref = macenko_fit(synthetic_he(PALE_H, PALE_E, seed=3))
    assert cosine(ref.stain_matrix[0], PALE_H) > 0.99
    assert cosine(ref.stain_matrix[1], PALE_E) > 0.99


def test_apply_maps_to_reference() -> None:
    source = synthetic_he(PALE_H, PALE_E, scale=(0.6, 1.4), seed=2)
    target = macenko_fit(synthetic_he(RUIFROK_H, RUIFROK_E, seed=4))
    out = macenko_apply(source, target)
    assert out.shape == source.shape and out.dtype == np.uint8
    fitted = macenko_fit(out)
    assert cosine(fitted.stain_matrix[0], target.stain_matrix[0]) > 0.99
    assert cosine(fitted.stain_matrix[1], target.stain_matrix[1]) > 0.99
    np.testing.assert_allclose(fitted.max_concentrations, target.max_concentrations, rtol=0.1)
    before = macenko_fit(source)
    assert cosine(before.stain_matrix[0], target.stain_matrix[0]) < 0.99


def test_apply_to_its_own_reference_is_near_identity() -> None:
    image = synthetic_he(RUIFROK_H, RUIFROK_E, seed=5)
    # the fit's percentiles are over tissue pixels: applied with the image's own fit as
    # the source (a quarter of it is background) ...
    ref = macenko_fit(image)
    out = macenko_apply(image, ref, source=ref)
    tissue = (image < 200).any(axis=2)
    diff = np.abs(out.astype(int) - image.astype(int))[tissue]
    assert np.median(diff) <= 2
    # ... and per patch on a patch without background
    patch = full_tissue(seed=7)
    out = macenko_apply(patch, macenko_fit(patch))
    assert np.median(np.abs(out.astype(int) - patch.astype(int))) <= 2


@pytest.mark.parametrize(
    "patch",
    [
        np.full((32, 32, 3), 255, np.uint8),  # white
        np.full((32, 32, 3), 240, np.uint8),  # background at io
        np.zeros((32, 32, 3), np.uint8),  # black: one OD direction only
        np.full((32, 32, 3), (200, 120, 160), np.uint8),  # a single colour
        np.zeros((0, 0, 3), np.uint8),  # empty
    ],
    ids=["white", "background", "black", "flat", "empty"],
)
def test_apply_degenerate_patches_unchanged(patch: np.ndarray) -> None:
    out = macenko_apply(patch, StainReference())
    np.testing.assert_array_equal(out, patch)
    with pytest.raises(ModelInputError, match="cannot estimate"):
        macenko_fit(patch)


def test_apply_sparse_tissue_unchanged() -> None:
    """Fewer than 1 % tissue pixels: returned as is."""
    patch = np.full((100, 100, 3), 250, np.uint8)
    patch[:3, :3] = synthetic_he(RUIFROK_H, RUIFROK_E, side=3)
    np.testing.assert_array_equal(macenko_apply(patch, StainReference()), patch)


def test_apply_single_stain_unchanged() -> None:
    """Haematoxylin only: no second stain to separate, so no made-up eosin."""
    rng = np.random.default_rng(0)
    od = rng.gamma(3.0, 0.3, size=(64 * 64, 1)) * unit(RUIFROK_H)
    rgb = np.clip(np.rint(IO * np.exp(-od) - 1 + rng.normal(0, 0.5, od.shape)), 0, 255)
    patch = rgb.astype(np.uint8).reshape(64, 64, 3)
    np.testing.assert_array_equal(macenko_apply(patch, StainReference()), patch)


def test_no_nan_on_noise() -> None:
    """A NaN cast to uint8 would warn (an error under pytest): none may appear."""
    for seed in range(5):
        noise = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        out = macenko_apply(noise, StainReference())
        assert out.dtype == np.uint8 and out.shape == noise.shape


def test_macenko_rejects_non_rgb() -> None:
    with pytest.raises(ModelInputError, match="8-bit RGB"):
        macenko_apply(np.zeros((8, 8), np.uint8), StainReference())
    with pytest.raises(ModelInputError, match="8-bit RGB"):
        macenko_fit(np.zeros((8, 8, 3), np.float32))


def test_apply_is_fast() -> None:
    patch = synthetic_he(RUIFROK_H, RUIFROK_E, side=256)
    macenko_apply(patch, StainReference())
    start = time.perf_counter()
    for _ in range(5):
        macenko_apply(patch, StainReference())
    per_patch = (time.perf_counter() - start) / 5
    assert per_patch < 0.1  # ~5 ms on one core; generous for a loaded CI machine


def test_whiten_uses_one_mean_and_std_over_all_channels(batch: np.ndarray) -> None:
    out = normalise(batch, Normalisation(method="whiten"))
    for patch in out:
        assert patch.mean() == pytest.approx(0.0, abs=1e-4)
        assert patch.std() == pytest.approx(1.0, abs=1e-3)
    # unlike zscore, the channels keep their relative brightness
    red_bright = np.zeros((1, 8, 8, 3), np.uint8)
    red_bright[..., 0] = 200
    red_bright[..., 1:] = 50
    red_bright[0, 0, 0] = (210, 60, 60)
    w = normalise(red_bright, Normalisation(method="whiten"))
    assert w[0, 0].mean() > 0 > w[0, 1].mean()


def test_clahe_equalises_the_luma_and_keeps_dtype_and_shape() -> None:
    from napari_histo_ai.models.preprocessing import clahe

    rng = np.random.default_rng(3)
    # a low-contrast image: values in 100..140
    grey = (rng.random((64, 96)) * 40 + 100).astype(np.uint8)
    eq = clahe(grey)
    assert eq.dtype == np.uint8 and eq.shape == grey.shape
    assert eq.std() > 2 * grey.std()
    # RGB: hue is kept (a grey image stays grey), only the luma is equalised
    rgb = np.repeat(grey[..., None], 3, axis=2)
    eq_rgb = clahe(rgb)
    assert eq_rgb.shape == rgb.shape
    assert np.abs(eq_rgb.astype(int) - eq_rgb[..., :1].astype(int)).max() <= 1
    # a much higher clip limit allows more contrast (tiles of 32 x 32 px: OpenCV's limit
    # of 1.0 clips bins at 4 counts, 40 at 160, close to plain equalisation)
    rows = np.linspace(110, 130, 256)[:, None] + rng.normal(0, 2, (256, 256))
    smooth = np.clip(rows, 0, 255).astype(np.uint8)
    assert clahe(smooth, clip_limit=40.0).std() > 1.2 * clahe(smooth, clip_limit=1.0).std()
    out = normalise(rgb[None], Normalisation(method="clahe"))
    assert out.shape == (1, 3, 64, 96) and out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ModelInputError, match="8-bit"):
        normalise(rgb[None].astype(np.float32), Normalisation(method="clahe"))
    with pytest.raises(ModelInputError, match="8-bit"):
        clahe(np.zeros((4, 4, 2), np.uint8))


def test_clahe_fields_parse_from_the_registry_format() -> None:
    from napari_histo_ai.errors import ModelSpecError
    from napari_histo_ai.models.spec import ModelSpec

    entry = {
        "name": "m",
        "task": "t",
        "version": "1",
        "format": "builtin",
        "architecture": "tiny_fcn",
        "io": {
            "patch_size": 64,
            "channels": 1,
            "normalisation": {"method": "clahe", "clip_limit": 3.0, "tiles": 4},
        },
        "outputs": [{"name": "p", "kind": "probability"}],
    }
    spec = ModelSpec.from_dict(entry)
    assert spec.io.normalisation.clip_limit == 3.0 and spec.io.normalisation.tiles == 4
    entry["io"]["normalisation"]["tiles"] = 0
    with pytest.raises(ModelSpecError, match="tiles"):
        ModelSpec.from_dict(entry)


# ------------------------------------------------------- Macenko: one source fit per slide
def full_tissue(side: int = 64, seed: int = 5) -> np.ndarray:
    """A patch of tissue pixels only (the background pixels of `synthetic_he` dropped)."""
    img = synthetic_he(RUIFROK_H, RUIFROK_E, side=2 * side, seed=seed).reshape(-1, 3)
    od = -np.log((img.astype(np.float64) + 1) / IO)
    tissue = img[(od >= 0.15).all(axis=1)]
    assert len(tissue) >= side * side
    return np.ascontiguousarray(tissue[: side * side].reshape(side, side, 3))


def test_fixed_source_equals_per_patch_on_a_full_tissue_patch() -> None:
    patch = full_tissue()
    target = macenko_fit(synthetic_he(PALE_H, PALE_E, seed=6))
    source = macenko_fit(patch)
    per_patch = macenko_apply(patch, target).astype(np.int16)
    fixed = macenko_apply(patch, target, source=source).astype(np.int16)
    assert np.abs(per_patch - fixed).max() <= 1
    # it really normalises: the stains of the output are the target's
    out = macenko_fit(macenko_apply(patch, target, source=source))
    assert cosine(out.stain_matrix[0], target.stain_matrix[0]) > 0.99
    # and normalise passes the source through
    via = normalise(patch[None], Normalisation(method="none", stain=target), source=source)
    np.testing.assert_array_equal(via[0].transpose(1, 2, 0), fixed.astype(np.float32))


def test_a_half_background_patch_is_no_longer_darkened() -> None:
    tissue = full_tissue()
    target = macenko_fit(synthetic_he(PALE_H, PALE_E, seed=6))
    source = macenko_fit(tissue)  # the slide's fit: tissue pixels only
    half = tissue.copy()
    half[:, 32:] = IO - 1  # background (OD ≈ 0)
    reference = macenko_apply(tissue, target)[:, :32].astype(np.float64).mean()
    per_patch = macenko_apply(half, target)[:, :32].astype(np.float64).mean()
    fixed = macenko_apply(half, target, source=source)
    # per patch, the background lowers the 99th percentile and darkens the tissue ...
    assert per_patch < reference - 3
    # ... with the slide's fit the tissue renders as in the full-tissue patch
    assert abs(fixed[:, :32].astype(np.float64).mean() - reference) < 1.0
    np.testing.assert_array_equal(
        fixed[:, :32], macenko_apply(tissue, target, source=source)[:, :32]
    )
    assert (fixed[:, 32:] >= IO - 2).all()  # background stays background


def test_the_source_fit_ignores_background_pixels() -> None:
    tissue = full_tissue()
    padded = np.full((64, 192, 3), IO - 1, np.uint8)
    padded[:, :64] = tissue
    a, b = macenko_fit(tissue), macenko_fit(padded)
    np.testing.assert_allclose(a.max_concentrations, b.max_concentrations, rtol=1e-6)
    np.testing.assert_allclose(a.stain_matrix, b.stain_matrix, atol=1e-6)
    with pytest.raises(ModelInputError, match="8-bit"):
        macenko_apply(tissue.astype(np.float32), a, source=a)


def test_stain_fit_field_parses_from_the_registry_format() -> None:
    from napari_histo_ai.errors import ModelSpecError
    from napari_histo_ai.models.spec import ModelSpec

    entry = {
        "name": "m",
        "task": "t",
        "version": "1",
        "format": "builtin",
        "architecture": "tiny_fcn",
        "io": {"patch_size": 64, "channels": 3, "normalisation": {"stain": {}}},
        "outputs": [{"name": "p", "kind": "probability"}],
    }
    spec = ModelSpec.from_dict(entry)
    assert spec.io.normalisation.stain is not None
    assert spec.io.normalisation.stain.fit == "patch"
    entry["io"]["normalisation"]["stain"] = {"fit": "slide"}
    stain = ModelSpec.from_dict(entry).io.normalisation.stain
    assert stain is not None and stain.fit == "slide"
    entry["io"]["normalisation"]["stain"] = {"fit": "tile"}
    with pytest.raises(ModelSpecError, match="fit"):
        ModelSpec.from_dict(entry)
