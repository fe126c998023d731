"""The model registry: packaged YAML, entry points and the user folder; broken input."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import yaml

from napari_histo_ai.errors import ModelNotFoundError
from napari_histo_ai.models import registry as registry_module
from napari_histo_ai.models.registry import (
    Registry,
    format_card,
    load_registry,
    spec_summary,
    user_models_dir,
)
from napari_histo_ai.models.spec import ModelSpec


def entry(name: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "task": "demo",
        "version": "0.1",
        "format": "safetensors",
        "architecture": "tiny_fcn",
        "weights": f"{name}.safetensors",
        "io": {"mpp": 0.5, "patch_size": 64, "halo": 4},
        "outputs": [{"name": "fg", "kind": "probability"}],
    }
    data.update(changes)
    return data


def write_yaml(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": list(entries)}), encoding="utf-8")
    return path


class FakeEntryPoint:
    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = f"fake_module:{name}"
        self._value = value

    def load(self) -> Any:
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


@pytest.fixture
def no_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda group: [])


def use_entry_points(monkeypatch: pytest.MonkeyPatch, *eps: Any) -> None:
    def fake(group: str) -> list[Any]:
        assert group == "napari_histo_ai.models"
        return list(eps)

    monkeypatch.setattr(registry_module.metadata, "entry_points", fake)


def test_packaged_registry_loads_without_problems(tmp_path: Path) -> None:
    reg = load_registry(user_dir=tmp_path / "none", entry_points=False)
    assert reg.problems == []
    for spec in reg:
        assert spec.name in reg
        # models.yaml and the per-paper files beside it, all inside the package
        assert spec.source.endswith(".yaml")
        assert Path(spec.source).parent.name == "models"


def test_user_folder_good_and_broken(tmp_path: Path) -> None:
    write_yaml(tmp_path / "good.yaml", entry("good-model"))
    (tmp_path / "broken.yml").write_text("models:\n  - name: x\n    task: a: b\n", encoding="utf-8")
    write_yaml(tmp_path / "invalid.yaml", entry("bad-model", io={"mpp": 0.5}))
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")
    reg = load_registry(user_dir=tmp_path, entry_points=False, packaged=False)
    assert reg.names() == ["good-model"]
    assert reg.get("good-model").weights == tmp_path / "good-model.safetensors"
    assert len(reg.problems) == 2
    broken = next(p for p in reg.problems if "broken.yml" in p)
    assert "not valid YAML" in broken and "line 3" in broken
    invalid = next(p for p in reg.problems if "invalid.yaml" in p)
    assert "bad-model" in invalid and "io.patch_size" in invalid


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("- a\n- b\n", "list"),
        ("model:\n  - {}\n", "no 'models:' list"),
        ("models: {a: 1}\n", "expected a list"),
    ],
)
def test_malformed_documents_are_problems(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "m.yaml").write_text(text, encoding="utf-8")
    reg = load_registry(user_dir=tmp_path, entry_points=False, packaged=False)
    assert len(reg) == 0
    assert len(reg.problems) >= 1
    assert any(expected in p and "m.yaml" in p for p in reg.problems), reg.problems


def test_duplicate_names_keep_the_first(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", entry("same", version="1"))
    write_yaml(tmp_path / "b.yaml", entry("same", version="2"), entry("other"))
    reg = load_registry(user_dir=tmp_path, entry_points=False, packaged=False)
    assert reg.names() == ["other", "same"]
    assert reg.get("same").version == "1"
    assert len(reg.problems) == 1
    assert "b.yaml" in reg.problems[0] and "a.yaml" in reg.problems[0]
    assert "'same'" in reg.problems[0]


def test_packaged_names_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tmp_path / "pkg"
    packaged.mkdir()
    user = tmp_path / "user"
    user.mkdir()
    write_yaml(packaged / "models.yaml", entry("shipped", version="packaged"))
    write_yaml(user / "mine.yaml", entry("shipped", version="user"))
    monkeypatch.setattr(registry_module.resources, "files", lambda package: packaged)
    reg = load_registry(user_dir=user, entry_points=False)
    assert reg.get("shipped").version == "packaged"
    assert "mine.yaml" in reg.problems[0]


def test_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_file = write_yaml(tmp_path / "plugin.yaml", entry("from-path"))
    use_entry_points(
        monkeypatch,
        FakeEntryPoint("path", str(yaml_file)),
        FakeEntryPoint("pathlib", lambda: yaml_file.with_name("plugin2.yaml")),
        FakeEntryPoint("listing", lambda: [entry("from-list", weights=str(tmp_path / "w"))]),
        FakeEntryPoint("mapping", lambda: {"models": [entry("from-mapping")]}),
        FakeEntryPoint("raises", ImportError("no module named fake_module")),
        FakeEntryPoint("number", 42),
        FakeEntryPoint("bad-entry", lambda: [entry("bad", format="pickle")]),
    )
    write_yaml(tmp_path / "plugin2.yaml", entry("from-callable-path"))
    reg = load_registry(user_dir=tmp_path / "none", packaged=False)
    assert reg.names() == ["from-callable-path", "from-list", "from-mapping", "from-path"]
    assert reg.get("from-path").weights == tmp_path / "from-path.safetensors"
    assert reg.get("from-list").source == "entry point 'listing' (fake_module:listing)"
    assert len(reg.problems) == 3
    text = "\n".join(reg.problems)
    assert "'raises'" in text and "no module named fake_module" in text
    assert "'number'" in text and "int" in text
    assert "'bad-entry'" in text and "format" in text


def test_real_entry_point_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A genuine importlib.metadata.EntryPoint pointing at a module attribute."""
    yaml_file = write_yaml(tmp_path / "ep.yaml", entry("via-ep"))
    monkeypatch.setattr(registry_module, "_TEST_YAML", str(yaml_file), raising=False)
    ep = EntryPoint(
        name="ep",
        value="napari_histo_ai.models.registry:_TEST_YAML",
        group="napari_histo_ai.models",
    )
    use_entry_points(monkeypatch, ep)
    reg = load_registry(user_dir=tmp_path / "none", packaged=False)
    assert reg.names() == ["via-ep"]
    assert reg.problems == []


