"""Contrastive pretraining: the loss, a short run on synthetic pairs, its output as a backbone,
bad pairs files, and the shipped pretrained backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_config, short_caption_pairs

from savlt.classes import DEFAULT_CLASSES
from savlt.cli import main
from savlt.config import load_config
from savlt.data.discover import DataError
from savlt.data.pairs import read_pairs_csv
from savlt.data.synth import PRETRAIN_SCANNERS, SynthError, generate_pretrain_corpus
from savlt.data.synth.pretrain import caption
from savlt.engine.pretrain import clip_loss, pretrain, recall_at
from savlt.engine.training import train
from savlt.models.backbone import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clip_loss_by_hand() -> None:
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * (image @ text.T).numpy()

    def ce(rows: np.ndarray) -> float:
        return float(np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(rows)]))

    expected = (ce(logits) + ce(logits.T)) / 2
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-6)


def test_recall_counts_ranks_both_ways() -> None:
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.2, 0.1]])
    r = recall_at(sims, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3)  # rows 1 and 2: a wrong text scores higher
    assert r["t2i_r1"] == 1.0  # every column's best image is its own
    assert r["i2t_r2"] == 1.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    generate_pretrain_corpus(
        out, seed=1, per_class=8, size=(96, 128), scanners=PRETRAIN_SCANNERS[:2], progress=False
    )
    return out


def test_the_corpus_is_seeded_captioned_and_never_uses_the_anchors(corpus: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader((corpus / "pairs.csv").open()))
    assert len(rows) == 2 * 5 * 8 and all((corpus / r["file"]).is_file() for r in rows)
    texts = {r["text"] for r in rows}
    assert not texts & set(DEFAULT_CLASSES.values()) and len(texts) > 40  # varied wording
    again = tmp_path / "again"
    generate_pretrain_corpus(
        again, seed=1, per_class=8, size=(96, 128), scanners=PRETRAIN_SCANNERS[:2], progress=False
    )
    assert (again / "pairs.csv").read_text() == (corpus / "pairs.csv").read_text()
    first = rows[0]["file"]
    assert (again / first).read_bytes() == (corpus / first).read_bytes()
    with pytest.raises(SynthError, match="is an evaluation center"):
        generate_pretrain_corpus(tmp_path / "bad", scanners=("mixed",), progress=False)
    rng = np.random.default_rng(0)
    assert all(caption("cyst", "scanner-a", rng) != DEFAULT_CLASSES["cyst"] for _ in range(200))


@pytest.mark.slow
def test_a_short_pretraining_beats_chance_and_its_output_is_a_backbone(
    tmp_path: Path, synth_root: Path
) -> None:
    short_caption_pairs(synth_root, tmp_path)  # short captions: learnable in a few dozen steps
    cfg = load_config(
        overrides=[
            "model.backbone=tiny",
            "pretrain.max_steps=40",
            "pretrain.batch_size=16",
            "pretrain.lr=1e-3",
            "pretrain.init_temperature=0.07",
            "pretrain.eval_every=20",
            "pretrain.val_fraction=0.25",
            "pretrain.save_every=20",
            "data.num_workers=0",
        ],
        values={"pretrain.pairs": tmp_path / "pairs.csv"},
    )
    recall = pretrain(cfg, tmp_path / "pt", progress=False)
    chance = 1 / 10  # 10 held-out pairs; identical captions of one class tie, as they should
    assert recall["i2t_r1"] > 2 * chance, recall
    history = [json.loads(line) for line in (tmp_path / "pt" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 40 and "i2t_r1" in history[19] and history[-1]["loss"] < history[0]["loss"]
    assert "held-out recall" in (tmp_path / "pt" / "README.md").read_text()
    assert oct((tmp_path / "pt" / "model.safetensors").stat().st_mode)[-3:] == "644"
    backbone = load_backbone(str(tmp_path / "pt"))
    assert backbone.image_size == 224 and backbone.logit_scale.dtype == torch.float32
    assert (tmp_path / "pt" / "preprocessor_config.json").is_file()  # the mean and std it was trained with
    run = tmp_path / "run"
    metrics = train(
        fast_config(synth_root, f"model.backbone={tmp_path / 'pt'}", "data.test_centers=[]"),
        run,
        progress=False,
    )
    assert metrics["complete"] and metrics["backbone"] == str(tmp_path / "pt")
    # the same command again resumes at the end instead of training again
    assert pretrain(cfg, tmp_path / "pt", progress=False) == pytest.approx(recall)
    assert len((tmp_path / "pt" / "history.jsonl").read_text().splitlines()) == 40


def test_lora_pretraining_merges_its_adapters_into_a_plain_backbone(tmp_path: Path, synth_root: Path) -> None:
    short_caption_pairs(synth_root, tmp_path)
    cfg = load_config(
        overrides=[
            "model.backbone=tiny",
            "pretrain.adapters=lora",
            "pretrain.max_steps=3",
            "data.num_workers=0",
        ],
        values={"pretrain.pairs": tmp_path / "pairs.csv"},
    )
    pretrain(cfg, tmp_path / "pt", progress=False)
    merged = load_backbone(str(tmp_path / "pt"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    start = load_backbone("tiny")
    q_proj = [m.vision_model.encoder.layers[-1].self_attn.q_proj.weight for m in (merged, start)]
    assert not torch.allclose(*q_proj)  # the adapters, merged, moved the attention weights


def test_bad_pairs_files_are_one_line_errors(corpus: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "nocol.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(DataError, match="lacks the column.*file, text"):
        read_pairs_csv(tmp_path / "nocol.csv")
    rows = (corpus / "pairs.csv").read_text().splitlines()
    (corpus / "empty_text.csv").write_text(
        "\n".join([rows[0], rows[1].split(",")[0] + ",", *rows[2:]]) + "\n"
    )
    with pytest.raises(DataError, match="line 2: the text of .* is empty"):
        read_pairs_csv(corpus / "empty_text.csv")
    broken = corpus / "images" / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    (corpus / "with_bad.csv").write_text(
        "\n".join([*rows, "images/missing.png,text a", "images/broken.png,text b"]) + "\n"
    )
    assert (
        main(
            ["pretrain", str(corpus / "with_bad.csv"), "--model", "tiny", "--out", str(tmp_path / "o"), "-q"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "2 of 82 pair images cannot be used" in err and "missing.png" in err and "broken.png" in err
    assert len(err.strip().splitlines()) == 1
    broken.unlink()


def test_the_shipped_backbone_loads_offline_and_reads_scans(synth_root: Path, tmp_path: Path) -> None:
    backbone = load_backbone("tiny-oct")
    assert backbone.source == "tiny-oct" and {p.dtype for p in backbone.parameters()} == {torch.float32}
    assert 1_000_000 < sum(p.numel() for p in backbone.parameters()) < 5_000_000
    metrics = train(
        fast_config(synth_root, "model.backbone=tiny-oct", "method=zero_shot", "data.test_centers=[xiangya]"),
        tmp_path,
        progress=False,
    )
    # chance is 0.2 with five classes
    assert metrics["centers"]["mixed"]["accuracy"] > 0.35 and metrics["centers"]["xiangya"]["accuracy"] > 0.3
