"""Patients, volumes, calibration and the screening decision: patient-level splits and draws,
multi-page TIFF volumes, metadata.csv and file-name patterns, patient-level metrics and bootstrap,
temperature scaling, the referral threshold, synthetic patients, and a run that uses them all."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from conftest import SMALL, fast_config, write_png
from scipy.special import log_softmax

from savlt.classes import DEFAULT_CLASSES, ClassMap
from savlt.cli import main, predict_inputs
from savlt.config import ConfigError, load_config
from savlt.data.check import check_dataset
from savlt.data.discover import CenterData, DataError, ImageRecord, scan_dataset
from savlt.data.imageio import ImageDecodeError, decode_image, read_image, tiff_pages
from savlt.data.prepare import resolve_split
from savlt.data.splits import (
    MAX_REPEAT,
    PARTS,
    patients_across_parts,
    ratio_split,
    sample_few_shot,
)
from savlt.data.synth import SynthError, generate_dataset
from savlt.engine.calibration import fit_calibration, fit_temperature, fit_threshold, nll
from savlt.engine.inputs import prepare_inputs
from savlt.engine.loaded import load_run
from savlt.engine.metrics import (
    aggregate_patients,
    auc_score,
    calibration_error,
    center_metrics,
    patient_metrics,
    resample_indices,
)

CLASSES = ClassMap(tuple(DEFAULT_CLASSES))
NAMES = list(DEFAULT_CLASSES)
HIGH_RISK = np.array([False, False, False, True, True])


def _center(layout: list[tuple[str, list[str]]], name: str = "c") -> CenterData:
    """A center of (patient, [class of each of its scans]) without files."""
    records = [
        ImageRecord(Path(f"/x/{name}/{p}_{i}.png"), f"images/{label}/{p}_{i}.png", name, label, patient=p)
        for p, labels in layout
        for i, label in enumerate(labels)
    ]
    return CenterData(name, Path(f"/x/{name}"), records, patient_source="metadata.csv")


def _random_layout(rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    """3–30 patients with 1–6 scans each; some patients have scans of two classes."""
    layout = []
    for p in range(int(rng.integers(3, 31))):
        main_class = NAMES[int(rng.integers(len(NAMES)))]
        labels = [main_class] * int(rng.integers(1, 7))
        if rng.random() < 0.2:
            labels.append(NAMES[int(rng.integers(len(NAMES)))])
        layout.append((f"p{p:02d}", labels))
    return layout


# ---------------------------------------------------------------- splits and draws


def test_splits_never_put_a_patient_in_two_parts() -> None:
    for seed in range(60):
        rng = np.random.default_rng(seed)
        center = _center(_random_layout(rng))
        ratios = [0.45, 0.15, 0.40] if seed % 3 else [0.6, 0.2, 0.2]
        split = ratio_split(center, ratios, seed)
        parts = [split.part(p) for p in PARTS]
        assert sorted(r for part in parts for r in part) == sorted(r.rel for r in center.records)
        assert patients_across_parts(split, center) == {}, seed
        if not split.train:
            continue
        records = center.by_rel()
        largest = max(sum(records[r].label == label for r in split.train) for label in NAMES)
        for shots in (s for s in (1, 3, 8) if s <= MAX_REPEAT * largest):
            few = sample_few_shot(split, center, shots, seed)
            assert set(few.train) <= set(split.train) and set(few.val) <= set(split.val)
            for label in NAMES:
                train_of_class = [r for r in split.train if records[r].label == label]
                if len(train_of_class) < shots:
                    continue
                drawn = [r for r in few.train if records[r].label == label]
                patients = {records[r].patient for r in train_of_class}
                assert len(drawn) == len(set(drawn)) == shots
                # spread over as many patients as the class has
                assert len({records[r].patient for r in drawn}) == min(shots, len(patients))


def test_a_patient_with_scans_of_two_classes_stays_whole_under_its_main_class() -> None:
    layout = [("mixed-up", ["cyst", "cyst", "cancer"])] + [(f"q{i}", ["cancer"]) for i in range(9)]
    center = _center(layout)
    for seed in range(10):
        split = ratio_split(center, [0.45, 0.15, 0.40], seed)
        assert len({part for part in PARTS for rel in split.part(part) if "mixed-up" in rel}) == 1


def test_without_grouped_patients_the_split_and_draw_are_the_per_image_ones() -> None:
    center = _center([(f"p{i}", [NAMES[i % 5]]) for i in range(40)])
    image_level = CenterData(
        "c", center.root, [ImageRecord(r.path, r.rel, "c", r.label) for r in center.records]
    )
    for seed in range(5):
        assert ratio_split(center, [0.45, 0.15, 0.4], seed) == ratio_split(
            image_level, [0.45, 0.15, 0.4], seed
        )
        split = ratio_split(center, [0.45, 0.15, 0.4], seed)
        assert sample_few_shot(split, center, 3, seed) == sample_few_shot(split, image_level, 3, seed)
    grouped = _center([(f"p{i}", [NAMES[i % 5]] * 4) for i in range(20)])
    by_image = ratio_split(grouped, [0.45, 0.15, 0.4], 0, by_patient=False)
    assert patients_across_parts(by_image, grouped)  # an image-level split mixes the patients' scans
    assert ratio_split(grouped, [0.45, 0.15, 0.4], 0).source.endswith("by patient")


@pytest.fixture
def patient_tree(small_tree: Path) -> Path:
    """small_tree's mixed center with a metadata.csv: patients A (cyst_0, cyst_1), B (cyst_2), C (cancer_*)."""
    rows = [
        ("images/cyst/cyst_0.png", "A", "a1", "left"),
        ("images/cyst/cyst_1.png", "A", "a1", "right"),
        ("images/cyst/cyst_2.png", "B", "", ""),
        *((f"images/cancer/cancer_{i}.png", "C", "", "") for i in range(3)),
    ]
    with (small_tree / "mixed" / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["File", "Patient", "volume", "side"])
        writer.writerows(rows)
    return small_tree


