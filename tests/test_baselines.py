"""The feature-based baselines, the feature cache, the protocols and the benchmark summary, each
against an independent computation written here (numpy, by the published formulas)."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_config

from savlt.config import Config, ConfigError, load_config
from savlt.data.discover import CenterData, ImageRecord
from savlt.data.splits import PROTOCOLS, Split, sample_few_shot
from savlt.engine import baselines
from savlt.engine.baselines import Support
from savlt.methods import METHODS
from savlt.models.heads import HeadShape, TipAdapterHead
from savlt.sweep.aggregate import holm, rank_methods

RNG = np.random.default_rng(0)


def _unit(rows: int, cols: int) -> np.ndarray:
    x = RNG.normal(size=(rows, cols))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _support(n_per_class=(3, 2, 4), embed=6, views=2, scale=100.0) -> Support:
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    n = len(labels)
    tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Support(
        tensor(np.stack([_unit(n, embed) for _ in range(views)])),
        tensor(_unit(n, embed)),
        torch.tensor(labels),
        tensor(_unit(len(n_per_class), embed)),
        None,
        scale,
    )


def test_tip_adapter_logits_follow_the_published_formula() -> None:
    f, keys, text = _unit(5, 6), _unit(4, 6), _unit(3, 6)
    labels = np.array([0, 2, 1, 2])
    values = np.eye(3)[labels]
    alpha, beta = 1.7, 5.5
    head = TipAdapterHead(HeadShape(3, 6, inference_scale=100.0))
    head.set_cache(torch.tensor(keys, dtype=torch.float32), torch.tensor(values, dtype=torch.float32))
    head.alpha.fill_(alpha)
    head.beta.fill_(beta)
    scores = head.scores(
        torch.tensor(f, dtype=torch.float32), lambda: torch.tensor(text, dtype=torch.float32)
    )
    expected = 100 * f @ text.T + alpha * np.exp(-beta * (1 - f @ keys.T)) @ values
    np.testing.assert_allclose(head.logits(scores).detach().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_tip_search_takes_the_first_best_point_of_the_published_grid() -> None:
    data = _support()
    head = TipAdapterHead(HeadShape(3, 6))
    head.set_cache(F.normalize(data.views.mean(0), dim=-1), data.one_hot())
    val_f = torch.tensor(_unit(7, 6), dtype=torch.float32)
    val_y = torch.tensor(RNG.integers(0, 3, 7))
    data.val = (val_f, val_y)
    alpha, beta, accuracy = baselines.tip_search(head, data)
    best = (-1.0, None)
    f, k, v, t = (x.numpy().astype(np.float64) for x in (val_f, head.keys.detach(), head.values, data.text))
    for b in [i * (7 - 0.1) / 200 + 0.1 for i in range(200)]:
        for a in [j * (3 - 0.1) / 20 + 0.1 for j in range(20)]:
            logits = 100 * f @ t.T + a * np.exp(-b * (1 - f @ k.T)) @ v
            acc = float((logits.argmax(1) == val_y.numpy()).mean())
            if acc > best[0]:
                best = (acc, (a, b))
    assert accuracy == pytest.approx(best[0])
    assert (alpha, beta) == pytest.approx(best[1])


def test_lp_pp_start_and_step_sizes_by_hand() -> None:
    data = _support()
    weights, multipliers, step_w, step_alpha = baselines.lp_pp_start(data)
    f, t, y = data.plain.numpy().astype(np.float64), data.text.numpy().astype(np.float64), data.labels.numpy()
    sums = np.stack([f[y == c].sum(0) for c in range(3)])
    np.testing.assert_allclose(weights.numpy(), sums, rtol=1e-5, atol=1e-6)
    sim = f @ t.T
    own = [sim[y == c, c].mean() for c in range(3)]  # each class's shots against its own text
    np.testing.assert_allclose(multipliers.numpy(), np.full(3, 250 * np.mean(own)), rtol=1e-4)
    assert step_w == pytest.approx(4 * len(y) / np.linalg.eigvalsh(f.T @ f).max(), rel=1e-5)
    assert step_alpha == pytest.approx(len(y) / (4 * (sim**2).sum(0).max()), rel=1e-5)


def test_clap_multipliers_and_penalty_by_hand() -> None:
    data = _support()
    lam = baselines.clap_multipliers(data).numpy()
    views, t, y = (
        data.views.numpy().astype(np.float64),
        data.text.numpy().astype(np.float64),
        data.labels.numpy(),
    )
    logits = 100 * views @ t.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = [probs[:, y == c, c].mean() for c in range(3)]
    np.testing.assert_allclose(lam, expected, rtol=1e-4, atol=1e-6)
    w = data.text + 0.1
    penalty = baselines.clap_penalty(w, data.text, torch.tensor(lam, dtype=torch.float32))
    assert float(penalty) == pytest.approx(np.mean(np.array(lam) * 0.01 * 6), rel=1e-4)


def test_clap_augmented_lagrangian_step_by_hand() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # h = (1, 4)
    multipliers, rho = torch.tensor([0.5, 0.2]), torch.tensor([-1.0, 2.0])
    baselines.clap_update(multipliers, rho, prototypes, text)
    assert multipliers.tolist() == pytest.approx([0.0, 8.2])  # max(0, 0.5 − 1·1), 0.2 + 2·4
    assert rho.tolist() == [1.0, 4.0]


def test_ss_text_closed_form_by_hand() -> None:
    data = _support(n_per_class=(3, 0, 4))
    w = baselines.ss_text_weights(data).numpy()
    f, t, y = data.plain.numpy().astype(np.float64), data.text.numpy().astype(np.float64), data.labels.numpy()
    n = len(y)
    for c in range(3):
        n_c = (y == c).sum()
        expected = t[c] if n_c == 0 else 100 * (n_c / n) * f[y == c].sum(0) + t[c]
        np.testing.assert_allclose(w[c], expected, rtol=1e-4, atol=1e-4)


def test_holm_and_the_paired_test_against_savlt() -> None:
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06], abs=1e-12)
    seeds = range(10)
    ranked = rank_methods(
        {
            "savlt": {s: 0.80 + 0.001 * s for s in seeds},
            "better": {s: 0.90 + 0.002 * s for s in seeds},  # better on every draw
            "same": {s: 0.80 + 0.001 * s for s in seeds},
        }
    )
    assert [r.method for r in ranked] == ["better", "savlt", "same"]
    better = ranked[0]
    assert better.difference == pytest.approx(0.1045)
    assert better.p == pytest.approx(2 / 2**10)  # exact two-sided signed-rank p, all 10 signs positive
    assert better.p_holm == pytest.approx(2 * better.p)
    assert ranked[2].p == 1.0


def _center(per_class: dict[str, int]) -> CenterData:
    records = [
        ImageRecord(Path(f"/x/{label}/{i}.png"), f"images/{label}/{i}.png", "c", label)
        for label, n in per_class.items()
        for i in range(n)
    ]
    return CenterData("c", Path("/x"), records)


def test_protocols_draw_as_documented() -> None:
    sizes = {"a": 30, "b": 10, "c": 4}
    center = _center(sizes)
    rels = [r.rel for r in center.records]
    split = Split("c", rels, rels, [], "test")
    standard = sample_few_shot(split, center, 8, 1)
    coop = sample_few_shot(split, center, 8, 1, protocol="coop")
    assert standard.train == coop.train  # the same shots, a smaller validation draw
    assert len(standard.val) == 8 + 8 + 4 and len(coop.val) == 3 * 4
    realistic = sample_few_shot(split, center, 8, 1, protocol="realistic")
    counts = {label: sum(f"/{label}/" in rel for rel in realistic.train) for label in sizes}
    assert realistic.val == [] and sum(counts.values()) == 24 and min(counts.values()) >= 1
    assert counts["a"] > counts["c"]  # follows the pool (30 : 10 : 4)
    ratio = sample_few_shot(split, center, 8, 1, protocol="realistic", imbalance=4.0)
    counts = {label: sum(f"/{label}/" in rel for rel in ratio.train) for label in sizes}
    assert counts == {"a": 14, "b": 7, "c": 3}  # 24 in proportion to 4^0, 4^-1/2, 4^-1, largest class first
    assert set(PROTOCOLS) == set(typing.get_args(typing.get_type_hints(Config)["protocol"]))


def test_an_imbalance_ratio_needs_the_realistic_protocol() -> None:
    with pytest.raises(ConfigError, match="data.shot_imbalance applies to protocol=realistic"):
        load_config(overrides=["data.shot_imbalance=4"])


@pytest.mark.slow
def test_feature_methods_end_to_end_with_the_feature_cache(synth_root, tmp_path, one_thread) -> None:
    """Every feature-based method trains from the cache, saves its head, reloads it and predicts the
    same; a second run computes nothing; a changed scan alone is computed again."""
    from savlt.engine.features import FeatureCache
    from savlt.engine.loaded import load_run
    from savlt.engine.training import train

    computed: list[int] = []
    original = FeatureCache.features

    def counting(self, records, view=0, progress=False):
        before = self.computed
        out = original(self, records, view, progress)
        computed.append(self.computed - before)
        return out

    FeatureCache.features = counting
    try:
        per_method = []
        for method in [m for m, spec in METHODS.items() if spec.family == "feature-based"]:
            computed.clear()
            cfg = fast_config(
                synth_root, f"method={method}", "baselines.views=2", "data.test_centers=[huaxi]"
            )
            metrics = train(cfg, tmp_path / method, progress=False)
            again = load_run(tmp_path / method).evaluate(out=tmp_path / f"{method}-again", progress=False)
            assert metrics["complete"] and metrics["protocol"] == "standard"
            for center in ("mixed", "huaxi"):  # the saved head, reloaded, scores the same
                assert again["centers"][center]["accuracy"] == metrics["centers"][center]["accuracy"]
            per_method.append(sum(computed))
        # linear_probe computes the evaluation view, tip_adapter the training views; then all is cached
        assert per_method[0] > 0 and per_method[1] > 0 and not any(per_method[2:])
    finally:
        FeatureCache.features = original
    cache = next((synth_root.parent / "cache" / "features").glob("*/huaxi/view0.npz"))
    with np.load(cache) as data:
        assert len(data["keys"]) == 40


def test_the_cache_computes_a_changed_scan_again(synth_root, tmp_path, one_thread) -> None:
    import shutil

    from savlt.engine.features import FeatureCache, scan_key
    from savlt.engine.inputs import prepare_inputs
    from savlt.engine.runtime import build_model, make_accelerator

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    cfg = fast_config(root, "method=ss_text")
    model, _ = build_model(cfg, torch.device("cpu"))
    records = prepare_inputs(cfg).eval_sets()["huaxi"][:4]
    cache = FeatureCache(model, cfg, make_accelerator(cfg), tmp_path / "cache")
    first = cache.features(records)
    assert cache.computed == 4
    os.utime(records[0].path, ns=(1, 1))  # the file changed (its modification time)
    again = FeatureCache(model, cfg, make_accelerator(cfg), tmp_path / "cache")
    np.testing.assert_allclose(again.features(records), first, atol=1e-6)  # one scan recomputed alone
    assert again.computed == 1
    keys = json.dumps(sorted(np.load(again.path("huaxi", 0))["keys"].tolist()))
    assert scan_key(records[0]) in keys


def test_the_realistic_protocol_selects_and_calibrates_nothing(synth_root, tmp_path, one_thread) -> None:
    from savlt.engine.training import train

    cfg = fast_config(
        synth_root, "method=tip_adapter", "protocol=realistic", "baselines.views=1", "eval.figures=false"
    )
    metrics = train(cfg, tmp_path / "run", progress=False)
    few = json.loads((tmp_path / "run" / "fewshot.json").read_text())
    assert few["protocol"] == "realistic" and few["val"] == [] and len(few["train"]) == 4 * 5
    assert metrics["protocol"] == "realistic"
    assert metrics["validation_fit"]["temperature"] == 1.0
    assert any("no validation scans" in w for w in metrics["validation_fit"]["warnings"])
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["tip_alpha"] == 1.0 and history[-1]["tip_beta"] == 1.0  # fixed, not searched
    report = (tmp_path / "run" / "report.md").read_text()
    assert "**protocol**: realistic" in report and "nothing was selected and nothing calibrated" in report
    assert not list((tmp_path / "run").glob("*.png")) and ".png" not in report  # eval.figures=false
