"""Data layer: discovery, decoding, class mapping, splits, few-shot draws, dataset, data check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import write_mask, write_png
from PIL import Image

from savlt.classes import DEFAULT_CLASSES, ClassMap, UnknownClassError, normalise_class_name
from savlt.cli import main
from savlt.config import load_config
from savlt.data.check import check_dataset
from savlt.data.dataset import OCTDataset
from savlt.data.discover import DataError, scan_dataset
from savlt.data.imageio import ImageDecodeError, read_image, read_mask
from savlt.data.prepare import resolve_few_shot, resolve_split
from savlt.data.splits import load_split, ratio_split, sample_few_shot
from savlt.data.transforms import eval_transform, train_transform
from savlt.normalization import NORMALIZATION

CLASSES = ClassMap(tuple(DEFAULT_CLASSES))


# ---------------------------------------------------------------- class names


def test_class_names_match_by_normalised_name_and_alias() -> None:
    assert normalise_class_name(" High-Grade_Squamous intraepithelial-LESION ") == normalise_class_name(
        "high-grade_squamous_intraepithelial_lesion"
    )
    assert CLASSES.resolve("Mild Inflammation") == "mild_inflammation"
    aliased = ClassMap(tuple(DEFAULT_CLASSES), (("HSIL", "high-grade_squamous_intraepithelial_lesion"),))
    assert aliased.resolve("hsil") == "high-grade_squamous_intraepithelial_lesion"
    with pytest.raises(UnknownClassError, match=r"'tumour'.*known classes: mild_inflammation, cyst"):
        CLASSES.resolve("tumour")
    with pytest.raises(ValueError, match="not a configured class"):
        ClassMap(("a", "b"), (("x", "c"),))


# ---------------------------------------------------------------- discovery


def test_scan_finds_both_layouts_and_ignores_hidden(small_tree: Path) -> None:
    (small_tree / "mixed" / "images" / "cyst" / ".DS_Store").write_text("x")
    write_png(small_tree / "mixed" / "images" / "cyst" / ".hidden.png")
    (small_tree / ".savlt").mkdir()
    scan = scan_dataset(small_tree, CLASSES)
    assert sorted(scan.centers) == ["ext", "mixed"]
    mixed = scan.center("mixed")
    assert mixed.counts() == {"cyst": 3, "cancer": 3}
    assert all(r.mask_path is not None for r in mixed.records)
    assert {r.rel for r in mixed.records if r.label == "cyst"} == {
        f"images/cyst/cyst_{i}.png" for i in range(3)
    }
    ext = scan.center("ext")
    assert ext.class_folders == {"CANCER": "cancer", "Mild Inflammation": "mild_inflammation"}
    assert "ectropion" in ext.missing_classes
    assert not scan.problems


def test_extensions_are_case_insensitive_and_other_files_reported(small_tree: Path) -> None:
    folder = small_tree / "mixed" / "images" / "cyst"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / "upper.PNG")
    (folder / "notes.txt").write_text("not an image")
    scan = scan_dataset(small_tree, CLASSES)
    assert scan.center("mixed").counts()["cyst"] == 4
    assert [p.kind for p in scan.problems] == ["not_an_image"]
    assert "notes.txt" in scan.problems[0].message


def test_unknown_class_folder_is_named_and_refused_for_training(small_tree: Path) -> None:
    write_png(small_tree / "mixed" / "images" / "tumour" / "x.png")
    scan = scan_dataset(small_tree, CLASSES)
    assert [p.kind for p in scan.problems] == ["unknown_class"]
    with pytest.raises(DataError, match=r"unknown class folder 'tumour'.*known classes"):
        scan.require_usable(["mixed"])
    scan.require_usable(["ext"])  # the other center is still usable
    assert scan.center("mixed").counts() == {"cyst": 3, "cancer": 3}  # nothing else lost


def test_missing_center_and_root_are_named(small_tree: Path) -> None:
    with pytest.raises(DataError, match=r"center 'nowhere' not found.*ext, mixed"):
        scan_dataset(small_tree, CLASSES, ["nowhere"])
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(small_tree / "absent", CLASSES)


# ---------------------------------------------------------------- decoding


def test_16bit_and_float_tiffs_are_rescaled_by_their_own_range(tmp_path: Path) -> None:
    ramp = np.linspace(1000, 40000, 64 * 32).reshape(32, 64).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", ramp)
    image = read_image(tmp_path / "a.tif")
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    assert np.array_equal(image[..., 0], image[..., 2])  # grayscale replicated
    tifffile.imwrite(tmp_path / "b.tiff", ramp.astype(np.float32) / 7.0)
    floats = read_image(tmp_path / "b.tiff")
    assert floats.min() == 0 and floats.max() == 255
    assert np.abs(floats.astype(int) - image.astype(int)).max() <= 1  # same range, float rounding


def test_rgb_png_and_palette_decode(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (20, 30, 3)


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("hello, I am text"), "not a recognised image"),
        (lambda p: p.write_bytes(_png_bytes()[:200]), "truncated"),
    ],
    ids=["zero-byte", "text-named-png", "truncated"],
)
def test_bad_files_give_an_error_naming_the_file(tmp_path: Path, writer, message: str) -> None:
    path = tmp_path / "bad.png"
    writer(path)
    with pytest.raises(ImageDecodeError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_unsupported_pixel_layout_is_an_error(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "five.tif",
        np.zeros((16, 16, 5), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    with pytest.raises(ImageDecodeError, match="unsupported pixel layout"):
        read_image(tmp_path / "five.tif")


def test_masks_are_checked_for_values_and_size(tmp_path: Path) -> None:
    good = write_mask(tmp_path / "m.png", size=(10, 12), top=4)
    mask = read_mask(good, (10, 12))
    assert mask.dtype == bool and mask[:4].sum() == 0 and mask[4:].all()
    with pytest.raises(ImageDecodeError, match=r"mask size 12×10 differs from its image \(13×10\)"):
        read_mask(good, (10, 13))
    Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12)).save(tmp_path / "grey.png")
    with pytest.raises(ImageDecodeError, match="not binary"):
        read_mask(tmp_path / "grey.png")


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- splits and few-shot


def test_ratio_split_is_seeded_per_class_and_disjoint(synth_root: Path) -> None:
    center = scan_dataset(synth_root, CLASSES, ["mixed"]).center("mixed")
    split = ratio_split(center, [0.45, 0.15, 0.40], seed=0)
    assert split == ratio_split(center, [0.45, 0.15, 0.40], seed=0)
    assert split.train != ratio_split(center, [0.45, 0.15, 0.40], seed=1).train
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(map(len, parts)) == len(center.records) and not (parts[0] & parts[1] or parts[0] & parts[2])
    by_rel = center.by_rel()
    for label in DEFAULT_CLASSES:  # 8 per class: 4 train (round 3.6), 1 val (round 1.2), 3 test
        assert sum(by_rel[r].label == label for r in split.train) == 4
        assert sum(by_rel[r].label == label for r in split.test) == 3
    assert all(r.startswith("images/") for r in split.train)


def test_split_and_few_shot_are_cached_as_json(synth_root: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"data.root={synth_root}", f"data.cache_dir={tmp_path}"])
    center = scan_dataset(synth_root, CLASSES, ["mixed"]).center("mixed")
    split = resolve_split(center, tmp_path, cfg.data.split_ratios, cfg.data.split_seed)
    cached = list(tmp_path.glob("split_mixed_*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["test"] == split.test
    few = resolve_few_shot(split, center, shots=2, seed=5, cache=tmp_path)
    assert len(few.train) == 2 * len(DEFAULT_CLASSES)
    assert len(few.val) == len(DEFAULT_CLASSES)  # min(K, 16) per class, capped by the 1 val image each
    assert set(few.train) <= set(split.train) and set(few.val) <= set(split.val)
    again = resolve_few_shot(split, center, shots=2, seed=5, cache=tmp_path)
    assert again.train == few.train
    assert sample_few_shot(split, center, 2, 5).train == few.train  # same seed, same lists
    assert sample_few_shot(split, center, 2, 6).train != few.train


def test_few_shot_with_too_few_images_draws_with_replacement_and_warns(synth_root: Path, caplog) -> None:
    center = scan_dataset(synth_root, CLASSES, ["mixed"]).center("mixed")
    split = ratio_split(center, [0.45, 0.15, 0.40], seed=0)
    with caplog.at_level(logging.WARNING):
        few = sample_few_shot(split, center, shots=10, seed=0)
    assert len(few.train) == 50 and len(set(few.train)) == 20
    assert "fewer than 10 shots" in caplog.text


def test_user_split_file_paths_are_checked(small_tree: Path, tmp_path: Path) -> None:
    center = scan_dataset(small_tree, CLASSES, ["mixed"]).center("mixed")
    good = {
        "train": ["images/cyst/cyst_0.png", ["images/cancer/cancer_0.png", 4, "cancer"]],
        "val": [],
        "test": ["images/cyst/cyst_1.png"],
    }
    (tmp_path / "good.json").write_text(json.dumps(good))
    split = load_split(tmp_path / "good.json", center)
    assert split.train == ["images/cyst/cyst_0.png", "images/cancer/cancer_0.png"]
    cases = {
        "escape": ({"train": ["../ext/CANCER/a.png"]}, "escapes the center folder"),
        "absolute": ({"train": [str(small_tree / "mixed/images/cyst/cyst_0.png")]}, "must be relative"),
        "missing": ({"train": ["images/cyst/nope.png"]}, "does not exist"),
        "twice": ({"train": ["images/cyst/cyst_0.png"], "test": ["images/cyst/cyst_0.png"]}, "both"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(DataError, match=message) as info:
            load_split(path, center)
        assert str(path) in str(info.value)
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split(tmp_path / "broken.json", center)


# ---------------------------------------------------------------- dataset and transforms


def test_dataset_applies_one_geometry_to_image_and_mask(small_tree: Path) -> None:
    center = scan_dataset(small_tree, CLASSES, ["mixed"]).center("mixed")
    records = center.records
    masks = {r.path: read_mask(r.mask_path) for r in records}
    ds = OCTDataset(
        records, list(DEFAULT_CLASSES), train_transform(64, (0.75, 1.0), True, NORMALIZATION["clip"]), masks
    )
    image, mask, label, path = ds[(0, 123)]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and set(mask.unique().tolist()) <= {0, 1}
    assert path == str(records[0].path) and label == list(DEFAULT_CLASSES).index(records[0].label)
    again = ds[(0, 123)]
    assert torch.equal(again[0], image) and torch.equal(again[1], mask)  # same seed, same crop
    # The mask's tissue boundary moves with the image: dark air rows are exactly the mask's zeros.
    dark = image[0].mean(dim=1) < image[0].mean()
    assert torch.equal(dark, mask.float().mean(dim=1) < 0.5)


def test_eval_transform_is_deterministic(small_tree: Path) -> None:
    records = scan_dataset(small_tree, CLASSES, ["mixed"]).center("mixed").records
    ds = OCTDataset(records, list(DEFAULT_CLASSES), eval_transform(32, NORMALIZATION["clip"]))
    assert torch.equal(ds[1][0], ds[1][0])
    assert ds[1][1].all()  # no masks given: the whole image counts as tissue


# ---------------------------------------------------------------- data check


def test_data_check_reports_every_problem_by_path(small_tree: Path, capsys) -> None:
    assert main(["data", "check", str(small_tree), "-q"]) == 0
    folder = small_tree / "mixed" / "images" / "cyst"
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    (folder / "cut.png").write_bytes(_png_bytes()[:150])
    tifffile.imwrite(folder / "deep.tif", np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 20)
    write_png(small_tree / "mixed" / "images" / "tumour" / "t.png")
    (small_tree / "mixed" / "images" / "ectropion").mkdir()
    write_mask(small_tree / "mixed" / "masks" / "cyst" / "orphan.png")
    write_mask(small_tree / "mixed" / "masks" / "cyst" / "cyst_2.png", size=(20, 20))
    report = check_dataset(small_tree, CLASSES, progress=False)
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == [
        "bad_mask",
        "empty_class",
        "empty_file",
        "mask_without_image",
        "unknown_class",
        "unreadable_image",
        "unreadable_image",
    ]
    named = " ".join(p.message for p in report.problems)
    for name in ("zero.png", "text.png", "cut.png", "tumour", "ectropion", "orphan.png", "cyst_2.png"):
        assert name in named
    assert "deep.tif" not in named  # a 16-bit TIFF is fine
    assert report.scan.center("mixed").counts()["cyst"] == 7  # every file counted, nothing dropped
    assert main(["data", "check", str(small_tree), "-q"]) == 1
    out = capsys.readouterr().out
    assert "7 problem(s)" in out and "Mild Inflammation -> mild_inflammation" in out
