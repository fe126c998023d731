"""Weight loading in every format, refusal of pickles, contract checks, device choice."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from napari_histo_ai.errors import ModelInputError, ModelSpecError
from napari_histo_ai.models.architectures import (
    ARCHITECTURES,
    architecture_names,
    build_architecture,
    register_architecture,
)
from napari_histo_ai.models.architectures.tiny import TinyClassifier, TinyDetector, TinyFCN
from napari_histo_ai.models.loading import (
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    load_model,
    resolve_device,
)
from napari_histo_ai.models.spec import ModelSpec

KWARGS = {"in_channels": 3, "out_channels": 2, "width": 4, "depth": 2}


def make_spec(tmp_path: Path, fmt: str, weights: str | None, **changes: Any) -> ModelSpec:
    data: dict[str, Any] = {
        "name": "tiny",
        "task": "test",
        "version": "0",
        "format": fmt,
        "architecture": "tiny_fcn",
        "kwargs": dict(KWARGS),
        "io": {"patch_size": 32, "halo": 2},
        "outputs": [{"name": "fg", "kind": "probability", "channels": [0, 1]}],
    }
    if weights is not None:
        data["weights"] = weights
    data.update(changes)
    return ModelSpec.from_dict(data, source=str(tmp_path / "models.yaml"), base_dir=tmp_path)


@pytest.fixture(scope="module")
def net() -> TinyFCN:
    return TinyFCN(**KWARGS, seed=123).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))


def expected(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = net(batch)
    return out


# ----------------------------------------------------------------------------- architectures
def test_tiny_shapes() -> None:
    x = torch.zeros(2, 3, 20, 12)
    assert TinyFCN(out_channels=3)(x).shape == (2, 3, 20, 12)
    assert TinyFCN(stride=4)(x).shape == (2, 1, 5, 3)
    assert TinyFCN(depth=0)(x).shape == (2, 1, 20, 12)
    for size in (1, 3, 7, 64):
        assert TinyClassifier(n_classes=5)(torch.zeros(1, 3, size, size)).shape == (1, 5)
    det = TinyDetector(n_classes=2)(x)
    assert det.shape == (2, 4, 20, 12)
    assert bool((det[:, 2:] > 0).all())
    small = sum(p.numel() for p in TinyFCN().parameters())
    assert small < 5000


def test_tiny_fcn_receptive_radius() -> None:
    """An impulse changes outputs exactly ``depth`` pixels away and no further."""
    net = TinyFCN(depth=3, width=4).eval()
    x = torch.zeros(1, 3, 21, 21)
    base = expected(net, x)
    x[0, :, 10, 10] = 5.0
    changed = (expected(net, x) - base).abs()[0, 0] > 0
    rows = changed.any(dim=1).nonzero().flatten()
    assert net.receptive_radius == 3
    assert rows.min().item() == 7 and rows.max().item() == 13


def test_tiny_fcn_tiled_equals_whole() -> None:
    """Halo >= depth: the interior of a crop's output equals the whole image's output."""
    net = TinyFCN(depth=2, width=4).eval()
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    whole = expected(net, image)
    crop = expected(net, image[:, :, 10:30, 5:35])
    torch.testing.assert_close(crop[:, :, 2:-2, 2:-2], whole[:, :, 12:28, 7:33])


def test_seed_is_deterministic_and_leaves_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = TinyFCN(seed=5), TinyFCN(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = TinyFCN(seed=6)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_build_architecture_errors() -> None:
    assert {"tiny_fcn", "tiny_classifier", "tiny_detector", "unet"} <= set(architecture_names())
    assert ARCHITECTURES["unet"] == "napari_histo_ai.models.architectures.unet:UNet"
    assert isinstance(build_architecture("tiny_detector", n_classes=2), TinyDetector)
    with pytest.raises(ModelSpecError, match=r"unknown architecture 'resnet9000'.*tiny_fcn"):
        build_architecture("resnet9000")
    with pytest.raises(ModelSpecError, match=r"tiny_fcn.*colour='red'") as info:
        build_architecture("tiny_fcn", colour="red")
    assert "unexpected keyword" in str(info.value)
    with pytest.raises(ModelSpecError, match="width=0"):
        build_architecture("tiny_fcn", width=0)


def test_register_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_histo_ai.models import architectures

    monkeypatch.setattr(architectures, "_CALLABLES", dict(architectures._CALLABLES))
    monkeypatch.setattr(architectures, "ARCHITECTURES", dict(architectures.ARCHITECTURES))
    register_architecture("my_net", lambda **kw: TinyFCN(**kw))
    assert isinstance(architectures.build_architecture("my_net", depth=1), TinyFCN)
    register_architecture("by_path", "napari_histo_ai.models.architectures.tiny:TinyClassifier")
    assert isinstance(architectures.build_architecture("by_path"), TinyClassifier)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("tiny_fcn", TinyFCN)
    with pytest.raises(ValueError, match="module:callable"):
        register_architecture("bad", "no_colon", replace=True)
    register_architecture("not_a_module", lambda: 3)
    with pytest.raises(ModelSpecError, match=r"not a torch\.nn\.Module"):
        architectures.build_architecture("not_a_module")


def test_architecture_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_histo_ai.models import architectures

    class EP:
        name = "plugin_net"
        value = "plugin:Net"

        def load(self) -> Any:
            return TinyClassifier

    monkeypatch.setattr(architectures, "_CALLABLES", dict(architectures._CALLABLES))
    monkeypatch.setattr(architectures, "_ENTRY_POINTS", {})
    monkeypatch.setattr(architectures, "_discovered", False)
    monkeypatch.setattr(architectures.metadata, "entry_points", lambda group: [EP()])
    assert "plugin_net" in architectures.architecture_names()
    assert isinstance(architectures.build_architecture("plugin_net"), TinyClassifier)


# ----------------------------------------------------------------------------- formats
def test_safetensors_round_trip(tmp_path: Path, net: TinyFCN, batch: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    predictor = load_model(make_spec(tmp_path, "safetensors", "w.safetensors"), device="cpu")
    assert isinstance(predictor, TorchPredictor) and isinstance(predictor, Predictor)
    assert predictor.device == torch.device("cpu")
    predictor.check()
    out = predictor(batch)
    assert out.dtype == torch.float32 and out.device == batch.device
    torch.testing.assert_close(out, expected(net, batch))


def test_state_dict_round_trip(tmp_path: Path, net: TinyFCN, batch: torch.Tensor) -> None:
    torch.save(net.state_dict(), tmp_path / "w.pt")
    predictor = load_model(make_spec(tmp_path, "state_dict", "w.pt"), device="cpu")
    torch.testing.assert_close(predictor(batch), expected(net, batch))


class Payload:
    """Unpickling this would run code: it must never happen."""

    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_mark_ran, ())


def _mark_ran() -> Payload:
    Payload.ran = True
    return Payload()


def test_state_dict_with_pickled_object_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelSpecError, match="refused and not unpickled") as info:
        load_model(make_spec(tmp_path, "state_dict", "evil.pt"), device="cpu")
    assert "evil.pt" in str(info.value) and "_mark_ran" in str(info.value)
    assert "weights_only" not in str(info.value)
    assert not Payload.ran
    # a plain pickle, not a torch.save zip, is refused as well
    with open(tmp_path / "plain.pt", "wb") as handle:
        pickle.dump(Payload(), handle)
    with pytest.raises(ModelSpecError, match=r"plain\.pt") as info:
        load_model(make_spec(tmp_path, "state_dict", "plain.pt"), device="cpu")
    assert "weights_only" not in str(info.value)
    assert not Payload.ran


def test_state_dict_not_a_mapping(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelSpecError, match="holds a list, not a mapping"):
        load_model(make_spec(tmp_path, "state_dict", "list.pt"), device="cpu")
    torch.save({"a": torch.zeros(1), "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(ModelSpecError, match="'epoch' is int"):
        load_model(make_spec(tmp_path, "state_dict", "ckpt.pt"), device="cpu")


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*is deprecated:DeprecationWarning")
def test_torchscript_matches(tmp_path: Path, net: TinyFCN, batch: torch.Tensor) -> None:
    traced = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    traced.save(str(tmp_path / "net.ts"))
    spec = make_spec(tmp_path, "torchscript", "net.ts", architecture=None, kwargs=None)
    predictor = load_model(spec, device="cpu")
    predictor.check()
    torch.testing.assert_close(predictor(batch), expected(net, batch))


# dynamo=False is torch's legacy TorchScript-based exporter: it and its internals warn
# DeprecationWarning (torch 2.13); the dynamo exporter needs onnxscript and is slower
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_matches(tmp_path: Path, net: TinyFCN, batch: torch.Tensor) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
    )
    spec = make_spec(tmp_path, "onnx", "net.onnx", architecture=None, kwargs=None)
    predictor = load_model(spec, device="cpu")
    assert isinstance(predictor, OnnxPredictor)
    assert predictor.device == torch.device("cpu")
    predictor.check()
    out = predictor(batch)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, expected(net, batch), rtol=1e-4, atol=1e-5)


def test_onnx_without_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from napari_histo_ai.errors import MissingDependencyError

    (tmp_path / "net.onnx").write_bytes(b"\x08\x01")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    spec = make_spec(tmp_path, "onnx", "net.onnx", architecture=None, kwargs=None)
    with pytest.raises(MissingDependencyError, match=r"napari-histo-ai\[onnx\]"):
        load_model(spec, device="cpu")


def test_builtin(tmp_path: Path, batch: torch.Tensor) -> None:
    spec = make_spec(tmp_path, "builtin", None)
    first, second = load_model(spec, device="cpu"), load_model(spec, device="cpu")
    first.check()
    torch.testing.assert_close(first(batch), second(batch))  # seeded: reproducible
    assert "TorchPredictor('tiny'" in repr(first)


def test_tile_model_check(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        "builtin",
        None,
        architecture="tiny_classifier",
        kwargs={"n_classes": 3},
        dense=False,
        activation="softmax",
        io={"patch_size": 16},
        outputs=[{"name": "t", "kind": "class", "channels": [0, 1, 2]}],
    )
    predictor = load_model(spec, device="cpu")
    predictor.check()
    assert predictor(torch.zeros(4, 3, 16, 16)).shape == (4, 3)


# ----------------------------------------------------------------------------- errors
def test_check_catches_channel_mismatch(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "builtin", None, kwargs={**KWARGS, "in_channels": 1})
    predictor = load_model(spec, device="cpu")
    with pytest.raises(ModelInputError, match=r"'tiny'.*\(1, 3, 32, 32\)") as info:
        predictor.check()
    assert "channels" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "got"),
    [
        ({"kwargs": {**KWARGS, "out_channels": 1}}, r"\(1, 1, 32, 32\)"),  # K too small
        ({"kwargs": {**KWARGS, "stride": 2}}, r"\(1, 2, 16, 16\)"),  # stride not declared
        (
            {"architecture": "tiny_classifier", "kwargs": {"n_classes": 2}},
            r"\(1, 2\)",
        ),  # a classifier registered as dense
    ],
)
def test_check_catches_wrong_output_shape(tmp_path: Path, changes: dict, got: str) -> None:
    predictor = load_model(make_spec(tmp_path, "builtin", None, **changes), device="cpu")
    with pytest.raises(ModelInputError, match=got) as info:
        predictor.check()
    assert "'tiny'" in str(info.value) and "expected (1, K≥2, 32, 32)" in str(info.value)


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="does not exist") as info:
        load_model(make_spec(tmp_path, "safetensors", "nowhere.safetensors"), device="cpu")
    assert str(tmp_path / "nowhere.safetensors") in str(info.value)
    assert "relative" in str(info.value)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("safetensors", "w.safetensors"),
        ("state_dict", "w.pt"),
        ("torchscript", "w.ts"),
        ("onnx", "w.onnx"),
    ],
)
@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 50])
def test_corrupt_weights(tmp_path: Path, fmt: str, name: str, content: bytes) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelSpecError, match="is not a readable") as info:
        load_model(make_spec(tmp_path, fmt, name), device="cpu")
    assert name in str(info.value)


def test_truncated_safetensors(tmp_path: Path, net: TinyFCN) -> None:
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSpecError, match=r"w\.safetensors"):
        load_model(make_spec(tmp_path, "safetensors", "w.safetensors"), device="cpu")


def test_weights_do_not_fit(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = TinyFCN(in_channels=3, out_channels=2, width=6, depth=3)
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelSpecError) as info:
        load_model(make_spec(tmp_path, "safetensors", "w.safetensors"), device="cpu")
    text = str(info.value)
    assert "w.safetensors" in text and "tiny_fcn" in text
    assert "unexpected: body.6.bias, body.6.weight;" in text  # safetensors sorts keys
    assert "wrong shape" in text and "body.0.weight (6, 3, 3, 3) vs (4, 3, 3, 3)" in text


def test_unknown_architecture_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"models.yaml: model 'tiny': unknown architecture"):
        load_model(make_spec(tmp_path, "builtin", None, architecture="nope"), device="cpu")


# ----------------------------------------------------------------------------- devices
def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device()
    assert auto.type in ("cpu", "cuda", "mps")
    with pytest.raises(ModelInputError, match="'gpu' is not one of"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_resolve_unavailable_cuda() -> None:
    with pytest.raises(ModelInputError, match=r"'cuda' is not available.*available: cpu"):
        resolve_device("cuda")
    with pytest.raises(ModelInputError, match="not available"):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_resolve_unavailable_mps() -> None:
    with pytest.raises(ModelInputError, match="'mps' is not available"):
        resolve_device("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_predictor(tmp_path: Path, net: TinyFCN, batch: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    spec = make_spec(tmp_path, "safetensors", "w.safetensors")
    exact = load_model(spec, device="cuda", autocast=False)
    exact.check()
    torch.testing.assert_close(exact(batch), expected(net, batch), rtol=1e-3, atol=1e-4)
    assert exact(batch).device.type == "cpu"
    assert exact(batch.cuda()).device.type == "cuda"
    fast = load_model(spec, device="cuda")
    torch.testing.assert_close(fast(batch), expected(net, batch), rtol=5e-2, atol=5e-2)