def test_a_split_file_that_crosses_patients_is_refused_or_accepted_with_the_flag(
    patient_tree: Path, tmp_path: Path
) -> None:
    split_file = tmp_path / "split.json"
    split_file.write_text(
        json.dumps(
            {
                "train": ["images/cyst/cyst_0.png", "images/cancer/cancer_0.png"],
                "val": ["images/cyst/cyst_2.png"],
                "test": [
                    "images/cyst/cyst_1.png",
                    "images/cancer/cancer_1.png",
                    "images/cancer/cancer_2.png",
                ],
            }
        )
    )
    values = {"data.root": patient_tree, "data.cache_dir": tmp_path / "cache", "data.split_file": split_file}
    with pytest.raises(DataError, match="patient 'A'.*'train' and 'test'.*data.split_by=image") as info:
        prepare_inputs(load_config(overrides=["data.test_centers=[]", "train.shots=1"], values=values))
    assert "1 other patient" in str(info.value)  # C crosses too
    inputs = prepare_inputs(
        load_config(overrides=["data.test_centers=[]", "train.shots=1", "data.split_by=image"], values=values)
    )
    summary = inputs.split_summary()
    assert summary["by"] == "image" and summary["patients_in_several_parts"] == 2
    assert "optimistic" in summary["warning"] and set(summary["examples"]) == {"A", "C"}
    assert summary["parts"]["train"] == {"scans": 2, "patients": 2}


def test_the_cached_split_records_patients_and_is_kept_apart_from_image_splits(
    patient_tree: Path, tmp_path: Path
) -> None:
    center = scan_dataset(patient_tree, CLASSES, ["mixed"]).center("mixed")
    by_patient = resolve_split(center, tmp_path, [0.45, 0.15, 0.4], 0)
    by_image = resolve_split(center, tmp_path, [0.45, 0.15, 0.4], 0, split_by="image")
    names = sorted(p.name for p in tmp_path.glob("split_*.json"))
    assert names == ["split_mixed_r45-15-40_seed0.json", "split_mixed_r45-15-40_seed0_patients.json"]
    saved = json.loads((tmp_path / names[1]).read_text())
    assert saved["patients"]["by"] == "patient" and saved["patients"]["source"] == "metadata.csv"
    assert sorted(p for part in PARTS for p in saved["patients"][part]) == ["A", "B", "C"]
    assert by_image.patients["by"] == "image" and not patients_across_parts(by_patient, center)
    # a cached split made when every scan was its own patient, then metadata added: named and refused
    stale = tmp_path / names[1]
    stale.write_text(
        json.dumps({**saved, "train": ["images/cyst/cyst_0.png"], "test": ["images/cyst/cyst_1.png"]})
    )
    with pytest.raises(DataError, match=f"cached split {stale}.*patient 'A'.*delete it"):
        resolve_split(center, tmp_path, [0.45, 0.15, 0.4], 0)


