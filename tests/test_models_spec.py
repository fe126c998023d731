"""ModelSpec.from_dict: every invalid entry names its field; to_dict round-trips."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from napari_histo_ai.errors import ModelSpecError
from napari_histo_ai.models.spec import ModelSpec


def entry(**changes: Any) -> dict[str, Any]:
    """A valid dense entry, with top-level fields replaced by ``changes``."""
    data: dict[str, Any] = {
        "name": "nuclei-demo",
        "task": "nucleus segmentation",
        "version": "1.0",
        "format": "safetensors",
        "architecture": "tiny_fcn",
        "kwargs": {"out_channels": 2},
        "weights": "weights/nuclei.safetensors",
        "io": {"mpp": 0.5, "patch_size": 64, "halo": 4, "overlap": 8},
        "outputs": [
            {"name": "nuclei", "kind": "probability", "channels": [0]},
            {"name": "boundary", "kind": "probability", "channels": [1]},
        ],
        "card": {"licence": "CC-BY-4.0", "metrics": {"dice": 0.8}},
    }
    data.update(changes)
    return data


def tile_entry(**changes: Any) -> dict[str, Any]:
    data = entry(
        name="tumour-demo",
        format="builtin",
        architecture="tiny_classifier",
        kwargs={"n_classes": 3},
        dense=False,
        activation="softmax",
        io={"mpp": 2.0, "patch_size": 32, "overlap": 16},
        outputs=[
            {
                "name": "tissue",
                "kind": "class",
                "channels": [0, 1, 2],
                "classes": ["normal", "tumour", "stroma"],
                "colours": ["#00ff00", "#ff0000", "#0000ff"],
                "aggregate": "vote",
            }
        ],
    )
    del data["weights"]
    data.update(changes)
    return data


def with_io(**io: Any) -> dict[str, Any]:
    data = entry()
    data["io"] = {**data["io"], **io}
    return data


def with_output(index: int = 0, **fields: Any) -> dict[str, Any]:
    data = entry()
    data["outputs"][index] = {**data["outputs"][index], **fields}
    return data


def error_for(data: Any) -> ModelSpecError:
    with pytest.raises(ModelSpecError) as info:
        ModelSpec.from_dict(data, source="test.yaml")
    return info.value


def test_valid_entry(tmp_path: Path) -> None:
    spec = ModelSpec.from_dict(entry(), source="x.yaml", base_dir=tmp_path)
    assert spec.name == "nuclei-demo"
    assert spec.weights == tmp_path / "weights" / "nuclei.safetensors"
    assert spec.n_outputs == 2
    assert spec.io.mpp == 0.5 and spec.io.channels == 3
    assert spec.outputs[0].classes == ("nuclei",)
    assert spec.outputs[0].colours[0].startswith("#")
    assert spec.source == "x.yaml"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({k: v for k, v in entry().items() if k != "version"}, "version"),
        ({k: v for k, v in entry().items() if k != "outputs"}, "outputs"),
        (entry(format="pickle"), "format"),
        (entry(architecture=None), "architecture"),
        (entry(weights=None), "weights"),
        (entry(name="my model"), "name"),
        (entry(activation="relu"), "activation"),
        (entry(colour="red"), "colour"),  # unknown top-level field
        (entry(dense="no"), "dense"),
        (entry(outputs=[]), "outputs"),
        (entry(kwargs=[1, 2]), "kwargs"),
        (entry(io={"mpp": 0.5}), "io.patch_size"),
        (with_io(patch_size=64.5), "io.patch_size"),
        (with_io(patch_size="big"), "io.patch_size"),
        (with_io(mpp=-1), "io.mpp"),
        (with_io(mpp=float("nan")), "io.mpp"),
        (with_io(halo=30), "halo"),
        (with_io(halo=-1), "io.halo"),
        (with_io(channels=0), "io.channels"),
        (with_io(output_stride=3), "io.output_stride"),
        (with_io(size_multiple=48), "io.size_multiple"),
        (with_io(fixed_size="yes"), "io.fixed_size"),
        (with_io(tile_size=64), "tile_size"),
        (with_io(normalisation={"method": "minmax"}), "io.normalisation.method"),
        (with_io(normalisation={"method": "meanstd", "mean": [0.5]}), "meanstd"),
        (
            with_io(normalisation={"method": "meanstd", "mean": [0, 0, 0], "std": [1, 0, 1]}),
            "io.normalisation.std",
        ),
        (
            with_io(normalisation={"method": "meanstd", "mean": ["a", 0, 0], "std": [1, 1, 1]}),
            "io.normalisation.mean",
        ),
        (with_io(normalisation={"stain": {"method": "reinhard"}}), "stain.method"),
        (with_io(normalisation={"stain": {"stain_matrix": [[1, 2]]}}), "stain_matrix"),
        (with_io(channels=1, normalisation={"stain": {}}), "io.channels"),
        (with_output(kind="heatmap"), "outputs[0].kind"),
        (with_output(kind="class"), "does not fit a dense model"),
        (with_output(name="boundary"), "unique"),
        (with_output(classes=["a", "b"]), "outputs[0]"),
        (with_output(colours=["#ff0000", "#00ff00"]), "colours"),
        (with_output(colours=["red"]), "'#rrggbb'"),
        (with_output(kind="boxes"), "size_channels"),
        (with_output(size_channels=[1, 2]), "size_channels"),
        (with_output(channels=[-1]), "outputs[0].channels"),
        (with_output(channels="zero"), "outputs[0].channels"),
        (with_output(threshold="high"), "outputs[0].threshold"),
        (with_output(aggregate="mode"), "outputs[0].aggregate"),
        (with_output(classes="nuclei"), "outputs[0].classes"),
        (with_output(cmap="red"), "cmap"),
        (entry(card={"metrics": {"dice": "good"}}), "card.metrics.dice"),
        (entry(card={"author": "me"}), "author"),
        (tile_entry(outputs=[{"name": "x", "kind": "probability"}]), "tile model"),
        (
            tile_entry(outputs=[{"name": "m", "kind": "magnification", "values": [5, 10]}]),
            "values",
        ),
        (tile_entry(outputs=[{"name": "m", "kind": "magnification", "values": ["x"]}]), "values"),
        ([1, 2], "entry"),
    ],
)
def test_invalid_entry_names_the_field(data: Any, field: str) -> None:
    err = error_for(data)
    assert field in str(err)
    assert str(err).startswith("test.yaml: model ")


def test_error_names_model_and_source() -> None:
    err = error_for(with_io(halo=30))
    assert err.model == "nuclei-demo"
    assert err.source == "test.yaml"
    assert "nuclei-demo" in str(err)


def test_unknown_field_lists_allowed() -> None:
    err = error_for(with_io(tile_size=64))
    assert "allowed:" in str(err) and "patch_size" in str(err)


def test_boxes_with_size_channels() -> None:
    data = entry(
        kwargs={},
        outputs=[{"name": "cells", "kind": "boxes", "channels": [0], "size_channels": [1, 2]}],
    )
    spec = ModelSpec.from_dict(data)
    assert spec.outputs[0].size_channels == (1, 2)
    assert spec.n_outputs == 3


def test_tile_entry() -> None:
    spec = ModelSpec.from_dict(tile_entry())
    assert not spec.dense
    assert spec.weights is None
    assert spec.n_outputs == 3
    assert spec.outputs[0].aggregate == "vote"


@pytest.mark.parametrize("make", [entry, tile_entry])
def test_round_trip(make: Any, tmp_path: Path) -> None:
    data = make()
    data["io"] = {
        **data["io"],
        "normalisation": {
            "method": "meanstd",
            "mean": [0.1, 0.2, 0.3],
            "std": [0.5, 0.5, 0.5],
            "stain": {"method": "macenko"},
        },
    }
    spec = ModelSpec.from_dict(data, source="a.yaml", base_dir=tmp_path)
    again = ModelSpec.from_dict(spec.to_dict(), source="a.yaml", base_dir=tmp_path)
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()


def test_to_dict_is_a_copy() -> None:
    spec = ModelSpec.from_dict(entry())
    data = spec.to_dict()
    before = copy.deepcopy(data)
    data["kwargs"]["out_channels"] = 99
    assert spec.to_dict() == before


def test_fingerprint_changes_with_numbers_not_card() -> None:
    spec = ModelSpec.from_dict(entry())
    other_card = ModelSpec.from_dict(entry(card={"licence": "MIT"}))
    other_io = ModelSpec.from_dict(with_io(mpp=0.25))
    assert spec.fingerprint() == other_card.fingerprint()
    assert spec.fingerprint() != other_io.fingerprint()


def test_errors_survive_pickling_between_processes() -> None:
    import pickle

    from napari_histo_ai.errors import (
        CorruptFileError,
        MissingDependencyError,
        ModelInputError,
        ModelSpecError,
    )

    for exc in (
        ModelSpecError("models.yaml", "net", "bad field", "fix it"),
        CorruptFileError("slide.svs", "truncated", "copy it again"),
        MissingDependencyError("ONNX models", "onnx"),
        ModelInputError("3 channels expected"),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
