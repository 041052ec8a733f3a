"""Tissue segmenter: k-fold training, checkpoints, mask prediction, ROI evaluation and clear errors.

The data are tiny synthetic B-scans made here (dark air above a wavy surface, bright speckled
tissue below it, mask = at/below the surface), so these tests depend on no other data generator.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from savlt.cli import main
from savlt.config import load_config
from savlt.data.discover import DataError, scan_data
from savlt.data.imageio import ImageDecodeError, read_image, read_mask
from savlt.errors import SavltError
from savlt.seg import SegmenterError, SegmenterSpec, TissueSegmenter, load_segmenter, save_segmenter
from savlt.seg.evaluate import evaluate_roi, write_roi_quality
from savlt.seg.metrics import dice_iou
from savlt.seg.model import build_model
from savlt.seg.predict import predict_dataset
from savlt.seg.pretrained import load_encoder_weights
from savlt.seg.samples import masked_records
from savlt.seg.train import augment, train_segmenter

CLASSES = ("cyst", "cancer")
EPOCHS = 8


def make_scan(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 H×W grayscale B-scan, bool tissue mask): a wavy surface, bright tissue fading with depth."""
    x = np.arange(width)
    surface = height * (
        0.22 + 0.08 * np.sin(2 * np.pi * x / width * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
    )
    rows = np.arange(height)[:, None]
    mask = rows >= surface[None, :]
    depth = np.clip(rows - surface[None, :], 0, None) / height
    tissue = 200 * np.exp(-1.5 * depth) * rng.uniform(0.6, 1.0, (height, width))
    air = rng.uniform(0, 30, (height, width))
    return np.where(mask, tissue, air).clip(0, 255).astype(np.uint8), mask


def write_center(root: Path, center: str, count: int, with_masks: int, seed: int, size=(80, 96)) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        cls = CLASSES[i % len(CLASSES)]
        image, mask = make_scan(rng, *size)
        (root / center / "images" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / center / "images" / cls / f"{center}_{i:02d}.png")
        if i < with_masks:
            (root / center / "masks" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                root / center / "masks" / cls / f"{center}_{i:02d}.png"
            )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_center(root, "mixed", count=14, with_masks=12, seed=1)  # two images without a mask
    write_center(root, "xiangya", count=4, with_masks=4, seed=2, size=(100, 72))  # never trained on
    write_center(root, "huaxi", count=2, with_masks=0, seed=3)  # no masks folder at all
    return root


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    argv = ["seg", "train", "--data", str(data_root), "--centers", "mixed", "--arch", "unet"]
    argv += ["--encoder", "resnet18", "--folds", "2", "--epochs", str(EPOCHS), "--image-size", "64"]
    argv += ["--out", str(out), "--set", "seg.batch_size=2", "-q"]
    assert main(argv) == 0
    return out


def cfg_for(root: Path, *overrides: str):
    return load_config(None, overrides, {"data.root": root})


def copy_data(data_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data_root, tmp_path / "data"))


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_reaches_dice_and_writes_its_folder(trained, data_root, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    assert all(f["dice"] > 0.8 and f["iou"] > 0.7 for f in summary["folds"]), summary["folds"]
    assert summary["dice"]["mean"] > 0.8
    assert summary["images"] == 12 and summary["skipped_without_mask"] == 2
    for fold in (0, 1):
        history = json.loads((trained / f"fold{fold}" / "history.json").read_text())
        assert [e["epoch"] for e in history["epochs"]] == list(range(1, EPOCHS + 1))
        assert {"train_loss", "val_loss", "val_dice", "val_iou", "lr"} <= set(history["epochs"][0])
        best = max(history["epochs"], key=lambda e: e["val_dice"])
        spec = json.loads((trained / f"fold{fold}" / "segmenter.json").read_text())
        assert spec["trained"]["epoch"] == best["epoch"] == history["best_epoch"]
    folds = json.loads((trained / "folds.json").read_text())
    val0, val1 = set(folds["fold0"]["val"]), set(folds["fold1"]["val"])
    assert not val0 & val1 and len(val0 | val1) == 12 and set(folds["fold0"]["train"]) == val1
    cfg = load_config(trained / "config.yaml")
    assert (cfg.seg.arch, cfg.seg.folds, cfg.seg.epochs, cfg.seg.batch_size) == ("unet", 2, EPOCHS, 2)
    assert cfg.seg.centers == ["mixed"] and cfg.data.root == str(data_root)
    report = (trained / "report.md").read_text()
    assert "mean ± std" in report and f"{summary['dice']['mean']:.4f}" in report
    assert (trained / "curves.png").stat().st_size > 1000


def test_images_without_mask_are_counted_in_one_log_line(data_root, caplog):
    scan = scan_data(data_root, cfg_for(data_root).class_map(), ["mixed", "huaxi"])
    with caplog.at_level(logging.INFO, logger="savlt.seg.samples"):
        records = masked_records(scan)
    assert len(records) == 12
    lines = [r.getMessage() for r in caplog.records if "without a mask" in r.getMessage()]
    assert len(lines) == 1 and "skipped 4 of 16" in lines[0]


def test_training_is_deterministic_for_a_seed(data_root, tmp_path):
    cfg = cfg_for(data_root, "seg.centers=[xiangya]", "seg.folds=2", "seg.epochs=1", "seg.image_size=32")
    runs = [train_segmenter(cfg, tmp_path / name, progress=False) for name in ("a", "b")]
    scores = [[(f.best_epoch, f.dice, f.iou) for f in run.folds] for run in runs]
    assert scores[0] == scores[1]
    for fold in (0, 1):
        a = load_file(tmp_path / "a" / f"fold{fold}" / "model.safetensors")
        b = load_file(tmp_path / "b" / f"fold{fold}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_augmentation_moves_image_and_mask_together():
    masks = (torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    images = masks.repeat(1, 3, 1, 1)  # the image shows its own mask
    new_images, new_masks = augment(images, masks, torch.Generator().manual_seed(1))
    assert torch.equal(new_images[:, 0] > 0.5, new_masks[:, 0] > 0.5)
    assert not torch.equal(new_masks, masks)  # some samples were flipped
    assert not torch.equal(new_images[masks.repeat(1, 3, 1, 1) > 0], images[masks.repeat(1, 3, 1, 1) > 0])


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.slow
def test_checkpoint_predicts_masks_of_each_input_size(trained, data_root):
    segmenter = load_segmenter(trained / "fold0", device="cpu")
    assert (segmenter.spec.arch, segmenter.spec.input_size) == ("unet", (64, 64))
    rng = np.random.default_rng(7)
    scans = [make_scan(rng, h, w) for h, w in ((50, 70), (80, 96), (120, 64))]
    masks = segmenter.predict_masks([np.repeat(img[:, :, None], 3, axis=2) for img, _ in scans])
    assert [m.shape for m in masks] == [(50, 70), (80, 96), (120, 64)]
    assert all(m.dtype == bool for m in masks)
    dice, _ = zip(  # noqa: B905 - transposing pairs
        *(
            dice_iou(torch.from_numpy(m)[None], torch.from_numpy(t)[None])
            for m, (_, t) in zip(masks, scans, strict=True)
        )
    )
    assert min(float(d) for d in dice) > 0.8
    assert (
        load_segmenter(trained).spec.trained["fold"]
        == json.loads((trained / "summary.json").read_text())["best_fold"]
    )


def test_checkpoint_round_trip_gives_the_same_masks(tmp_path):
    torch.manual_seed(0)
    model = build_model("linknet", "resnet18")
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))  # move BatchNorm statistics away from their defaults
    spec = SegmenterSpec("linknet", "resnet18", (64, 64), threshold=0.5, trained={"note": "in memory"})
    in_memory = TissueSegmenter(model, spec, device="cpu")
    images = [
        np.random.default_rng(i).integers(0, 256, (40 + 10 * i, 90, 3), dtype=np.uint8) for i in range(3)
    ]
    save_segmenter(in_memory, tmp_path / "ckpt")
    loaded = load_segmenter(tmp_path / "ckpt")
    assert loaded.spec == spec
    for a, b in zip(in_memory.probabilities(images), loaded.probabilities(images), strict=True):
        assert np.array_equal(a, b)
    masks = in_memory.predict_masks(images)
    assert all(np.array_equal(a, b) for a, b in zip(masks, loaded.predict_masks(images), strict=True))
    assert 0 < np.mean(np.concatenate([m.ravel() for m in masks])) < 1  # a real mask, not all one value


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    save_segmenter(
        TissueSegmenter(build_model("unet", "resnet18"), SegmenterSpec("unet", "resnet18", (64, 64))),
        tmp_path,
    )
    spec = json.loads((tmp_path / "segmenter.json").read_text())
    (tmp_path / "segmenter.json").write_text(json.dumps({**spec, "arch": "linknet"}))
    with pytest.raises(SegmenterError, match="do not fit a linknet") as err:
        load_segmenter(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(SegmenterError, match="not a segmenter checkpoint"):
        load_segmenter(tmp_path.parent)


def test_local_encoder_weights_file_is_loaded(tmp_path):
    source = build_model("unet", "resnet18")
    save_file(
        {k: v.contiguous() for k, v in source.encoder.state_dict().items()}, tmp_path / "enc.safetensors"
    )
    target = build_model("unet", "resnet18")
    load_encoder_weights(target, "resnet18", str(tmp_path / "enc.safetensors"))
    assert all(torch.equal(v, target.encoder.state_dict()[k]) for k, v in source.encoder.state_dict().items())


@pytest.mark.timeout(60)
def test_imagenet_weights_offline_is_a_clear_error(data_root, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = [
        "seg",
        "train",
        "--data",
        str(data_root),
        "--encoder-weights",
        "imagenet",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "'resnet18'" in err
        and "local Hugging Face cache" in err
        and "hf download smp-hub/resnet18.imagenet" in err
    )
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ predict


@pytest.mark.slow
def test_predict_writes_the_masks_layout_and_a_preview(trained, data_root, tmp_path, capsys):
    out = tmp_path / "pred"
    argv = ["seg", "predict", str(trained / "fold1"), "--data", str(data_root), "--centers", "xiangya,huaxi"]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    assert "wrote 6 mask(s)" in capsys.readouterr().out
    for center, count in (("xiangya", 4), ("huaxi", 2)):
        for image_path in sorted((data_root / center / "images").rglob("*.png"))[:count]:
            cls = image_path.parent.name
            mask = read_mask(out / center / "masks" / cls / image_path.name, read_image(image_path).shape[:2])
            assert 0.4 < mask.mean() < 0.95
            assert set(np.unique(np.asarray(Image.open(out / center / "masks" / cls / image_path.name)))) <= {
                0,
                255,
            }
    assert (out / "mask_preview.png").stat().st_size > 1000


@pytest.mark.slow
def test_predict_into_the_data_root_keeps_ground_truth(trained, data_root, tmp_path):
    root = copy_data(data_root, tmp_path)
    truth = root / "mixed" / "masks" / "cyst" / "mixed_00.png"
    before = truth.read_bytes()
    segmenter = load_segmenter(trained / "fold0")
    scan = scan_data(root, cfg_for(root).class_map(), ["mixed"])
    summary = predict_dataset(segmenter, scan, progress=False)
    assert summary.written == 2 and len(summary.skipped) == 12 and truth in summary.skipped
    assert "use --overwrite" in summary.describe()
    assert truth.read_bytes() == before
    assert (root / "mixed" / "masks" / "cyst" / "mixed_12.png").is_file()
    summary = predict_dataset(
        segmenter, scan_data(root, cfg_for(root).class_map(), ["mixed"]), overwrite=True, progress=False
    )
    # --overwrite replaces the two masks SAVLT predicted, never the ground truth
    assert summary.written == 2 and not summary.skipped and len(summary.kept) == 12 and truth in summary.kept
    assert truth.read_bytes() == before and "never replaced" in summary.describe()


# ------------------------------------------------------------------------------------------ evaluate


@pytest.mark.slow
def test_evaluate_scores_segmenter_and_classical_side_by_side(trained, data_root, tmp_path):
    scan = scan_data(data_root, cfg_for(data_root).class_map(), ["xiangya"])
    quality = evaluate_roi(scan, load_segmenter(trained / "fold0"), progress=False)
    rows = {s["source"]: s for s in (src.summary() for src in quality.sources)}
    assert list(rows) == ["segmenter", "classical"]
    assert all(r["images"] == 4 for r in rows.values())
    assert rows["segmenter"]["dice"] > 0.8 and rows["classical"]["dice"] > 0.8
    assert 0 <= rows["segmenter"]["band_error_mean"] <= rows["segmenter"]["band_error_max"] < 0.2
    assert rows["segmenter"]["fallback_share"] == 0.0
    json_path, md_path = write_roi_quality(quality, tmp_path, trained / "fold0")
    assert len(json.loads(json_path.read_text())["summary"]) == 2
    assert "| segmenter |" in md_path.read_text() and "| classical |" in md_path.read_text()


def test_evaluate_without_segmenter_is_classical_only(data_root, tmp_path, capsys):
    assert (
        main(
            ["seg", "evaluate", "--data", str(data_root), "--centers", "mixed", "--out", str(tmp_path), "-q"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "classical" in printed and "segmenter" not in printed.split("written:")[0]
    summary = json.loads((tmp_path / "roi_quality.json").read_text())["summary"]
    assert [s["source"] for s in summary] == ["classical"] and summary[0]["images"] == 12


# ------------------------------------------------------------------------------------------ data errors


def _train_error(root: Path, tmp_path: Path, *extra: str) -> SavltError:
    cfg = cfg_for(root, "seg.folds=2", "seg.epochs=1", "seg.image_size=32", *extra)
    with pytest.raises(SavltError) as err:
        train_segmenter(cfg, tmp_path / "out", progress=False)
    return err.value


def test_mask_of_another_size_names_the_file(data_root, tmp_path):
    root = copy_data(data_root, tmp_path)
    bad = root / "mixed" / "masks" / "cancer" / "mixed_01.png"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(bad)
    err = _train_error(root, tmp_path, "seg.centers=[mixed]")
    assert isinstance(err, ImageDecodeError) and str(bad) in str(err) and "differs from its image" in str(err)


def test_non_binary_mask_names_the_file(data_root, tmp_path):
    root = copy_data(data_root, tmp_path)
    bad = root / "xiangya" / "masks" / "cyst" / "xiangya_00.png"
    Image.fromarray(np.full((100, 72), 128, dtype=np.uint8)).save(bad)
    err = _train_error(root, tmp_path, "seg.centers=[xiangya]")
    assert str(bad) in str(err) and "not binary" in str(err)


def test_centers_without_masks_are_a_clear_error(data_root, tmp_path, capsys):
    err = _train_error(data_root, tmp_path, "seg.centers=[huaxi]")
    assert isinstance(err, DataError) and str(data_root / "huaxi" / "masks") in str(err)
    argv = ["seg", "train", "--data", str(data_root), "--centers", "huaxi", "--out", str(tmp_path / "cli")]
    assert main(argv) == 2
    assert "has a tissue mask" in capsys.readouterr().err