# ---------------------------------------------------------------- metadata, patterns, volumes


def test_metadata_csv_gives_patients_volumes_and_other_columns(patient_tree: Path) -> None:
    scan = scan_dataset(patient_tree, CLASSES)
    center = scan.center("mixed")
    assert center.patient_source == "metadata.csv" and scan.center("ext").patient_source is None
    by_rel = center.by_rel()
    first = by_rel["images/cyst/cyst_0.png"]
    assert (first.patient, first.volume, first.metadata) == ("A", "a1", (("side", "left"),))
    assert by_rel["images/cyst/cyst_2.png"].patient_id == "B"
    assert not [p for p in scan.problems if p.kind != "not_an_image"]  # metadata.csv is no stray file
    table = patient_tree / "mixed" / "metadata.csv"
    rows = [line for line in table.read_text().splitlines() if "cyst_2" not in line]
    table.write_text("\n".join([*rows, "images/cyst/gone.png,D,,"]) + "\n")
    scan = scan_dataset(patient_tree, CLASSES)
    kinds = sorted(p.kind for p in scan.problems)
    assert kinds == ["metadata_unknown_file", "missing_patient"]
    with pytest.raises(DataError, match="cyst_2.png has no row in .*metadata.csv"):
        scan.require_usable(["mixed"])
    scan.require_usable(["ext"])  # the other center is not affected
    table.write_text("file,who\nimages/cyst/cyst_0.png,A\n")
    with pytest.raises(DataError, match="no 'patient' column"):
        scan_dataset(patient_tree, CLASSES).require_usable(["mixed"])


def test_a_file_name_pattern_gives_patients(small_tree: Path) -> None:
    scan = scan_dataset(small_tree, CLASSES, patient_pattern=r"^(?P<patient>[a-z]+)_")
    center = scan.center("mixed")
    assert center.patient_source == "data.patient_pattern"
    assert {r.patient for r in center.records} == {"cyst", "cancer"}
    assert [p.kind for p in scan.problems if p.kind == "missing_patient"] == [
        "missing_patient"
    ] * 2  # ext's a.png
    with pytest.raises(DataError, match="2 scans of center 'ext' have no patient"):
        scan.require_usable(["ext"])
    with pytest.raises(ConfigError, match="data.patient_pattern: '\\(P' is not a regular expression"):
        load_config(overrides=["data.patient_pattern=(P"])


def test_multi_page_tiffs_are_read_page_by_page(small_tree: Path, capsys) -> None:
    pages = (np.arange(3)[:, None, None] * 900 + np.arange(40 * 48).reshape(1, 40, 48) * 3).astype(np.uint16)
    pages[:, :10] = 0  # air above a tissue surface
    volume = small_tree / "mixed" / "images" / "cancer" / "vol.tif"
    tifffile.imwrite(volume, pages, photometric="minisblack")
    center = scan_dataset(small_tree, CLASSES, ["mixed"]).center("mixed")
    found = [r for r in center.records if r.volume == "images/cancer/vol.tif"]
    assert [(r.rel, r.page, r.mask_path) for r in found] == [
        (f"images/cancer/vol.tif#{i}", i, None) for i in range(3)
    ]
    for record in found:
        rgb, raw = decode_image(record.path)
        assert np.array_equal(raw, pages[record.page]) and rgb.shape == (40, 48, 3)
    assert not np.array_equal(read_image(found[0].path), read_image(found[2].path))
    assert len({r.patient_id for r in found}) == 1  # without patient information a volume is one patient
    with pytest.raises(ImageDecodeError, match="vol.tif#7: the volume has 3 page"):
        decode_image(f"{volume}#7")
    assert [p.name for p in predict_inputs([volume])] == ["vol.tif#0", "vol.tif#1", "vol.tif#2"]
    report = check_dataset(small_tree, CLASSES, progress=False)
    assert report.clean, report.problems
    row = next(line for line in report.counts_table().splitlines() if line.startswith("mixed"))
    assert row.split()[-5:] == ["9", "6", "1", "3", "-"]  # total, masks, volumes, pages, patients


