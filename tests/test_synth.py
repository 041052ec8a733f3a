"""Tests of the synthetic multi-center OCT generator (small images, few per class, so the suite stays fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from savlt.classes import DEFAULT_CLASSES
from savlt.data.imageio import read_image
from savlt.data.synth import (
    DEFAULT_CENTERS,
    SynthError,
    generate_dataset,
    image_rng,
    render_bscan,
    scanner_signature,
    write_preview,
)
from savlt.io import LOCK_NAME, MANIFEST_NAME

SIZE = (96, 128)
PER_CLASS = 3
SUFFIX = {"mixed": ".png", "xiangya": ".tif", "huaxi": ".jpg"}
HSIL = "high-grade_squamous_intraepithelial_lesion"
# File stems use the project's short class names, lower-cased.
STEM_NAMES = {
    "mild_inflammation": "inflammation",
    "cyst": "cyst",
    "ectropion": "ectropion",
    HSIL: "hsil",
    "cancer": "cancer",
}


def _generate(out: Path, **kwargs) -> object:
    args = {"seed": 1, "per_class": PER_CLASS, "size": SIZE, "progress": False} | kwargs
    return generate_dataset(out, **args)


def _files(root: Path) -> dict[str, bytes]:
    """The generated files' bytes (the manifest, which lists them, and the folder's lock left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, LOCK_NAME)
    }


def _read_png(path: Path) -> np.ndarray:
    """The pixels as stored (dtype and channels untouched), to check the file format itself."""
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, _generate(out)


def test_layout_counts_and_summary(dataset: tuple[Path, object]) -> None:
    out, summary = dataset
    assert summary.out == out
    assert summary.total == len(DEFAULT_CENTERS) * len(DEFAULT_CLASSES) * PER_CLASS
    assert summary.seconds > 0
    for center in DEFAULT_CENTERS:
        assert summary.counts[center] == dict.fromkeys(DEFAULT_CLASSES, PER_CLASS)
        for class_name in DEFAULT_CLASSES:
            images = sorted((out / center / "images" / class_name).iterdir())
            masks = sorted((out / center / "masks" / class_name).iterdir())
            expected = [f"{center}_{STEM_NAMES[class_name]}_{i:04d}" for i in range(PER_CLASS)]
            assert [p.stem for p in images] == expected
            assert {p.suffix for p in images} == {SUFFIX[center]}
            assert [p.name for p in masks] == [f"{stem}.png" for stem in expected]
    # files are written atomically: no temporary files are left behind, only the folder's lock
    assert [p.name for p in out.rglob(".*")] == [LOCK_NAME]


def test_preview_is_a_small_labelled_png(dataset: tuple[Path, object]) -> None:
    out, summary = dataset
    assert summary.preview == out / "preview.png"
    with Image.open(summary.preview) as sheet:
        assert sheet.format == "PNG"
        width, height = sheet.size
        pixels = np.asarray(sheet)
    assert width > 5 * 100 and height > 3 * 100  # room for 5 class columns and 3 center blocks
    assert summary.preview.stat().st_size < 2 * 1024 * 1024
    assert pixels[:30].max() == 255  # white header text (class labels)


def test_file_formats_per_center(dataset: tuple[Path, object]) -> None:
    out, _ = dataset
    png = _read_png(next((out / "mixed" / "images" / "cyst").iterdir()))
    assert png.dtype == np.uint8 and png.shape == SIZE
    tif = tifffile.imread(next((out / "xiangya" / "images" / "cyst").iterdir()))
    assert tif.dtype == np.uint16 and tif.shape == SIZE
    assert 255 < tif.max() <= 40000  # partial 16-bit range: readers must rescale by the image's range
    with Image.open(next((out / "huaxi" / "images" / "cyst").iterdir())) as jpg:
        assert (jpg.format, jpg.mode, jpg.size) == ("JPEG", "L", SIZE[::-1])
    rescaled = read_image(next((out / "xiangya" / "images" / "cyst").iterdir()))
    assert rescaled.dtype == np.uint8 and rescaled.min() == 0 and rescaled.max() == 255


def test_masks_are_binary_same_shape_and_fill_down_from_the_surface(dataset: tuple[Path, object]) -> None:
    out, _ = dataset
    for center in DEFAULT_CENTERS:
        for class_name in DEFAULT_CLASSES:
            for image_path in (out / center / "images" / class_name).iterdir():
                mask = _read_png(out / center / "masks" / class_name / f"{image_path.stem}.png")
                assert mask.dtype == np.uint8 and mask.shape == read_image(image_path).shape[:2]
                assert set(np.unique(mask)) == {0, 255}
                # Once a column is tissue it stays tissue to the bottom; air is always on top.
                assert (np.diff(mask.astype(np.int16), axis=0) >= 0).all()
                assert mask[0].max() == 0 and mask[-1].min() == 255


