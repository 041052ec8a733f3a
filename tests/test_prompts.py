"""The prompt-learning baselines (CoOp, KgCoOp, CoCoOp, BiomedCoOp): what trains, the losses
against hand computations written here (numpy, by the published formulas), the batched CoCoOp
prompts against one image at a time, the prompt ensemble, and the methods end to end. The text
towers of every backbone kind are tested in test_backbones.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_config, tiny_model
from safetensors.torch import load_file

from savlt.cli import main
from savlt.config import DEFAULT_ENSEMBLE, ConfigError, load_config
from savlt.engine import prompting
from savlt.methods import METHODS
from savlt.models.heads import PromptHead

PROMPT_METHODS = [name for name, spec in METHODS.items() if spec.family == "prompt learning"]
ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(3)


def _unit(*shape: int) -> np.ndarray:
    x = RNG.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_the_four_methods_are_in_the_table() -> None:
    assert PROMPT_METHODS == ["coop", "kgcoop", "cocoop", "biomedcoop"]


@pytest.mark.parametrize("kind", ["tiny", "tiny-openclip"])
@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_only_the_context_and_the_meta_net_train(kind: str, method: str) -> None:
    model = tiny_model(f"method={method}", f"model.backbone={kind}")
    head = model.head
    assert isinstance(head, PromptHead)
    width = model.clip_model.token_embedding().embedding_dim
    embed = model.clip_model.embed_dim
    n_ctx = 16 if method == "coop" else 9  # "a photo of a": 9 tokens of the character-level tokenizers
    assert head.prompts.n_ctx == n_ctx
    expected = n_ctx * width
    if method == "cocoop":  # Linear E -> E/16 and E/16 -> W, with biases
        hidden = embed // 16
        expected += embed * hidden + hidden + hidden * width + width
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(n.startswith("head.prompts.") for n in trainable)
    model.train()
    features = F.normalize(torch.randn(4, embed), dim=-1)
    loss = F.cross_entropy(model.logits_of(features), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    encoders = list(model.clip_model.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in encoders)  # no gradient reaches an encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_context_options_random_start_class_specific_and_description() -> None:
    model = tiny_model(
        "method=kgcoop", "prompts.init=random", "prompts.n_ctx=3", "prompts.class_specific=true"
    )
    ctx = model.head.prompts.ctx
    assert ctx.shape == (5, 3, 64) and 0.01 < float(ctx.detach().std()) < 0.03
    named = tiny_model("method=coop").head.prompts
    described = tiny_model("method=coop", "prompts.class_text=description").head.prompts
    assert described.ids.shape[1] > named.ids.shape[1]  # the long descriptions follow the context
    with pytest.raises(ConfigError, match=r"prompts.n_ctx=8 does not apply .* prompts.init=random"):
        load_config(overrides=["method=cocoop", "prompts.n_ctx=8"])


def test_cocoop_batches_each_images_prompts_as_one_image_at_a_time(monkeypatch) -> None:
    from savlt.models import prompts

    monkeypatch.setattr(prompts, "ENCODE_CHUNK", 6)  # evaluation: one image (5 prompts) per group
    model = tiny_model("method=cocoop")
    learner = model.head.prompts
    with torch.no_grad():
        learner.meta_net[2].weight.normal_(std=0.5)  # a bias that differs between images
    features = F.normalize(torch.randn(3, model.clip_model.embed_dim), dim=-1)
    batched = learner.image_features(features)
    alone = torch.stack([learner.image_features(features[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # each image has its own prompts
    model.eval()
    with torch.no_grad():
        chunked = model.logits_of(features)  # evaluation: no gradient, encoded in chunks
    torch.testing.assert_close(
        chunked, 100 * torch.einsum("be,bce->bc", features, batched), atol=1e-4, rtol=1e-5
    )


def test_kgcoop_penalty_by_hand() -> None:
    learnt, hand = _unit(5, 8), _unit(5, 8)
    expected = 1 - np.mean(np.sum(learnt * hand, axis=1))
    got = prompting.kgcoop_penalty(torch.tensor(learnt), torch.tensor(hand))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(got) == pytest.approx(0.5 * np.mean(np.sum((learnt - hand) ** 2, axis=1)), rel=1e-6)


def test_kgcoop_starts_at_its_hand_written_prompt() -> None:
    """KgCoOp's context starts from "a photo of a", so before training its learnt features are the
    hand-written prompt's and its penalty is 0."""
    from savlt.models.savlt import prompt_spec

    cfg = load_config(overrides=["method=kgcoop", "model.backbone=tiny"])
    model = tiny_model("method=kgcoop")
    hand = model.encode_texts([prompting.KGCOOP_TEMPLATE.format(t) for t in prompt_spec(cfg).texts])
    with torch.no_grad():
        assert float(prompting.kgcoop_penalty(model.head.prompts.class_features(), hand)) < 1e-6