# ---------------------------------------------------------------- patient-level metrics and bootstrap


def test_patient_metrics_on_a_hand_made_example() -> None:
    #           scan:  0      1      2      3      4      5
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p4"])
    labels = np.array([0, 3, 1, 4, 4, 2])  # p1 has an HSIL scan: a high-risk patient of class 3
    probs = np.array(
        [
            [0.7, 0.1, 0.0, 0.1, 0.1],
            [0.5, 0.0, 0.0, 0.4, 0.1],  # p1 mean: [0.6, .05, 0, .25, .1] -> argmax class 0, risk 0.35
            [0.1, 0.8, 0.0, 0.1, 0.0],  # p2: class 1, risk 0.1
            [0.0, 0.0, 0.2, 0.2, 0.6],
            [0.0, 0.0, 0.6, 0.0, 0.4],  # p3 mean: [0, 0, .4, .1, .5] -> class 4, risk 0.6
            [0.0, 0.0, 0.9, 0.1, 0.0],  # p4: class 2, risk 0.1
        ]
    )
    ids, patient_labels, patient_probs = aggregate_patients(labels, probs, groups, HIGH_RISK, "mean")
    assert ids.tolist() == ["p1", "p2", "p3", "p4"] and patient_labels.tolist() == [3, 1, 4, 2]
    assert np.allclose(patient_probs[0], [0.6, 0.05, 0.0, 0.25, 0.1])
    m = patient_metrics(
        labels, probs, groups, HIGH_RISK, "mean", screen=True, threshold=math.log(0.3 / 0.7), resamples=0
    )
    assert m["n"] == 4 and m["accuracy"] == pytest.approx(3 / 4)  # p1 called class 0
    b = m["binary"]  # argmax screen: p1 missed, p3 caught; p2, p4 negatives
    assert (b["sensitivity"], b["specificity"], b["ppv"], b["npv"]) == (0.5, 1.0, 1.0, pytest.approx(2 / 3))
    assert b["auc"] == 1.0  # risks 0.35, 0.6 for the positives above 0.1, 0.1
    op = m["operating_point"]  # refer at p(high-risk) >= 0.3: p1 and p3
    assert (op["sensitivity"], op["specificity"], op["ppv"], op["npv"]) == (1.0, 1.0, 1.0, 1.0)
    # max_risk: p1 takes scan 1 ([.5, 0, 0, .4, .1], class 0, risk 0.5), p3 scan 3 (risk 0.8)
    _, _, riskiest = aggregate_patients(labels, probs, groups, HIGH_RISK, "max_risk")
    assert np.allclose(riskiest[[0, 2]], probs[[1, 3]])
    assert (
        patient_metrics(labels, probs, groups, HIGH_RISK, "max_risk", resamples=0)["aggregate"] == "max_risk"
    )


def test_the_bootstrap_resamples_patients() -> None:
    groups = np.repeat([f"p{i}" for i in range(30)], np.arange(30) % 4 + 1)
    sizes = {g: int((groups == g).sum()) for g in set(groups)}
    for idx in resample_indices(groups, len(groups), 50, np.random.default_rng(0)):
        drawn = groups[idx]
        for patient in set(drawn):  # a patient comes with all of its scans, as often as it is drawn
            assert (drawn == patient).sum() % sizes[patient] == 0
            assert set(idx[drawn == patient]) == set(np.flatnonzero(groups == patient))
    singles = np.array([f"s{i}" for i in range(20)])
    same = resample_indices(singles, 20, 5, np.random.default_rng(1))
    assert np.array_equal(same, np.random.default_rng(1).integers(0, 20, size=(5, 20)))
    # scans of a patient agree (one patient = one outcome): the interval over patients is wider
    rng = np.random.default_rng(2)
    patient_right = rng.random(40) < 0.6
    groups = np.repeat([f"p{i}" for i in range(40)], 10)
    labels = rng.integers(0, 5, 400)
    preds = np.where(np.repeat(patient_right, 10), labels, (labels + 1) % 5)
    logits = np.log(np.eye(5)[preds] * 0.9 + 0.02)
    by_scan = center_metrics(labels, logits, NAMES, NAMES[3:], resamples=300, seed=0)
    by_patient = center_metrics(labels, logits, NAMES, NAMES[3:], resamples=300, seed=0, groups=groups)
    assert by_scan["accuracy"] == by_patient["accuracy"]
    width = {
        k: m["ci95"]["accuracy"][1] - m["ci95"]["accuracy"][0] for k, m in (("s", by_scan), ("p", by_patient))
    }
    assert width["p"] > 2 * width["s"]
    unique = center_metrics(
        labels, logits, NAMES, NAMES[3:], resamples=50, seed=0, groups=np.arange(400).astype(str)
    )
    assert unique["ci95"] == center_metrics(labels, logits, NAMES, NAMES[3:], resamples=50, seed=0)["ci95"]