def test_entry_points_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_entry_points(monkeypatch, FakeEntryPoint("x", ImportError("must not be read")))
    reg = load_registry(user_dir=tmp_path, entry_points=False, packaged=False)
    assert len(reg) == 0 and reg.problems == []


def test_get_unknown_lists_names(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", entry("alpha"), entry("beta"))
    reg = load_registry(user_dir=tmp_path, entry_points=False, packaged=False)
    with pytest.raises(ModelNotFoundError, match="alpha, beta") as info:
        reg.get("gamma")
    assert "'gamma'" in str(info.value)
    assert "gamma" not in reg
    assert [s.name for s in reg] == ["alpha", "beta"]


def test_registry_container() -> None:
    specs = [
        ModelSpec.from_dict(entry("zeta")),
        ModelSpec.from_dict(entry("alpha")),
        ModelSpec.from_dict(entry("alpha", version="2")),
    ]
    reg = Registry(specs)
    assert reg.names() == ["alpha", "zeta"]
    assert len(reg) == 2
    assert reg.get("alpha").version == "0.1"
    assert len(reg.problems) == 1
    assert "alpha" in repr(reg)


def test_user_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(tmp_path / "mine"))
    assert user_models_dir() == tmp_path / "mine"
    write_yaml(tmp_path / "x.yaml", entry("ignored"))
    (tmp_path / "mine").mkdir()
    write_yaml(tmp_path / "mine" / "m.yaml", entry("from-env"))
    reg = load_registry(entry_points=False, packaged=False)
    assert reg.names() == ["from-env"]
    monkeypatch.delenv("NAPARI_HISTO_AI_MODELS")
    default = user_models_dir()
    assert default.name == "models" and "napari-histo-ai" in str(default)


def test_format_card_and_summary(tmp_path: Path) -> None:
    data = entry(
        "card-model",
        card={
            "description": "Nuclei in H&E",
            "training_data": "MoNuSeg 2018",
            "split": "patient-level 80/20",
            "metrics": {"dice": 0.81},
            "provenance": "trained here",
            "licence": "CC-BY-4.0",
        },
    )
    data["io"]["normalisation"] = {
        "method": "meanstd",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "stain": {},
    }
    data["outputs"] = [
        {"name": "nuclei", "kind": "points", "channels": [0], "classes": ["nucleus"]},
        {"name": "cells", "kind": "boxes", "channels": [1], "size_channels": [2, 3]},
    ]
    spec = ModelSpec.from_dict(data, source="m.yaml", base_dir=tmp_path)
    card = format_card(spec)
    for text in (
        "card-model 0.1",
        "0.5 µm/px",
        "patch 64 px",
        "halo 4 px",
        "macenko",
        "meanstd",
        "nuclei: points",
        "nucleus",
        "size channels 2, 3",
        "dice 0.81",
        "MoNuSeg 2018",
        "patient-level",
        "trained here",
        "CC-BY-4.0",
        "MISSING",
        "m.yaml",
    ):
        assert text in card, text
    summary = spec_summary(spec)
    assert summary["available"] is False
    json.dumps(summary)
    (tmp_path / "card-model.safetensors").write_bytes(b"")
    assert spec_summary(spec)["available"] is True
    assert "present" in format_card(spec)


def test_registry_import_and_listing_stay_light() -> None:
    """Listing models (the widget's first call, plugin discovery) imports no torch."""
    import subprocess
    import sys

    code = (
        "import sys; from napari_histo_ai.models import registry, loading, architectures, "
        "preprocessing; registry.load_registry(); architectures.architecture_names(); "
        "print(sorted({'torch', 'onnxruntime', 'safetensors', 'napari'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_packaged_yaml_file_is_read(monkeypatch, tmp_path) -> None:
    """models.yaml first, then the per-paper files beside it, sorted by name."""
    from importlib import resources

    package = resources.files("napari_histo_ai.models")
    packaged = sorted(r.name for r in package.iterdir() if r.name.endswith(".yaml"))
    assert "models.yaml" in packaged
    reg = load_registry(user_dir=tmp_path, entry_points=False)
    assert reg.problems == []
    assert "nuclei-unet" in reg.names()
    sources = {Path(spec.source).name for spec in reg}
    assert sources == set(packaged) - {name for name in packaged if not _has_models(package / name)}


def _has_models(resource: Any) -> bool:
    data = yaml.safe_load(resource.read_text(encoding="utf-8")) or {}
    return bool(data.get("models"))
