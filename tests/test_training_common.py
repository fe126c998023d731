"""The helpers every training module shares: atomic files, weights + record, progress."""

from __future__ import annotations

import json

import pytest

from napari_histo_ai.training.common import (
    atomic_write,
    print_progress,
    run_to_end,
    save_weights_and_record,
    sha256,
)


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "w.json"
    target.write_text("good", encoding="utf-8")

    def broken(tmp):
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text(encoding="utf-8") == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["w.json"]  # no temporary left


def test_weights_and_record_belong_together(tmp_path):
    import torch
    from safetensors.torch import load_file

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    record: dict = {"metrics": {"f1": 0.5}}
    path = tmp_path / "m-v1.safetensors"
    save_weights_and_record(net, path, {"architecture": "x"}, record)
    saved = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["weights_sha256"] == sha256(path) and saved["metrics"] == {"f1": 0.5}
    assert saved["weights_bytes"] == path.stat().st_size
    state = load_file(str(path))
    assert "1.num_batches_tracked" not in state  # integer counters are dropped
    assert all(t.dtype == torch.float32 for t in state.values())


def test_run_to_end_returns_the_record_and_reports_each_step(capsys):
    def train():
        for step in range(3):
            yield {"epoch": 0, "step": step + 1, "steps": 3, "loss": 1.0 / (step + 1)}
        return {"done": True}

    seen: list[dict] = []
    assert run_to_end(train(), seen.append) == {"done": True}
    assert [r["step"] for r in seen] == [1, 2, 3]
    print_progress(seen[1], "epoch", "step", "loss")
    assert capsys.readouterr().err.strip() == "epoch 0  step 2/3  loss 0.5000"