# ---------------------------------------------------------------- calibration and threshold


def _overconfident(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits 70 % right, but scaled so the model claims ~100 % confidence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    preds = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 5, n))
    return 40 * np.eye(5)[preds] + rng.normal(0, 1, (n, 5)), labels


def test_temperature_scaling_lowers_the_validation_nll_and_the_ece() -> None:
    logits, labels = _overconfident()
    temperature = fit_temperature(logits, labels)
    assert temperature > 5
    assert nll(logits, labels, temperature) < nll(logits, labels) / 3
    grid = np.exp(np.linspace(-2, 5, 200))
    assert nll(logits, labels, temperature) <= min(nll(logits, labels, t) for t in grid) + 1e-6
    calibrated = np.exp(log_softmax(logits / temperature, axis=1))
    raw = np.exp(log_softmax(logits, axis=1))
    assert calibration_error(calibrated, labels) < calibration_error(raw, labels) / 3
    under = logits / 200  # underconfident: the temperature sharpens
    assert fit_temperature(under, labels) < 1
    fitted = fit_calibration(logits, labels, [str(i) for i in range(300)], NAMES, NAMES[3:], 0.95)
    assert fitted.nll_after < fitted.nll_before and fitted.temperature == pytest.approx(temperature)


def test_the_threshold_reaches_the_target_sensitivity_on_validation() -> None:
    rng = np.random.default_rng(4)
    for target in (0.8, 0.9, 0.95, 1.0):
        for _ in range(20):
            positive = rng.random(60) < 0.4
            score = rng.normal(positive * 1.5, 1.0)
            threshold = fit_threshold(score, positive, target)
            sensitivity = (score[positive] >= threshold).mean()
            assert sensitivity >= target - 1e-12
            higher = score[positive][score[positive] > threshold]
            if higher.size:  # it is the highest such threshold: the next positive score falls short
                assert (score[positive] >= higher.min()).mean() < target
    assert fit_threshold(np.array([0.3, 0.2]), np.array([False, False]), 0.95) is None
    logits, labels = _overconfident(40)
    fitted = fit_calibration(logits, labels, [str(i) for i in range(40)], NAMES, NAMES[3:], 0.95)
    calibrated = np.exp(log_softmax(logits / fitted.temperature, axis=1))
    risk = calibrated[:, 3:].sum(axis=1)
    positive = labels >= 3
    assert (risk[positive] >= fitted.threshold - 1e-12).mean() >= 0.95
    assert any("fewer than 50" in w for w in fitted.warnings)  # 40 validation scans: said so
    assert positive.sum() < 20 and not fitted.established  # 17 high-risk scans: no operating point
    assert any("operating point not established" in w and "fewer than the 20" in w for w in fitted.warnings)


# ---------------------------------------------------------------- synthetic patients