def test_mask_edge_is_the_drawn_surface() -> None:
    for class_index, class_name in enumerate(DEFAULT_CLASSES):
        image, mask = render_bscan("mixed", class_name, image_rng(5, "mixed", class_index, 0), SIZE)
        surface = mask.argmax(axis=0)
        columns = np.arange(SIZE[1])
        first_tissue = image[surface, columns]
        last_air = image[surface - 1, columns]
        # Tissue starts exactly at the mask: the row above is plain air noise, the mask's first row is bright.
        assert np.median(first_tissue) > 0.4
        assert np.percentile(last_air, 90) < 0.3
        assert abs(float(last_air.mean()) - float(image[~mask].mean())) < 0.03


def test_air_band_depth_varies_across_width_and_images() -> None:
    surfaces = [
        render_bscan("mixed", "mild_inflammation", image_rng(0, "mixed", 0, i), SIZE)[1].argmax(axis=0)
        for i in range(6)
    ]
    assert np.mean([s.max() - s.min() for s in surfaces]) >= 2  # tilted / curved surface
    assert len({int(s.min()) for s in surfaces}) > 1  # air depth changes from image to image


def test_same_seed_gives_identical_bytes_and_other_seed_differs(
    dataset: tuple[Path, object], tmp_path: Path
) -> None:
    out, _ = dataset
    _generate(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(out)
    _generate(tmp_path / "other", seed=2, centers=("mixed",), preview=False)
    first = _files(tmp_path / "other")
    changed = [name for name, data in first.items() if "images" in name and data != _files(out)[name]]
    assert len(changed) == len(DEFAULT_CLASSES) * PER_CLASS


def test_images_do_not_depend_on_what_else_is_generated(dataset: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = dataset
    _generate(tmp_path / "alone", per_class=1, centers=("huaxi",), preview=False)
    alone = _files(tmp_path / "alone")
    assert alone and all(data == (out / name).read_bytes() for name, data in alone.items())


def test_unknown_centers_get_a_stable_signature_and_png(tmp_path: Path) -> None:
    centers = ("clinic-7", "Beijing.2")
    summary = _generate(tmp_path, per_class=1, centers=centers, preview=False)
    assert summary.preview is None and summary.total == len(DEFAULT_CLASSES) * 2
    for center in centers:
        images = sorted((tmp_path / center / "images").rglob("*"))
        assert {p.suffix for p in images if p.is_file()} == {".png"}
    assert scanner_signature("clinic-7") != scanner_signature("Beijing.2")
    assert scanner_signature("clinic-7") != scanner_signature("mixed")
    # Derived from crc32, not the salted hash(): another process with another hash seed agrees.
    code = "from savlt.data.synth import scanner_signature; print(repr(scanner_signature('clinic-7')))"
    env = os.environ | {"PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == repr(scanner_signature("clinic-7"))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"per_class": 0}, "per_class must be >= 1, got 0"),
        ({"per_class": 2.5}, "per_class must be a whole number >= 1, got 2.5"),
        ({"per_class": True}, "per_class must be a whole number"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"centers": ()}, "centers is empty"),
        ({"centers": "mixed"}, "centers must be a list of center names"),
        ({"centers": ("mixed", "mixed")}, "duplicate center name 'mixed'"),
        ({"centers": ("Huaxi", "huaxi")}, "duplicate center name 'huaxi'"),
        ({"centers": ("",)}, "bad center name ''"),
        ({"centers": ("a/b",)}, "bad center name 'a/b'"),
        ({"centers": ("..",)}, "bad center name '..'"),
        ({"size": (32, 128)}, "height must be >= 64, got 32"),
        ({"size": (96,)}, "size must be two whole numbers (height, width)"),
        ({"size": (96.0, 128)}, "height must be a whole number"),
        ({"size": (96, 100_000)}, "size must be at most 4096 x 4096 pixels, got 96 x 100000"),
    ],
)
def test_bad_arguments_raise_a_one_line_synth_error(tmp_path: Path, kwargs: dict, named: str) -> None:
    with pytest.raises(SynthError) as caught:
        _generate(tmp_path / "data", **kwargs)
    assert named in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers catching ValueError keep working
    assert not (tmp_path / "data").exists()  # nothing is written before the arguments are checked