def _biomedcoop_by_hand(f, learnt, ensemble, scale, tau):
    """The published BiomedCoOp terms in numpy: f (B, E), learnt (C, E), ensemble (C, M, E)."""
    logits = scale * f @ learnt.T
    scores = np.array(
        [np.mean(np.max(scale * f @ ensemble[:, i].T, axis=1)) for i in range(ensemble.shape[1])]
    )
    median = np.sort(scores)[(len(scores) - 1) // 2]  # torch.median: the lower middle value
    mad = np.sort(np.abs(scores - median))[(len(scores) - 1) // 2]
    z = (scores - median) / mad
    keep = np.abs((z - z.mean()) / z.std(ddof=1)) <= tau
    mean_all = ensemble.mean(1)
    target = mean_all / np.linalg.norm(mean_all, axis=1, keepdims=True)
    sccm = np.mean((learnt - target) ** 2)
    selected = ensemble[:, keep].mean(1)
    selected /= np.linalg.norm(selected, axis=1, keepdims=True)
    zero_shot = scale * f @ selected.T

    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    p, q = log_softmax(zero_shot), log_softmax(logits)
    kdsp = np.sum(np.exp(p) * (p - q)) / logits.size
    return keep, sccm, kdsp


def test_biomedcoop_terms_and_outlier_filter_by_hand() -> None:
    f, learnt = _unit(6, 8), _unit(3, 8)
    ensemble = _unit(3, 12, 8)
    ensemble[:, 4] = -ensemble[:, 4]  # one description far from the others: an outlier score
    scale, tau = 10.0, 1.5
    keep, sccm, kdsp = _biomedcoop_by_hand(f, learnt, ensemble, scale, tau)
    assert not keep.all()  # the filter drops something here
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    scores = prompting.prompt_scores(t(f), t(ensemble), scale)
    np.testing.assert_array_equal(prompting.kept_prompts(scores, tau).numpy(), keep)
    got_sccm, got_kdsp = prompting.biomedcoop_terms(
        t(f), t(learnt), scale * t(f) @ t(learnt).T, t(ensemble), scale, tau
    )
    assert float(got_sccm) == pytest.approx(sccm, rel=1e-9)
    assert float(got_kdsp) == pytest.approx(kdsp, rel=1e-9)
    # the restandardised MAD z-score is the plain z-score of the scores (as the README says)
    s = scores.numpy()
    np.testing.assert_array_equal(keep, np.abs((s - s.mean()) / s.std(ddof=1)) <= tau)
    # equal scores: nothing to call an outlier, every description kept
    assert prompting.kept_prompts(torch.ones(7), tau).all()


def test_the_shipped_ensemble_covers_the_default_classes() -> None:
    cfg = load_config(overrides=["method=biomedcoop"])
    texts = cfg.prompts.ensemble_texts(cfg.class_names)
    assert list(texts) == cfg.class_names
    assert all(len(found) >= 10 and len(set(found)) == len(found) for found in texts.values())
    assert (ROOT / "configs" / "prompt_ensemble_oct.yaml").resolve() == DEFAULT_ENSEMBLE


def test_bad_prompts_are_one_line_before_any_run_folder(synth_root: Path, tmp_path: Path, capsys) -> None:
    names = load_config().class_names
    uneven = tmp_path / "uneven.yaml"
    uneven.write_text("\n".join(f"{name}: [a, b{', c' * (i == 0)}]" for i, name in enumerate(names)))
    missing = tmp_path / "missing.yaml"
    missing.write_text("cyst: [a, b]\n")
    for path, message in (
        (uneven, "the same number of descriptions"),
        (missing, "class 'mild_inflammation'"),
    ):
        cfg = load_config(overrides=["method=biomedcoop", f"prompts.ensemble={path}"])
        with pytest.raises(ConfigError, match=message):
            cfg.prompts.ensemble_texts(cfg.class_names)
    with pytest.raises(ConfigError, match="prompts.tau must be >= 1"):
        load_config(overrides=["method=biomedcoop", "prompts.tau=0.5"])
    for settings, named in (
        (["method=biomedcoop", f"prompts.ensemble={tmp_path / 'nope.yaml'}"], "nope.yaml"),
        (["method=coop", "prompts.n_ctx=200"], "prompts.n_ctx"),  # longer than the tower's context
    ):
        out = tmp_path / f"run-{named}"
        args = ["train", "--data", str(synth_root), "--out", str(out), "--model", "tiny"]
        code = main([*args, *(x for setting in settings for x in ("--set", setting))])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and named in err[0], err
        assert not out.exists()


@pytest.mark.slow
def test_prompt_methods_end_to_end_save_only_the_context(synth_root, tmp_path, one_thread) -> None:
    """Each method trains on the cached features, saves its context (and meta-net) only, reloads
    and predicts the same logits."""
    from savlt.engine.loaded import load_run
    from savlt.engine.training import train

    for method in PROMPT_METHODS:
        cfg = fast_config(synth_root, f"method={method}", "baselines.views=2", "data.test_centers=[huaxi]")
        metrics = train(cfg, tmp_path / method, progress=False)
        assert metrics["complete"]
        saved = load_file(str(tmp_path / method / "adapter.safetensors"))
        expected = {"head.prompts.ctx"}
        if method == "cocoop":
            expected |= {f"head.prompts.meta_net.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
        assert set(saved) == expected
        history = [
            json.loads(line) for line in (tmp_path / method / "history.jsonl").read_text().splitlines()
        ]
        assert history[-1]["lr"] < history[1]["lr"]  # the cosine schedule ran to its end
        again = load_run(tmp_path / method).evaluate(out=tmp_path / f"{method}-again", progress=False)
        for center in ("mixed", "huaxi"):
            first, second = (
                _logits(folder / "predictions" / f"{center}.csv")
                for folder in (tmp_path / method, tmp_path / f"{method}-again")
            )
            np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-4)
            assert again["centers"][center]["accuracy"] == metrics["centers"][center]["accuracy"]


def _logits(table: Path) -> np.ndarray:
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(v) for k, v in row.items() if k.startswith("logit_")] for row in rows])


def test_prompt_settings_define_only_the_prompt_methods_runs() -> None:
    from savlt.engine.runfolder import same_run

    for method, defines in (("savlt", False), ("coop", True)):
        plain = load_config(overrides=[f"method={method}"])
        described = load_config(overrides=[f"method={method}", "prompts.class_text=description"])
        assert same_run(plain, described) is not defines


def test_evaluation_text_follows_any_change_of_the_context() -> None:
    """Outside training the learnt prompts are encoded once, and again after the context changes in
    place (as loading a checkpoint does)."""
    model = tiny_model("method=coop").eval()
    features = F.normalize(torch.randn(3, model.clip_model.embed_dim), dim=-1)
    with torch.no_grad():
        before = model.logits_of(features)
        assert torch.equal(model.logits_of(features), before)
        model.head.prompts.ctx.copy_(torch.randn_like(model.head.prompts.ctx))
        after = model.logits_of(features)
        expected = 100 * features @ model.head.prompts.class_features().T
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected)
