"""Explicit weight loading: a `ModelSpec` → a `Predictor` that maps tensors to raw outputs.

Formats (``spec.format``):

* ``safetensors``: `build_architecture` + ``safetensors.torch.load_file`` +
  ``load_state_dict(strict=True)`` (recommended: no code runs on load);
* ``state_dict``: a ``torch.save``-d mapping of tensors, read with
  ``torch.load(weights_only=True)``: files holding other Python objects are refused,
  never unpickled;
* ``torchscript``: ``torch.jit.load``;
* ``onnx``: an ``onnxruntime.InferenceSession`` (extra ``onnx``);
* ``builtin``: the architecture with its own initialisation (tiny demo nets).

A predictor returns the network's **raw** output (logits) as float32; the engine applies
``spec.activation``. Nothing is loaded at import and torch is imported on first use.
"""

from __future__ import annotations

import abc
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError, ModelInputError, ModelSpecError
from .spec import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "load_model",
    "resolve_device",
]

#: keys named in an error about mismatching weights
_SHOW_KEYS = 5


# ----------------------------------------------------------------------------- devices
def _available_devices() -> list[str]:
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device to run on.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` (CUDA, else Apple MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ModelInputError
        The name is not a device, or the device is not available here (the message
        lists the available ones).
    """
    import torch

    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelInputError(
            f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps"
        ) from None
    available = ", ".join(_available_devices())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else f" (torch {torch.__version__} has no CUDA)"
            raise ModelInputError(
                f"device {device!r} is not available: no CUDA GPU found{build}; "
                f"available: {available}. Use device='auto' or 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelInputError(
                f"device {device!r} is not available: {torch.cuda.device_count()} CUDA "
                f"device(s); available: {available}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelInputError(
                f"device {device!r} is not available: no Apple MPS backend here; "
                f"available: {available}. Use device='auto' or 'cpu'"
            )
    elif dev.type != "cpu":
        raise ModelInputError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return dev


# ----------------------------------------------------------------------------- predictors
class Predictor(abc.ABC):
    """A loaded model: ``predictor(batch)`` → raw output.

    Attributes
    ----------
    spec : ModelSpec
        The registry entry it was loaded from.
    device : torch.device
        Where the network runs.
    """

    spec: ModelSpec
    device: torch.device

    @abc.abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the network on a batch.

        Parameters
        ----------
        batch : torch.Tensor, shape (N, C, H, W), float32
            Normalised input (see `napari_histo_ai.models.preprocessing.normalise`).

        Returns
        -------
        torch.Tensor, float32
            Raw output (no activation): ``(N, K, H / s, W / s)`` for dense models,
            ``(N, K)`` for tile models.
        """

    def expected_shape(self) -> tuple[int, ...]:
        """Output shape the contract requires for a ``(1, C, P, P)`` input (K: minimum)."""
        io = self.spec.io
        if self.spec.dense:
            side = io.patch_size // io.output_stride
            return (1, self.spec.n_outputs, side, side)
        return (1, self.spec.n_outputs)

    def check(self) -> None:
        """Run one zero patch and verify the output against the spec's contract.

        The input is ``(1, io.channels, io.patch_size, io.patch_size)``. Dense models must
        return ``(1, K, P / s, P / s)``, tile models ``(1, K)``, with ``K >=
        spec.n_outputs``.

        Raises
        ------
        ModelInputError
            The network fails on that input (naming the model, the shape tried and the
            network's message) or returns another shape.
        """
        import torch

        io = self.spec.io
        shape = (1, io.channels, io.patch_size, io.patch_size)
        try:
            output = self(torch.zeros(shape, dtype=torch.float32, device=self.device))
        except ModelInputError:
            raise
        except Exception as exc:
            message = str(exc).strip().splitlines()
            raise ModelInputError(
                f"model '{self.spec.name}' failed on an input of shape {shape} "
                f"(io.channels={io.channels}, io.patch_size={io.patch_size}): "
                f"{type(exc).__name__}: {' '.join(message)[:500]}"
            ) from exc
        expected = self.expected_shape()
        got = tuple(output.shape)
        ok = (
            len(got) == len(expected)
            and got[0] == 1
            and got[1] >= expected[1]
            and got[2:] == expected[2:]
        )
        if not ok:
            kind = "dense" if self.spec.dense else "tile"
            k = self.spec.n_outputs
            want = f"(1, K≥{k}" + "".join(f", {s}" for s in expected[2:]) + ")"
            raise ModelInputError(
                f"model '{self.spec.name}' ({kind}) returned shape {got} for an input of "
                f"shape {shape}; expected {want} (K = channels, outputs read up to channel "
                f"{k - 1}; spatial = patch_size / output_stride)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}, device={str(self.device)!r})"


class TorchPredictor(Predictor):
    """A ``torch.nn.Module`` (or TorchScript module) in eval mode on ``device``.

    Parameters
    ----------
    module : torch.nn.Module
        The network; it is put in eval mode and moved to ``device`` (channels-last).
    spec : ModelSpec
    device : torch.device
    autocast : bool
        On CUDA, run under bfloat16 autocast (when the GPU supports it). Ignored on
        other devices.

    Notes
    -----
    Calls run under ``torch.inference_mode``; 4-D inputs are made channels-last. The
    output is float32 on the input's device and is an inference tensor: apply the
    activation out of place (``torch.sigmoid(y)``) or inside ``torch.inference_mode``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ModelSpec,
        device: torch.device,
        *,
        autocast: bool = True,
    ) -> None:
        import torch

        self.spec = spec
        self.device = device
        module = module.eval().to(device)
        try:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        except (RuntimeError, TypeError):  # some scripted modules refuse memory formats
            pass
        self.module = module
        self.autocast = bool(autocast and device.type == "cuda" and torch.cuda.is_bf16_supported())

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            x = batch.to(self.device, dtype=torch.float32, non_blocking=True)
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = self.module(x)
            else:
                y = self.module(x)
            if not isinstance(y, torch.Tensor):
                raise ModelInputError(
                    f"model '{self.spec.name}' returned {type(y).__name__}, not a tensor; "
                    "export a network whose forward returns one tensor"
                )
            return y.to(device=batch.device, dtype=torch.float32).contiguous()


class OnnxPredictor(Predictor):
    """An ``onnxruntime.InferenceSession``; outputs come back on the CPU.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Its first input takes the batch, its first output is returned.
    spec : ModelSpec
    device : torch.device
        ``cuda`` when the session runs on the CUDA execution provider, else ``cpu``.
    """

    def __init__(self, session: Any, spec: ModelSpec, device: torch.device) -> None:
        self.session = session
        self.spec = spec
        self.device = device
        first = session.get_inputs()[0]
        self.input_name: str = first.name
        self.input_half = first.type == "tensor(float16)"
        self.output_name: str = session.get_outputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        x = batch.detach().to("cpu", torch.float32).numpy()
        if self.input_half:
            x = x.astype(np.float16)
        (y,) = self.session.run([self.output_name], {self.input_name: x})
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


# ----------------------------------------------------------------------------- loading
def load_model(
    spec: ModelSpec, *, device: str | torch.device = "auto", autocast: bool = True
) -> Predictor:
    """Load a registered model's weights into a ready-to-call predictor.

    Parameters
    ----------
    spec : ModelSpec
        The registry entry.
    device : str or torch.device
        See `resolve_device`. ONNX models run on CUDA when ``device`` resolves to CUDA
        and onnxruntime has the CUDA execution provider, else on the CPU.
    autocast : bool
        bfloat16 autocast on CUDA for torch formats (see `TorchPredictor`).

    Returns
    -------
    Predictor
        `TorchPredictor` or `OnnxPredictor`; call ``.check()`` to verify the contract.

    Raises
    ------
    ModelSpecError
        Missing, unreadable or corrupt weights; weights that do not fit the
        architecture (naming the first offending keys); a state-dict file holding
        Python objects other than tensors; an unknown architecture or bad kwargs.
    MissingDependencyError
        An ONNX model without onnxruntime installed.
    ModelInputError
        ``device`` is not available.
    """
    dev = resolve_device(device)
    fmt = spec.format
    if fmt == "onnx":
        return _load_onnx(spec, dev)
    if fmt == "builtin":
        module = _build(spec)
    elif fmt == "safetensors":
        module = _build(spec)
        _load_state(module, _read_safetensors(spec, _weights(spec)), spec)
    elif fmt == "state_dict":
        module = _build(spec)
        _load_state(module, _read_state_dict(spec, _weights(spec)), spec)
    elif fmt == "torchscript":
        module = _read_torchscript(spec, _weights(spec), dev)
    else:
        raise ModelSpecError(spec.source, spec.name, f"unknown format {fmt!r}")
    return TorchPredictor(module, spec, dev, autocast=autocast)


def _fail(spec: ModelSpec, problem: str, hint: str = "") -> ModelSpecError:
    return ModelSpecError(spec.source or "<spec>", spec.name, problem, hint)


def _weights(spec: ModelSpec) -> Path:
    path = spec.weights
    if path is None:
        raise _fail(spec, f"format '{spec.format}' needs a 'weights' file but none is set")
    if not path.is_file():
        raise _fail(
            spec,
            f"weights file {path} does not exist",
            "download or copy it there; a relative 'weights' path is resolved against "
            "the folder of the YAML file that lists the model",
        )
    return path


def _build(spec: ModelSpec) -> torch.nn.Module:
    from .architectures import build_architecture

    if not spec.architecture:
        raise _fail(spec, f"format '{spec.format}' needs an 'architecture'")
    try:
        return build_architecture(spec.architecture, **spec.kwargs)
    except ModelSpecError as exc:
        raise _fail(spec, exc.problem, exc.hint) from exc


def _corrupt(spec: ModelSpec, path: Path, what: str, exc: BaseException) -> ModelSpecError:
    detail = " ".join(str(exc).split())[:300]
    return _fail(
        spec,
        f"weights file {path} is not a readable {what} file ({type(exc).__name__}: {detail})",
        "the file may be truncated or of another format; download it again or check "
        "'format' in the entry",
    )


def _read_safetensors(spec: ModelSpec, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ... : never a raw traceback
        raise _corrupt(spec, path, "safetensors", exc) from exc


def _read_state_dict(spec: ModelSpec, path: Path) -> Mapping[str, torch.Tensor]:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of plain pickles before refusing them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if found or "Unsupported global" in text:
            what = f" ({found.group(1)})" if found else ""
            raise _fail(
                spec,
                f"weights file {path} holds Python objects other than tensors{what}; it was "
                "refused and not unpickled (unpickling it could run arbitrary code)",
                "save only the weights, torch.save(model.state_dict(), path), or convert "
                "them to safetensors",
            ) from None
        # torch's message advises weights_only=False: never pass that advice on
        reason = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise _fail(
            spec,
            f"weights file {path} is not a readable PyTorch state-dict file (a plain pickle "
            f"or a damaged file; the restricted unpickler stopped at: {' '.join(reason.split())})",
            "save it with torch.save(model.state_dict(), path), or convert it to safetensors",
        ) from None
    except Exception as exc:
        raise _corrupt(spec, path, "PyTorch state-dict", exc) from exc
    if not isinstance(state, Mapping):
        raise _fail(
            spec,
            f"weights file {path} holds a {type(state).__name__}, not a mapping of parameter "
            "names to tensors",
            "save it with torch.save(model.state_dict(), path)",
        )
    offending = [
        f"{k!r} is {type(v).__name__}"
        for k, v in state.items()
        if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if offending:
        raise _fail(
            spec,
            f"weights file {path} is not a mapping of parameter names to tensors: "
            + ", ".join(offending[:_SHOW_KEYS])
            + (f" … ({len(offending)} in all)" if len(offending) > _SHOW_KEYS else ""),
            "for a training checkpoint save checkpoint['state_dict'] (or the model's "
            "state_dict()) on its own",
        )
    return state


def _read_torchscript(spec: ModelSpec, path: Path, device: torch.device) -> torch.nn.Module:
    import torch

    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript; the files users have still load
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            module: torch.nn.Module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise _corrupt(spec, path, "TorchScript", exc) from exc
    return module


def _load_state(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], spec: ModelSpec
) -> None:
    """``load_state_dict(strict=True)`` with an error naming the offending keys."""
    expected = module.state_dict()
    state = dict(state)
    for key in expected:
        # BatchNorm's step counter (only used when training with momentum=None): float-only
        # safetensors files lack it, and torch's own loader accepts that; keep our key
        # check from calling it missing
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape (file vs network)", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:_SHOW_KEYS]) + (
                f" … ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else ""
            )
            problems.append(f"{label}: {shown}")
    if problems:
        raise _fail(
            spec,
            f"weights file {spec.weights} does not fit architecture '{spec.architecture}' "
            f"with kwargs {dict(spec.kwargs)}: " + "; ".join(problems),
            "check 'architecture' and 'kwargs' against how the weights were trained",
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _fail(spec, f"weights file {spec.weights} does not load: {exc}") from exc


def _load_onnx(spec: ModelSpec, device: torch.device) -> OnnxPredictor:
    import torch

    path = _weights(spec)
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("ONNX models", "onnx") from exc
    providers: list[Any] = ["CPUExecutionProvider"]
    run_on = torch.device("cpu")
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        index = device.index or 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        run_on = torch.device("cuda", index)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no provider chatter on stderr
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # InvalidProtobuf, Fail, ... : never a raw traceback
        raise _corrupt(spec, path, "ONNX", exc) from exc
    if run_on.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        run_on = torch.device("cpu")
    return OnnxPredictor(session, spec, run_on)
