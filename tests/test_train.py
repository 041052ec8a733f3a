"""Training, run folders, re-evaluation, prediction and the errors around them (tiny CLIP)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import CENTER_SIZES, FAST, fast_config
from PIL import Image
from safetensors.torch import load_file

from savlt.cli import main
from savlt.config import load_config
from savlt.engine.checkpoint import CheckpointError
from savlt.engine.loaded import Ready, load_run
from savlt.engine.training import train
from savlt.errors import SavltError
from savlt.models.adapters import adalora_orthogonality
from savlt.models.backbone import build_random

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fast_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "fast"
    return out, train(fast_config(synth_root), out, progress=False)


def test_run_folder_holds_everything_needed(fast_run, synth_root: Path) -> None:
    out, _ = fast_run
    for name in (
        "config.yaml",
        "split.json",
        "fewshot.json",
        "train.log",
        "history.jsonl",
        "adapter.safetensors",
        "metrics.json",
        "report.md",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name
    for center in CENTER_SIZES:
        assert (out / f"confusion_{center}.png").is_file() and (out / f"roc_{center}.png").is_file()
        assert (out / "predictions" / f"{center}.csv").is_file()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all("val_accuracy" in h for h in history if h["step"] in (2, 4))
    assert "parameters:" in (out / "train.log").read_text()
    assert load_config(out / "config.yaml") == fast_config(synth_root)  # the run reproduces from its folder


def test_metrics_json_layout(fast_run) -> None:
    out, metrics = fast_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["complete"] is True and saved["method"] == "savlt" and saved["shots"] == 4
    assert (
        saved["ci_level"] == 0.95
        and "brackets are 95% intervals: proportions Wilson score, AUC and macro-F1 percentile bootstrap"
        in (out / "report.md").read_text()
    )
    assert {c: m["n"] for c, m in saved["centers"].items()} == CENTER_SIZES
    for m in saved["centers"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
        assert set(m["binary"]) == {"accuracy", "auc", "sensitivity", "specificity", "ppv", "npv"}
        assert np.asarray(m["confusion"]).sum() == m["n"]
        low, high = m["ci95"]["accuracy"]
        assert low <= m["accuracy"] <= high
        assert m["roi_fallback"] == 0
    assert "internal test" in (out / "report.md").read_text()


def test_checkpoint_holds_only_what_was_trained(fast_run) -> None:
    out, _ = fast_run
    tensors = load_file(str(out / "adapter.safetensors"))
    assert all(
        ("lora_" in n) or n.startswith(("pool.", "head.prototypes")) or "visual_projection" in n
        for n in tensors
    )
    assert sum(t.numel() for t in tensors.values()) < 100_000  # the tiny backbone alone has ~700k


def test_a_reloaded_run_predicts_the_same_probabilities(fast_run) -> None:
    out, _ = fast_run
    with (out / "predictions" / "xiangya.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:6]
    run = load_run(out)
    predictions = run.predict([row["path"] for row in rows])
    for row, pred in zip(rows, predictions, strict=True):
        saved = [float(row[f"p_{n}"]) for n in run.class_names]
        assert np.allclose([pred.probabilities[n] for n in run.class_names], saved, atol=2e-6)
        assert pred.predicted == row["predicted"]
        assert pred.roi_box[1] == pytest.approx(float(row["roi_y0"]), abs=1e-4)


def test_evaluate_reproduces_the_training_metrics(fast_run, capsys) -> None:
    out, _ = fast_run
    assert main(["evaluate", str(out), "-q"]) == 0
    again = json.loads((out / "evaluation" / "metrics.json").read_text())
    original = json.loads((out / "metrics.json").read_text())
    assert again == original and again["complete"] is True
    assert "xiangya" in capsys.readouterr().out
    one = load_run(out).evaluate(centers=["huaxi"], out=out / "eval-huaxi", progress=False)
    assert list(one["centers"]) == ["huaxi"] and one["centers"]["huaxi"] == original["centers"]["huaxi"]


def test_training_is_deterministic_for_a_seed(fast_run, synth_root: Path, tmp_path: Path) -> None:
    out, metrics = fast_run
    again = train(fast_config(synth_root), tmp_path / "again", progress=False)
    first, second = (
        load_file(str(out / "adapter.safetensors")),
        load_file(str(tmp_path / "again" / "adapter.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert again["centers"] == metrics["centers"]
    other = train(fast_config(synth_root, "train.seed=6"), tmp_path / "other", progress=False)
    assert (
        json.loads((tmp_path / "other" / "fewshot.json").read_text())["train"]
        != json.loads((out / "fewshot.json").read_text())["train"]
    )
    assert other["centers"]["mixed"]["n"] == metrics["centers"]["mixed"]["n"]  # same test split, any seed


def test_predict_cli_table_json_and_heatmaps(fast_run, synth_root: Path, tmp_path: Path, capsys) -> None:
    out, _ = fast_run
    images = sorted((synth_root / "huaxi" / "images" / "cyst").iterdir())[:2]
    assert main(["predict", str(out), *map(str, images), "--json", "--heatmap", str(tmp_path / "maps")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in result] == [str(p) for p in images]
    for r in result:
        assert r["predicted"] in r["probabilities"] and abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["high_risk_probability"] == pytest.approx(
            r["probabilities"]["high-grade_squamous_intraepithelial_lesion"] + r["probabilities"]["cancer"],
            abs=1e-6,
        )
        assert len(r["roi_box"]) == 4 and 0 < r["roi_box"][1] < 1
        heat = Path(r["heatmap"])
        assert heat.is_file() and heat.parent == tmp_path / "maps"
    assert main(["predict", str(out), str(images[0])]) == 0
    assert "p(high-risk)" in capsys.readouterr().out


def test_predict_is_prepare_scan_by_scan_then_diagnose_in_batches(
    fast_run, synth_root: Path, tmp_path: Path
) -> None:
    out, _ = fast_run
    run = load_run(out)
    paths = sorted((synth_root / "huaxi" / "images").rglob("*.jpg"))[:3]
    flat = np.full((64, 80), 128, np.uint8)
    items = [paths[0], flat, *paths[1:]]
    prepared = [run.prepare(item, position) for position, item in enumerate(items)]
    assert [isinstance(p, Ready) for p in prepared] == [True, False, True, True]
    assert prepared[1].assessable is False and "near-constant" in prepared[1].reason
    assert all(
        p.pixels.shape == (3, 224, 224) and p.mask.shape == (224, 224)
        for p in prepared
        if isinstance(p, Ready)
    )
    diagnosed = run.diagnose([p for p in prepared if isinstance(p, Ready)])
    assert [d.path for d in diagnosed] == [str(p) for p in paths]
    expected = run.predict(items, batch_size=4)
    assert [d.to_json() for d in diagnosed] == [e.to_json() for i, e in enumerate(expected) if i != 1]
    assert expected[1] == prepared[1] and run.diagnose([]) == []
    twice = [run.prepare(np.asarray(Image.open(paths[0])), 0) for _ in range(2)]  # both "array-0"
    with pytest.raises(SavltError, match="distinct positions"):
        run.diagnose(twice, heatmap_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was drawn


def test_a_chosen_device_keeps_the_runs_precision(fast_run, monkeypatch) -> None:
    """`--device cuda` runs at the precision the run has without it (bf16 where "auto" finds it)."""
    from accelerate import Accelerator

    from savlt.engine import runtime

    out, _ = fast_run
    asked = []

    def recording(**kwargs):
        asked.append(kwargs)
        return Accelerator(cpu=True)  # this machine has no GPU: record what was asked, run on the CPU

    monkeypatch.setattr(runtime, "Accelerator", recording)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    load_run(out, device="cuda")
    load_run(out, device="cpu")
    assert asked == [{"mixed_precision": "bf16", "cpu": False}, {"mixed_precision": "no", "cpu": True}]


def test_a_run_at_another_precision_than_the_process_is_a_clear_error(fast_run) -> None:
    from savlt.engine.runtime import make_accelerator

    out, _ = fast_run
    load_run(out, device="cpu")  # this process now runs on the CPU without mixed precision
    bf16 = load_config(overrides=["train.mixed_precision=bf16"])
    with pytest.raises(SavltError, match="in a process of its own"):
        make_accelerator(bf16, "cpu")
    assert load_run(out, device="cpu").accelerator.mixed_precision == "no"  # the process is unchanged


def test_wrong_image_mode_is_a_clear_error(fast_run, tmp_path: Path, capsys) -> None:
    out, _ = fast_run
    run = load_run(out)
    with pytest.raises(SavltError, match="expected a uint8"):
        run.predict([np.zeros((64, 64), dtype=np.float32)])
    tifffile.imwrite(
        tmp_path / "five.tif",
        np.zeros((32, 32, 5), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    assert main(["predict", str(out), str(tmp_path / "five.tif"), "-q"]) == 1  # reported, not a crash
    err = capsys.readouterr().err
    assert "five.tif" in err and "unsupported pixel layout" in err and "Traceback" not in err


def test_a_checkpoint_from_another_backbone_is_refused(fast_run, tmp_path: Path) -> None:
    out, _ = fast_run
    other = build_random()
    with torch.no_grad():
        other.vision_model.embeddings.patch_embedding.weight.mul_(1.5)  # same shapes, other weights
    other.save_pretrained(tmp_path / "other-clip")
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    text = (
        (copy / "config.yaml").read_text().replace("backbone: tiny", f"backbone: {tmp_path / 'other-clip'}")
    )
    (copy / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="was trained on backbone 'tiny'.*loaded backbone differs"):
        load_run(copy)


def test_a_checkpoint_of_another_method_is_refused(fast_run, tmp_path: Path) -> None:
    out, _ = fast_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("r: 8", "r: 4"))
    with pytest.raises(CheckpointError, match="does not fit this model.*of another shape"):
        load_run(copy)


def test_missing_segmenter_folder_is_a_clear_error(synth_root: Path, tmp_path: Path, capsys) -> None:
    code = main(
        [
            "train",
            "--data",
            str(synth_root),
            "--out",
            str(tmp_path / "r"),
            "-q",
            "--segmenter",
            str(tmp_path / "no-such-segmenter"),
            *[f"--set={o}" for o in FAST],
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no-such-segmenter" in err and "Traceback" not in err


def test_a_saved_segmenter_provides_the_roi_masks(synth_root: Path, tmp_path: Path) -> None:
    from savlt.seg import SegmenterSpec, TissueSegmenter, save_segmenter
    from savlt.seg.model import build_model

    torch.manual_seed(0)
    segmenter = TissueSegmenter(build_model("unet", "resnet18"), SegmenterSpec("unet", "resnet18", (64, 64)))
    save_segmenter(segmenter, tmp_path / "seg")
    metrics = train(
        fast_config(synth_root, f"roi.segmenter={tmp_path / 'seg'}", "data.test_centers=[]"),
        tmp_path / "run",
        progress=False,
    )
    assert list(metrics["centers"]) == ["mixed"] and metrics["centers"]["mixed"]["n"] == 15
    assert "segmenter" in (tmp_path / "run" / "config.yaml").read_text()
    run = load_run(tmp_path / "run")
    assert run.masks.kind == "segmenter" and len(run.predict([np.full((80, 90, 3), 90, np.uint8)])) == 1
    # The segmenter masks a batch at a time: prepare leaves the mask (and so the tensors) to diagnose.
    paths = sorted((synth_root / "mixed" / "images").rglob("*.jpg"))[:3]
    prepared = [run.prepare(path, number) for number, path in enumerate(paths)]
    assert all(isinstance(p, Ready) and p.pixels is None and p.mask is None for p in prepared)
    diagnosed = run.diagnose(prepared)
    assert all(p.pixels is not None for p in prepared)
    assert [d.to_json() for d in diagnosed] == [p.to_json() for p in run.predict(paths)]


@pytest.mark.parametrize("method", ["zero_shot", "linear_probe", "clip_lora", "savlt_no_roi"])
def test_baselines_train_save_and_reload(method: str, synth_root: Path, tmp_path: Path) -> None:
    metrics = train(
        fast_config(synth_root, f"method={method}", "data.test_centers=[xiangya]"), tmp_path, progress=False
    )
    assert metrics["method"] == method and set(metrics["centers"]) == {"mixed", "xiangya"}
    reloaded = load_run(tmp_path).evaluate(progress=False)
    assert reloaded["centers"] == metrics["centers"]
    if method == "zero_shot":
        assert not load_file(str(tmp_path / "adapter.safetensors"))


def test_adalora_and_text_adapters_train(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft.tuners.adalora import AdaLoraModel

    import savlt.models.adapters as adapters

    penalties: list[float] = []
    rank_updates: list[int] = []

    def recorded(factors):
        penalty = adalora_orthogonality(factors)
        penalties.append(float(penalty.detach()))
        return penalty

    def update_and_allocate(self, step: int) -> None:
        rank_updates.append(step)
        allocate(self, step)

    allocate = AdaLoraModel.update_and_allocate
    monkeypatch.setattr(adapters, "adalora_orthogonality", recorded)
    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", update_and_allocate)
    cfg = fast_config(synth_root, "peft.type=adalora", "train.max_steps=10", "data.test_centers=[]")
    assert train(cfg, tmp_path / "ada", progress=False)["centers"]["mixed"]["n"] == 15
    assert len(penalties) == 10 and all(p > 0 for p in penalties)  # the penalty is in every step's loss
    assert rank_updates == list(range(1, 11))  # the rank re-allocation after every optimiser step
    cfg = fast_config(synth_root, "peft.text=true", "data.test_centers=[]")
    train(cfg, tmp_path / "text", progress=False)
    names = load_file(str(tmp_path / "text" / "adapter.safetensors")).keys()
    assert any("text_model" in n for n in names)


@pytest.fixture(scope="module")
def learnable_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from savlt.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("learnable") / "data"
    generate_dataset(root, seed=3, per_class=24, centers=("mixed",), preview=False, progress=False)
    return root


@pytest.mark.slow
def test_training_beats_chance_clearly(learnable_root: Path, tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            f"data.root={learnable_root}",
            "model.backbone=tiny",
            "data.num_workers=0",
            "train.shots=10",
            "train.max_steps=120",
            "train.batch_size=25",
            "train.lr=1e-2",
            "train.val_every=1000",
            "eval.bootstrap=200",
        ]
    )
    metrics = train(cfg, tmp_path, progress=False)
    internal = metrics["centers"]["mixed"]
    assert internal["n"] == 45  # 24 per class: 9 in the test split
    assert internal["ci95"]["accuracy"][0] > 0.25, internal  # chance is 0.2: the interval excludes it
    assert internal["binary"]["auc"] > 0.75


def test_a_run_made_with_relative_paths_works_from_any_directory(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(synth_root)
    build_random().save_pretrained(work / "clip")  # a backbone folder named relatively
    monkeypatch.chdir(work)
    sets = [s for s in FAST if not s.startswith("model.backbone")] + [
        "data.cache_dir=cache",
        "data.test_centers=[]",
    ]
    args = ["train", "--data", "data", "--model", "clip", "--out", "run", "-q"]
    assert main([*args, *(f"--set={s}" for s in sets)]) == 0
    saved = load_config(work / "run" / "config.yaml")
    assert saved.data.root == str(synth_root.resolve()) and saved.data.cache_dir == str(work / "cache")
    assert saved.model.backbone == str(work / "clip")
    monkeypatch.chdir(tmp_path)  # elsewhere: the run still finds its data and backbone
    assert main(["evaluate", "work/run", "-q"]) == 0