def test_synth_writes_patients_metadata_and_volumes(tmp_path: Path) -> None:
    out = tmp_path / "data"
    summary = generate_dataset(
        out, seed=2, per_class=6, centers=["mixed"], size=SMALL, preview=False, progress=False,
        patients_per_class=3, volume_fraction=1 / 3,
    )  # fmt: skip
    assert (summary.patients, summary.volumes, summary.total) == (15, 5, 30)
    with (out / "mixed" / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and len({r["patient"] for r in rows}) == 15
    volumes = sorted((out / "mixed" / "images").rglob("*.tif"))
    assert len(volumes) == 5 and all(tiff_pages(v) == 2 for v in volumes)
    center = scan_dataset(out, CLASSES).center("mixed")
    assert len(center.records) == 30 and len({r.patient_id for r in center.records}) == 15
    cyst = sorted((out / "mixed" / "images" / "cyst").glob("*.png"))
    # the structure (speckle blurred away) of patient p000's two scans, and of p001's first scan
    first, second, other = (
        cv2.GaussianBlur(read_image(p)[:, :, 0].astype(float), (0, 0), 2).ravel() for p in cyst[:3]
    )
    assert "_p000_" in cyst[1].name and "_p001_" in cyst[2].name
    assert np.corrcoef(first, second)[0, 1] > max(0.9, np.corrcoef(first, other)[0, 1])
    again = tmp_path / "again"
    generate_dataset(again, seed=2, per_class=6, centers=["mixed"], size=SMALL, preview=False, progress=False)
    assert not (again / "mixed" / "metadata.csv").exists()
    with pytest.raises(SynthError, match="patients_per_class \\(7\\) must not exceed per_class \\(6\\)"):
        generate_dataset(again, per_class=6, patients_per_class=7, progress=False)
    with pytest.raises(SynthError, match="volume_fraction needs patients_per_class"):
        generate_dataset(again, per_class=6, volume_fraction=0.5, progress=False)


# ---------------------------------------------------------------- a run with patients


@pytest.fixture(scope="module")
def patient_run(tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[Path, dict]:
    from savlt.engine.training import train

    root = tmp_path_factory.mktemp("patients") / "data"
    generate_dataset(
        root, seed=0, per_class=8, centers=["mixed", "huaxi"], size=SMALL, preview=False, progress=False,
        patients_per_class=4, volume_fraction=0.25,
    )  # fmt: skip
    out = root.parent / "run"
    # a target of 0.5 needs high-risk validation scans of 2 patients, which this draw has: an
    # established operating point
    return out, train(fast_config(root, "eval.target_sensitivity=0.5"), out, progress=False)


@pytest.mark.slow
def test_a_run_reports_patients_calibration_and_the_operating_point(patient_run, capsys) -> None:
    out, metrics = patient_run
    assert metrics["split"]["by"] == "patient" and metrics["split"]["patient_source"] == "metadata.csv"
    assert "patients_in_several_parts" not in metrics["split"]
    split = json.loads((out / "split.json").read_text())
    assert not set(split["patients"]["train"]) & (
        set(split["patients"]["val"]) | set(split["patients"]["test"])
    )
    fit = json.loads((out / "calibration.json").read_text())
    assert fit == metrics["validation_fit"] and fit["target_sensitivity"] == 0.5 and fit["warnings"]
    assert fit["positive_patients"] >= 2 and not any("not established" in w for w in fit["warnings"])
    assert fit["nll_after"] <= fit["nll_before"]
    for center, m in metrics["centers"].items():
        assert m["patient"]["source"] == "metadata.csv" and m["patient"]["n"] < m["n"]
        assert set(m["calibration"]) == {"temperature", "ece_before", "ece_after"}
        op = m["operating_point"]
        assert set(op) == {
            "rule",
            "established",
            "not_established_because",
            "threshold",
            "target_sensitivity",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
            "ci95",
            "screen_failed",
        }
        assert op["threshold"] == fit["threshold"] and op["established"], center
        assert op["rule"].startswith("refer when the predicted class is high-risk or p(high-risk) >=")
    report = (out / "report.md").read_text()
    for text in (
        "## Screening decision",
        "## Patients",
        "## Calibration",
        "reliability_huaxi.png",
        "Warning",
    ):
        assert text in report
    assert (out / "reliability_mixed.png").is_file()
    with (out / "predictions" / "huaxi.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"patient", "volume", "slice", "referral", "p_high_risk"} <= set(rows[0])
    assert any("#" in r["path"] for r in rows) and all(
        r["referral"] in ("refer", "no referral") for r in rows
    )
    assert main(["evaluate", str(out), "-q"]) == 0
    capsys.readouterr()
    again = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert again == metrics and again["complete"] is True
    page = next(r["path"] for r in rows if "#" in r["path"])
    assert main(["predict", str(out), page, "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    saved = next(r for r in rows if r["path"] == page)
    assert prediction["calibrated"] and prediction["referral"] == saved["referral"]
    assert prediction["high_risk_probability"] == pytest.approx(float(saved["p_high_risk"]), abs=1e-5)
    assert prediction["referral_threshold"] == fit["threshold"]
    assert main(["predict", str(out), page]) == 0
    printed = capsys.readouterr().out
    assert saved["referral"] in printed
    assert "refer when the predicted class is high-risk or p(high-risk) >=" in printed
    with pytest.raises(ImageDecodeError, match="a volume of 2 B-scans: name one as .*#0"):
        load_run(out).predict([page.split("#")[0]])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_every_reported_number_is_recomputed_from_the_delivered_predictions(patient_run) -> None:
    """metrics.json's figures come from the probabilities, referrals and sets the CSVs deliver;
    the calibration is refitted from predictions/validation.csv."""
    out, metrics = patient_run
    fit = json.loads((out / "calibration.json").read_text())
    threshold = fit["threshold"]
    for center, m in metrics["centers"].items():
        rows = [r for r in _rows(out / "predictions" / f"{center}.csv") if r["assessable"] == "1"]
        labels = np.array([NAMES.index(r["label"]) for r in rows])
        logits = np.array([[float(r[f"logit_{n}"]) for n in NAMES] for r in rows])
        probs = np.exp(log_softmax(logits / fit["temperature"], axis=1))  # the delivered probabilities
        assert np.allclose(probs, [[float(r[f"p_{n}"]) for n in NAMES] for r in rows], atol=1e-6)
        predicted = np.array([NAMES.index(r["predicted"]) for r in rows])
        assert np.array_equal(predicted, probs.argmax(axis=1))
        assert m["n"] == len(rows) and m["accuracy"] == pytest.approx((predicted == labels).mean())
        positive = HIGH_RISK[labels]
        score = np.array([float(r["auc_score"]) for r in rows])
        assert m["binary"]["auc"] == pytest.approx(auc_score(positive, score))
        assert np.allclose(score, np.log(probs[:, 3:].sum(1)) - np.log(probs[:, :3].sum(1)), atol=1e-6)
        referred = np.array([r["referral"] == "refer" for r in rows])
        rule = HIGH_RISK[predicted] | (probs[:, 3:].sum(axis=1) >= threshold)  # the stated rule
        assert np.array_equal(referred, rule) and referred[HIGH_RISK[predicted]].all()
        op = m["operating_point"]
        assert op["sensitivity"] == pytest.approx(referred[positive].mean())
        assert op["specificity"] == pytest.approx((~referred[~positive]).mean())
        sets = [[c for c in r["prediction_set"].split(";") if c] for r in rows]
        covered = np.array([NAMES[label] in chosen for label, chosen in zip(labels, sets, strict=True)])
        assert m["prediction_sets"]["coverage"] == pytest.approx(covered.mean())
        assert m["prediction_sets"]["mean_size"] == pytest.approx(np.mean([len(c) for c in sets]))
        assert m["prediction_sets"]["empty"] == pytest.approx(np.mean([not c for c in sets]))
        groups = np.array([r["patient"] for r in rows])
        assert m["patient"]["accuracy"] == pytest.approx(
            patient_metrics(labels, probs, groups, HIGH_RISK, resamples=0)["accuracy"]
        )
    validation = _rows(out / "predictions" / "validation.csv")
    assert len(validation) == fit["scans"]
    logits = np.array([[float(r[f"logit_{n}"]) for n in NAMES] for r in validation])
    labels = np.array([NAMES.index(r["label"]) for r in validation])
    again = fit_calibration(
        logits, labels, [r["patient"] for r in validation], NAMES, NAMES[3:], 0.5, 0.1, "lac"
    )
    assert again.temperature == pytest.approx(fit["temperature"], rel=1e-6)
    assert again.threshold == pytest.approx(threshold, rel=1e-6)
    assert again.conformal_quantile == pytest.approx(fit["conformal_quantile"], rel=1e-6)


def test_an_image_level_split_of_the_same_data_is_recorded_as_such(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_dataset(
        root, seed=0, per_class=8, centers=["mixed"], size=SMALL, preview=False, progress=False,
        patients_per_class=2,
    )  # fmt: skip
    cfg = fast_config(root, "data.split_by=image", "data.test_centers=[]")
    inputs = prepare_inputs(cfg)
    assert inputs.split_summary()["patients_in_several_parts"] > 0
    assert not prepare_inputs(fast_config(root, "data.test_centers=[]")).across
    write_png(root / "mixed" / "images" / "cyst" / "stray.png")
    with pytest.raises(DataError, match="stray.png has no row"):
        prepare_inputs(cfg)