def test_out_that_is_a_file_raises(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    with pytest.raises(SynthError, match="out must be a folder"):
        _generate(target)


def test_rerun_replaces_its_own_output_and_leaves_no_stale_files(tmp_path: Path) -> None:
    _generate(tmp_path, per_class=3, centers=("mixed", "huaxi"))
    assert set(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == set(_files(tmp_path))
    summary = _generate(tmp_path, per_class=1, centers=("mixed",), preview=False)
    for kind in ("images", "masks"):
        for class_name in DEFAULT_CLASSES:
            generated = list((tmp_path / "mixed" / kind / class_name).iterdir())
            assert [p.stem for p in generated] == [f"mixed_{STEM_NAMES[class_name]}_0000"]
    assert not (tmp_path / "huaxi").exists()  # the earlier output is replaced, not added to
    assert summary.preview is None and not (tmp_path / "preview.png").exists()
    assert set(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == set(_files(tmp_path))


def test_write_preview_for_an_existing_folder(dataset: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = dataset
    path = write_preview(out)
    with Image.open(path) as sheet:
        assert sheet.mode == "L" and sheet.size[0] > sheet.size[1] / 3
    with pytest.raises(SynthError, match="no generated images"):
        write_preview(tmp_path)


def _roi(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The band below the first fully-tissue row, as the model sees it."""
    return image[int(mask.argmax(axis=0).max()) :]


def _gradient_anisotropy(image: np.ndarray, mask: np.ndarray) -> float:
    """Horizontal over vertical gradient energy: high for vertical streaks, low for horizontal layers."""
    smooth = cv2.GaussianBlur(_roi(image, mask), (0, 0), 1.5)
    gx, gy = np.diff(smooth, axis=1)[:-1], np.diff(smooth, axis=0)[:, :-1]
    return float((gx**2).mean() / (gy**2).mean())


def _dark_fraction(image: np.ndarray, mask: np.ndarray) -> float:
    """Share of the ROI much darker than its surroundings (cysts, necrosis), whatever the depth."""
    roi = _roi(image, mask)
    local, surroundings = cv2.GaussianBlur(roi, (0, 0), 2.0), cv2.GaussianBlur(roi, (0, 0), 12.0)
    return float((local < 0.6 * surroundings).mean())


def _surface_roughness(image: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(np.diff(mask.argmax(axis=0).astype(float), n=2)).mean())


def _class_feature(center: str, class_name: str, feature, n: int = 8) -> float:
    class_index = list(DEFAULT_CLASSES).index(class_name)
    values = [
        feature(*render_bscan(center, class_name, image_rng(3, center, class_index, i), (128, 160)))
        for i in range(n)
    ]
    return float(np.mean(values))


@pytest.mark.parametrize("center", DEFAULT_CENTERS)
def test_classes_differ_by_structure(center: str) -> None:
    inflammation = {
        f: _class_feature(center, "mild_inflammation", f)
        for f in (_gradient_anisotropy, _dark_fraction, _surface_roughness)
    }
    assert _class_feature(center, HSIL, _gradient_anisotropy) > 1.3 * inflammation[_gradient_anisotropy]
    assert _class_feature(center, "cyst", _dark_fraction) > inflammation[_dark_fraction] + 0.01
    assert _class_feature(center, "cancer", _dark_fraction) > inflammation[_dark_fraction] + 0.02
    assert _class_feature(center, "ectropion", _surface_roughness) > 2 * inflammation[_surface_roughness]


def test_centers_differ_for_the_same_class() -> None:
    def statistics(center: str) -> tuple[float, float]:
        means, speckle = [], []
        for i in range(8):
            image, mask = render_bscan(center, "mild_inflammation", image_rng(3, center, 0, i), (128, 160))
            roi = _roi(image, mask)
            means.append(image[mask].mean())
            speckle.append(np.std(roi - cv2.GaussianBlur(roi, (0, 0), 3.0)))
        return float(np.mean(means)), float(np.mean(speckle))

    stats = {center: statistics(center) for center in DEFAULT_CENTERS}
    for i, a in enumerate(DEFAULT_CENTERS):
        for b in DEFAULT_CENTERS[i + 1 :]:
            assert abs(stats[a][0] - stats[b][0]) > 0.03, (a, b, stats)
            assert abs(stats[a][1] - stats[b][1]) > 0.1 * min(stats[a][1], stats[b][1]), (a, b, stats)
