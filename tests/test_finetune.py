"""Fine-tuning on corrections (synthetic, tiny models): it learns, it stops and resumes,
it registers versions with their cards, it refuses what it cannot train."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_histo_ai.annotations.model import HUMAN
from napari_histo_ai.annotations.training_set import export_training_set_sync
from napari_histo_ai.cli import main
from napari_histo_ai.errors import HistoAIError
from napari_histo_ai.models.registry import load_registry
from napari_histo_ai.models.spec import ModelSpec
from napari_histo_ai.training.augment import Augmentation, augment
from napari_histo_ai.training.common import run_to_end
from napari_histo_ai.training.datasets import load_items, training_task
from napari_histo_ai.training.finetune import (
    CHECKPOINT,
    FinetuneConfig,
    evaluate_version,
    finetune,
    finetune_sync,
)
from napari_histo_ai.training.versions import lineage, lineage_root, versions_of

from .test_training_set import make_store, memory_pyramid, point, texture

RED, BLUE = (200, 40, 40), (40, 40, 200)


def tiny_spec(**changes) -> ModelSpec:
    data = {
        "name": "blob-fcn",
        "task": "blob detection",
        "version": "1.0",
        "format": "builtin",
        "architecture": "tiny_fcn",
        "kwargs": {"in_channels": 3, "out_channels": 1, "width": 8, "depth": 2, "seed": 0},
        "io": {"patch_size": 64, "halo": 4, "overlap": 8, "mpp": 0.5},
        "outputs": [
            {"name": "blobs", "kind": "probability", "classes": ["blob"]},
            {"name": "blob centres", "kind": "points", "classes": ["blob"], "threshold": 0.5},
        ],
        "card": {"description": "untrained"},
    }
    data.update(changes)
    return ModelSpec.from_dict(data, source="<test>")


def blob_image(seed: int = 0) -> tuple[np.ndarray, list, list]:
    """Texture with red blobs (the objects) and blue blobs (look-alikes)."""
    rng = np.random.default_rng(seed)
    img = texture(768, 768, seed)
    rr, cc = np.mgrid[-4:5, -4:5]
    disk = rr**2 + cc**2 <= 16
    red, blue = [], []
    for i, (r, c) in enumerate((rng.integers(20, 748), rng.integers(20, 748)) for _ in range(120)):
        colour = RED if i % 2 == 0 else BLUE
        img[r - 4 : r + 5, c - 4 : c + 5][disk] = colour
        (red if i % 2 == 0 else blue).append((float(r) + 0.5, float(c) + 0.5))
    return img, red, blue


@pytest.fixture(scope="module")
def blob_set(tmp_path_factory) -> Path:
    """A training set: red blobs accepted / added, blue ones rejected (hard negatives)."""
    tmp = tmp_path_factory.mktemp("blobs")
    img, red, blue = blob_image()
    pyr = memory_pyramid(img, mpp=0.5)
    store = make_store(tmp, pyr, classes=("blob",))
    objs = [
        point(
            r,
            c,
            "added" if i % 5 == 0 else "accepted",
            cls="blob",
            source=HUMAN if i % 5 == 0 else "blob-fcn",
        )
        for i, (r, c) in enumerate(red)
    ]
    objs += [point(r, c, "rejected", cls="blob") for r, c in blue]
    store.add(objs)
    out = tmp / "set"
    export_training_set_sync(
        store, pyr, out, mpp=0.5, patch_size=32, targets="points", sigma_um=2.0
    )
    store.close()
    return out


def config(**changes) -> FinetuneConfig:
    base = dict(
        epochs=4,
        learning_rate=0.01,
        batch_size=16,
        threads=1,
        patience=0,
        seed=0,
        noise_sigma=0.01,
        stain_jitter=0.02,
        device="cpu",
    )
    base.update(changes)
    return FinetuneConfig(**base)


def test_finetune_improves_held_out_and_registers_a_version(blob_set, tmp_path):
    parent = tiny_spec()
    records = []
    result = run_to_end(
        finetune(
            parent,
            [blob_set],
            config=config(),
            run_dir=tmp_path / "run",
            models_dir=tmp_path / "models",
        ),
        records.append,
    )
    # the untrained parent cannot tell red from blue; the fine-tuned one can (held out)
    assert result.counts["val_hard_negative"] > 0 and result.counts["val_positive"] > 0
    # the untrained parent calls nothing (F1 0); the fine-tuned one finds the red blobs,
    # the model's misses the annotators added included, and leaves the blue ones
    assert result.before["f1"] < 0.5 < 0.9 < result.after["f1"]
    assert result.after["added_miss_recall"] > result.before["added_miss_recall"]
    assert result.after["hard_negative_fp_rate"] < 0.2
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert {r.phase for r in records} >= {"prepare", "train", "feed", "epoch", "register"}
    # the new version: registered, loadable, with its card
    spec = result.spec
    assert spec is not None and spec.name == "blob-fcn-v2" and spec.version == "2.0"
    assert spec.card.parent == "blob-fcn" and spec.card.parent_version == "1.0"
    assert spec.card.training["before"]["auc"] == pytest.approx(result.before["auc"])
    assert spec.card.training["config"]["learning_rate"] == 0.01
    assert spec.card.metrics["auc"] == pytest.approx(result.after["auc"])
    registry = load_registry(user_dir=tmp_path / "models")
    assert registry.get("blob-fcn-v2").weights == tmp_path / "models/blob-fcn-v2.safetensors"
    # plots and summary in the run folder
    run = tmp_path / "run"
    for name in ("training_curves.png", "comparison.png", "validation_pr_roc.png", "summary.json"):
        assert (run / name).stat().st_size > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "blob-fcn-v2"
    # the same validation items score both versions again, with the same numbers
    registry.add(parent)
    compared = evaluate_version([parent, registry.get("blob-fcn-v2")], [blob_set], device="cpu")
    assert compared["metrics"]["blob-fcn-v2 2.0"]["auc"] == pytest.approx(result.after["auc"])
    assert compared["metrics"]["blob-fcn 1.0"]["auc"] == pytest.approx(result.before["auc"])


def test_cancel_keeps_the_checkpoint_and_resume_finishes(blob_set, tmp_path):
    cancel = threading.Event()
    gen = finetune(
        tiny_spec(),
        [blob_set],
        config=config(),
        run_dir=tmp_path / "run",
        models_dir=tmp_path / "models",
        cancel=cancel,
    )

    def stop_after_first_epoch(progress):
        if progress.phase == "epoch":
            cancel.set()

    first = run_to_end(gen, stop_after_first_epoch)
    assert first.cancelled and first.spec is None and len(first.history) == 1
    assert (tmp_path / "run" / CHECKPOINT).is_file()
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("*.yaml"))
    resumed = finetune_sync(
        tiny_spec(),
        [blob_set],
        config=config(),
        run_dir=tmp_path / "run",
        resume=True,
        models_dir=tmp_path / "models",
    )
    assert not resumed.cancelled and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[0] == first.history[0]  # epoch 1 was not trained again
    assert resumed.spec is not None and resumed.spec.name == "blob-fcn-v2"
    # resuming with other options is refused, naming what changed
    with pytest.raises(HistoAIError, match="config"):
        finetune_sync(
            tiny_spec(),
            [blob_set],
            config=config(epochs=9),
            run_dir=tmp_path / "run",
            resume=True,
            models_dir=tmp_path / "models",
        )
    with pytest.raises(HistoAIError, match="no checkpoint"):
        finetune_sync(
            tiny_spec(), [blob_set], config=config(), run_dir=tmp_path / "new", resume=True
        )


def test_early_stopping_keeps_the_best_epoch(blob_set, tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = finetune_sync(
            tiny_spec(),
            [blob_set],
            config=config(epochs=30, learning_rate=0.05, patience=1),
            run_dir=tmp_path / "run",
            register=False,
        )
        assert torch.get_num_threads() == 2  # threads=1 held only while it trained
    finally:
        torch.set_num_threads(before)
    assert result.stopped_early and len(result.history) < 30
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]
    assert result.after["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert result.spec is None


def test_frozen_first_layers_stay_the_parents(blob_set, tmp_path):
    import torch

    from napari_histo_ai.models.loading import load_model

    parent = load_model(tiny_spec(), device="cpu").module.state_dict()
    result = finetune_sync(
        tiny_spec(),
        [blob_set],
        config=config(epochs=2, freeze_fraction=0.5),
        run_dir=tmp_path / "run",
        models_dir=tmp_path / "models",
    )
    assert result.spec is not None
    child = load_model(result.spec, device="cpu").module.state_dict()
    names = list(parent)
    frozen, trained = names[: len(names) // 2], names[len(names) // 2 :]
    assert all(torch.equal(parent[n], child[n]) for n in frozen)
    assert any(not torch.equal(parent[n], child[n]) for n in trained)


def test_versions_lineage(blob_set, tmp_path):
    models = tmp_path / "models"
    quick = config(epochs=1)
    v2 = finetune_sync(
        tiny_spec(), [blob_set], config=quick, run_dir=tmp_path / "a", models_dir=models
    ).spec
    registry = load_registry(user_dir=models)
    v3 = finetune_sync(
        registry.get("blob-fcn-v2"),
        [blob_set],
        config=quick,
        run_dir=tmp_path / "b",
        models_dir=models,
    ).spec
    registry = load_registry(user_dir=models)
    registry.add(tiny_spec())
    assert v2 is not None and v3 is not None
    assert [s.name for s in versions_of(registry, "blob-fcn-v3")] == [
        "blob-fcn",
        "blob-fcn-v2",
        "blob-fcn-v3",
    ]
    assert lineage_root(registry, "blob-fcn-v3") == "blob-fcn"
    assert [s.name for s in lineage(registry, "blob-fcn-v3")] == [
        "blob-fcn",
        "blob-fcn-v2",
        "blob-fcn-v3",
    ]
    assert registry.get("blob-fcn-v3").card.parent == "blob-fcn-v2"


def test_tile_classifier_learns_from_the_same_corrections(blob_set, tmp_path):
    spec = ModelSpec.from_dict(
        {
            "name": "blob-tiles",
            "task": "blob tiles",
            "version": "1.0",
            "format": "builtin",
            "architecture": "tiny_classifier",
            "kwargs": {"in_channels": 3, "n_classes": 2, "width": 8, "seed": 0},
            "dense": False,
            "activation": "softmax",
            "io": {"patch_size": 16, "mpp": 0.5},
            "outputs": [
                {
                    "name": "blob",
                    "kind": "class",
                    "channels": [0, 1],
                    "classes": ["no blob", "blob"],
                }
            ],
        },
        source="<test>",
    )
    assert training_task(spec).kind == "class"
    result = finetune_sync(
        spec,
        [blob_set],
        config=config(epochs=4, learning_rate=0.01),
        run_dir=tmp_path / "run",
        register=False,
    )
    assert result.after["auc"] > result.before["auc"]
    assert result.after["accuracy"] > 0.8
    assert (tmp_path / "run" / "validation_confusion_fine-tuned.png").is_file()


@pytest.mark.parametrize("name", ["mias-mass-detector", "magnification-shallownet"])
def test_untrainable_models_are_refused_with_a_reason(name):
    spec = load_registry(user_dir=Path("/nonexistent")).get(name)
    with pytest.raises(HistoAIError, match="train-default"):
        training_task(spec)


def test_bad_data_and_options_are_refused(blob_set, tmp_path):
    with pytest.raises(HistoAIError, match="not training data"):
        load_items([tmp_path], tiny_spec())
    with pytest.raises(HistoAIError, match="learning_rate"):
        FinetuneConfig(learning_rate=0)
    with pytest.raises(HistoAIError, match="loss 'ce'"):
        finetune_sync(
            tiny_spec(),
            [blob_set],
            config=config(loss="ce"),
            run_dir=tmp_path / "r",
            register=False,
        )
    grey = tiny_spec(
        io={"patch_size": 64, "mpp": 0.5, "channels": 1},
        kwargs={"in_channels": 1, "out_channels": 1, "depth": 2},
    )
    with pytest.raises(HistoAIError, match="RGB patch"):
        load_items([blob_set], grey)


def test_augment_moves_inputs_and_targets_together():
    rng = np.random.default_rng(0)
    x = rng.random((32, 3, 16, 16)).astype(np.float32)
    y = x[:, 0].copy()
    ax, ay = augment(x, y, rng, Augmentation(flips=True, rotations=True), od_space=True)
    assert np.array_equal(ax[:, 0], ay)  # the same dihedral transform on both
    assert not np.array_equal(ax, x)  # something moved
    # every output is one of the 8 dihedral images of its input
    for i in range(len(x)):
        variants = [np.rot90(x[i], k, axes=(1, 2)) for k in range(4)]
        variants += [v[..., ::-1] for v in variants]
        assert any(np.array_equal(ax[i], v) for v in variants)
    jx, _ = augment(x, None, rng, Augmentation(False, False, 0.0, 0.1), od_space=True)
    assert jx.min() >= 0 and jx.max() <= 1 and not np.allclose(jx, x)


def test_cli_train_versions_compare(blob_set, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "blob-fcn.yaml").write_text(
        json.dumps(
            {
                "models": [
                    {
                        k: v
                        for k, v in tiny_spec().to_dict().items()
                        if k not in ("source", "weights")
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("NAPARI_HISTO_AI_MODELS", str(models))
    argv = [
        "train",
        "blob-fcn",
        str(blob_set),
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--run",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "blob-fcn-v2" and len(summary["history"]) == 2
    assert main(["versions", "blob-fcn-v2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["blob-fcn", "blob-fcn-v2"]
    assert (
        rows[1]["parent"] == "blob-fcn 1.0" and rows[1]["before"]["f1"] < rows[1]["metrics"]["f1"]
    )
    plots = tmp_path / "plots"
    assert (
        main(
            [
                "compare",
                "blob-fcn",
                "blob-fcn-v2",
                "--data",
                str(blob_set),
                "--device",
                "cpu",
                "--plots",
                str(plots),
            ]
        )
        == 0
    )
    compared = json.loads(capsys.readouterr().out)
    assert set(compared["metrics"]) == {"blob-fcn 1.0", "blob-fcn-v2 2.0"}
    assert "curves" not in compared
    assert (plots / "compare_metrics.png").is_file() and (plots / "compare_pr_roc.png").is_file()
    # a model the data cannot train: one line, exit 2
    assert main(["train", "mias-mass-detector", str(blob_set)]) == 2
    assert "train-default mammogram" in capsys.readouterr().err
