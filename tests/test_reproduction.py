"""The published code's behaviour as options: each one against an independent expectation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, fast_config, tiny_model
from PIL import Image
from sklearn.metrics import roc_auc_score

from savlt.cli import main
from savlt.config import load_config
from savlt.data.discover import scan_dataset
from savlt.data.splits import load_split
from savlt.data.transforms import eval_transform
from savlt.engine.fit import _update_again
from savlt.engine.inputs import StepBatches, prepare_inputs
from savlt.engine.metrics import center_metrics, risk_scores
from savlt.engine.training import train
from savlt.errors import SavltError
from savlt.models.adapters import adapter_config
from savlt.models.backbone import build_random
from savlt.models.pooling import RoiAttentionPool
from savlt.models.roi import patches_in_boxes, roi_boxes
from savlt.models.savlt import SavltModel
from savlt.normalization import NORMALIZATION, normalization
from savlt.seg import SegmenterError, load_segmenter
from savlt.seg.model import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = ["inflammation", "cyst", "ectropion", "hsil", "cancer"]
RISK = np.array([False, False, False, True, True])


# ------------------------------------------------------------------ model options


def test_pre_layernorm_tokens_are_pooled_as_published() -> None:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 224, 224)
    published = tiny_model("model.pooling=attn", "model.token_layernorm=false").eval()
    with torch.no_grad():
        features = published(pixels).features
        clip = published.clip_model
        tokens = clip.vision_model(pixel_values=pixels).last_hidden_state[
            :, 1:
        ]  # HF's own forward, before the final LN
        pooled, _ = published.pool(tokens, None)
        expected = F.normalize(clip.visual_projection(pooled), dim=-1)
        after_ln, _ = published.pool(clip.vision_model.post_layernorm(tokens), None)
    assert torch.allclose(features, expected, atol=1e-6)
    assert not torch.allclose(features, F.normalize(clip.visual_projection(after_ln), dim=-1), atol=1e-3)


def test_reference_pool_init_is_the_published_one() -> None:
    dim, heads = 96, 4
    torch.manual_seed(7)
    queries = torch.nn.init.xavier_uniform_(torch.empty(1, heads, dim // heads))[0]
    linear = torch.nn.Linear(dim, dim)  # PyTorch's default init, drawn right after the queries
    torch.manual_seed(7)
    pool = RoiAttentionPool(dim, heads, init="reference")
    assert torch.equal(pool.queries.data, queries)
    assert torch.equal(pool.proj.weight.data, linear.weight.data) and torch.equal(
        pool.proj.bias.data, linear.bias.data
    )
    bound = math.sqrt(6 / (dim + dim // heads))  # fan_in H·D/H, fan_out D/H of the (1, H, D/H) tensor
    assert pool.queries.abs().max() <= bound and pool.queries.abs().max() > bound / 2
    identity = RoiAttentionPool(dim, heads)
    assert torch.equal(identity.proj.weight.data, torch.eye(dim)) and identity.queries.abs().max() < 0.2


def test_imagenet_normalisation_of_pixels() -> None:
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    pixels = eval_transform(32, NORMALIZATION["imagenet"])(image=image)["image"]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        assert pixels[c].flatten()[0].item() == pytest.approx((128 / 255 - mean[c]) / std[c], abs=1e-5)
    clip = eval_transform(32, normalization("backbone", build_random().normalization))(image=image)["image"]
    assert clip[0, 0, 0].item() == pytest.approx(
        (128 / 255 - NORMALIZATION["clip"][0][0]) / NORMALIZATION["clip"][1][0], abs=1e-5
    )


def test_evaluation_with_the_training_transform_is_the_published_one_seeded_per_scan(
    synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import albumentations as A
    import cv2
    from accelerate import Accelerator
    from albumentations.pytorch import ToTensorV2
    from PIL import Image

    from savlt.engine.inference import run_inference, view_seed
    from savlt.models.savlt import model_from_config

    cfg = load_config(
        overrides=[
            "eval.transform=train",
            "data.normalize=imagenet",
            "data.num_workers=0",
            "model.pooling=cls",
        ]
    )
    records = scan_dataset(synth_root, cfg.class_map(), ["huaxi"]).center("huaxi").records[:5]
    model = model_from_config(cfg, build_random())
    seen: list[torch.Tensor] = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda pixels, masks=None: (seen.append(pixels), forward(pixels, masks))[1]
    )
    first = run_inference(model, records, cfg, Accelerator(cpu=True), None, progress=False)
    again = run_inference(model, records, cfg, Accelerator(cpu=True), None, progress=False)
    assert np.array_equal(first.logits, again.logits)  # seeded per scan: an evaluation is repeatable
    published = A.Compose(  # the published main.py's transform, which its test loaders use too
        [
            A.RandomResizedCrop(size=(224, 224), scale=(0.75, 1.0), interpolation=cv2.INTER_CUBIC),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ToTensorV2(),
        ]
    )
    expected = []
    for record in records:
        published.set_random_seed(view_seed(record, 0))
        expected.append(published(image=np.array(Image.open(record.path).convert("RGB")))["image"])
    assert torch.allclose(seen[0], torch.stack(expected), atol=1e-6)
    deterministic = load_config(
        overrides=["data.normalize=imagenet", "data.num_workers=0", "model.pooling=cls"]
    )
    resized = run_inference(model, records, deterministic, Accelerator(cpu=True), None, progress=False)
    assert not np.allclose(resized.logits, first.logits)


# ------------------------------------------------------------------ the AUC score


def test_logit_sum_auc_is_the_published_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (60, 5))
    labels = rng.integers(0, 5, 60)
    published = 1 / (1 + np.exp(-(logits[:, 3:].sum(1) - logits[:, :3].sum(1))))  # sigmoid of the sums
    m = center_metrics(labels, logits, CLASSES, ["hsil", "cancer"], resamples=0, screen_score="logit_sum")
    assert m["binary"]["auc"] == pytest.approx(roc_auc_score(RISK[labels], published))
    mass = m_prob = center_metrics(labels, logits, CLASSES, ["hsil", "cancer"], resamples=0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert mass["binary"]["auc"] == pytest.approx(roc_auc_score(RISK[labels], probs[:, 3:].sum(1)))
    assert m_prob["binary"]["accuracy"] == m["binary"]["accuracy"]  # only the ranking score differs


def test_confident_scans_do_not_tie() -> None:
    # Two confident positives and a confident negative: every probability mass rounds to 1.0.
    logits = np.array([[0, 0, 0, 70.0, 0], [0, 0, 0, 60.0, 0], [0, 0, 0, 50.0, 0]])
    mass = np.exp(logits - logits.max(1, keepdims=True))
    mass = (mass[:, 3:].sum(1) / mass.sum(1)).astype(np.float32)
    assert len(set(mass.tolist())) == 1  # the old float32 score tied them all
    scores = risk_scores(logits, RISK)
    assert scores[0] > scores[1] > scores[2]
    m = center_metrics([3, 4, 1], logits, CLASSES, ["hsil", "cancer"], resamples=0)
    assert m["binary"]["auc"] == 1.0


def published_auc(labels: np.ndarray, logits: np.ndarray) -> float:
    """The published evaluation's AUC, transcribed (labels are the sorted class folders: cancer 0,
    cyst 1, ectropion 2, HSIL 3, mild inflammation 4; the high-risk ones are 0 and 3)."""
    all_logits = torch.from_numpy(logits.astype(np.float32))
    pos_score = all_logits[:, [0, 3]].sum(dim=1)
    neg_score = all_logits[:, [1, 2, 4]].sum(dim=1)
    binary_probs = torch.stack([neg_score, pos_score], dim=1)
    binary_softmax = torch.softmax(binary_probs, dim=1)[:, 1]
    binary_labels = [1 if label in [0, 3] else 0 for label in labels]
    return roc_auc_score(binary_labels, binary_softmax.numpy())


def test_float32_logit_sum_auc_saturates_as_published() -> None:
    rng = np.random.default_rng(3)
    published_order = ["cancer", "cyst", "ectropion", "hsil", "inflammation"]
    labels = rng.integers(0, 5, 400)
    positive = np.isin(labels, [0, 3])
    # the sums differ by more than 16.6 on many scans (common at scale 100), where float32's softmax
    # reaches 1.0: confident positives and confident false positives tie
    margin = np.where(positive, rng.uniform(5, 60, 400), rng.uniform(-40, 25, 400))
    logits = rng.normal(25, 2, (400, 5))
    logits[:, 4] = (
        logits[:, 0] + logits[:, 3] - logits[:, 1] - logits[:, 2] - margin
    )  # Σ high − Σ other = margin
    logits = logits.astype(np.float32)
    m = center_metrics(
        labels, logits, published_order, ["cancer", "hsil"], resamples=0, screen_score="logit_sum_float32"
    )
    expected = published_auc(labels, logits)
    assert m["binary"]["auc"] == pytest.approx(expected, abs=1e-12)
    in_float64 = center_metrics(
        labels, logits, published_order, ["cancer", "hsil"], resamples=0, screen_score="logit_sum"
    )
    assert in_float64["binary"]["auc"] > expected + 0.005  # the ties cost the published AUC points
    scores = risk_scores(logits, np.array([True, False, False, True, False]), "logit_sum_float32")
    assert (scores == 1.0).sum() > 20  # saturated, and so tied


def test_the_float32_score_ignores_the_temperature() -> None:
    from savlt.engine.calibration import delivered_logits, screen_scores

    class Scaled:  # a calibration's temperature, the only part the scores read
        temperature = 4.0

    logits = np.array([[0, 0, 0, 20.0, 0], [0, 0, 0, 10.0, 0]], dtype=np.float32)
    raw = screen_scores(Scaled(), logits, RISK, "logit_sum_float32")
    assert np.array_equal(raw, risk_scores(logits, RISK, "logit_sum_float32"))
    assert raw[0] == 1.0 and raw[1] < 1.0  # the published code has no temperature: 20 saturates
    calibrated = screen_scores(Scaled(), logits, RISK, "probability")
    assert np.array_equal(calibrated, risk_scores(delivered_logits(Scaled(), logits), RISK))


# ------------------------------------------------------------------ training quirks


def test_double_update_is_two_adamw_steps_for_the_backbone() -> None:
    torch.manual_seed(0)
    adapter, head = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    twice, once = adapter.detach().clone().requires_grad_(), head.detach().clone().requires_grad_()
    grads = torch.randn(4), torch.randn(3)
    optimizer = torch.optim.AdamW([{"params": [adapter]}, {"params": [head]}], lr=0.1, weight_decay=0.01)
    adapter.grad, head.grad = grads[0].clone(), grads[1].clone()
    optimizer.step()
    _update_again(optimizer, [head])
    reference = torch.optim.AdamW([twice, once], lr=0.1, weight_decay=0.01)
    twice.grad, once.grad = grads[0].clone(), grads[1].clone()
    reference.step()
    once.grad = None
    reference.step()  # a second step with the same gradient, for the adapter alone
    assert torch.allclose(adapter, twice) and torch.allclose(head, once)
    assert head.grad is not None  # the gradients are left as they were


def test_quirks_change_training_and_stay_in_eval_mode(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    modes: list[bool] = []
    original = SavltModel.loss

    def recording(self, out, labels):
        modes.append(self.training)
        return original(self, out, labels)

    monkeypatch.setattr(SavltModel, "loss", recording)
    extra = ("data.test_centers=[]", "train.max_steps=3", "train.val_every=1", "peft.dropout=0.25")
    base = train(fast_config(synth_root, *extra), tmp_path / "base", progress=False)
    assert modes == [True, True, True]
    modes.clear()
    quirks = ("train.eval_mode_after_validation=true", "train.double_adapter_update=true")
    ref = train(fast_config(synth_root, *extra, *quirks), tmp_path / "ref", progress=False)
    assert modes == [True, False, False]  # dropout is off once the first validation ran
    assert ref["centers"]["mixed"]["confusion"] != base["centers"]["mixed"]["confusion"] or (
        ref["centers"]["mixed"]["binary"]["auc"] != base["centers"]["mixed"]["binary"]["auc"]
    )


def test_epoch_batches_keep_the_short_last_batch() -> None:
    sampler = StepBatches(size=10, batch_size=4, steps=7, seed=0, epochs=True)
    assert sampler.sizes == [4, 4, 2, 4, 4, 2, 4]
    assert sampler.epoch_end == [False, False, True, False, False, True, False]
    first = [i for batch in sampler.batches[:3] for i, _ in batch]
    second = [i for batch in sampler.batches[3:6] for i, _ in batch]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second  # reshuffled
    with pytest.raises(Exception, match="last batch of an epoch holds 1 images"):
        StepBatches(size=9, batch_size=4, steps=3, seed=0, world=2, epochs=True)


def test_a_fixed_fewshot_seed_shares_one_draw(synth_root: Path) -> None:
    draws = [
        prepare_inputs(fast_config(synth_root, f"train.seed={s}", "data.fewshot_seed=42"))
        for s in (5, 42, 123)
    ]
    assert draws[0].few_shot.train == draws[1].few_shot.train == draws[2].few_shot.train
    own = [prepare_inputs(fast_config(synth_root, f"train.seed={s}")) for s in (5, 123)]
    assert own[0].few_shot.train != own[1].few_shot.train


# ------------------------------------------------------------------ adapters


def test_published_adapter_variants() -> None:
    cfg = load_config(overrides=["peft.type=adalora", "peft.variant=published"]).peft
    tiny = build_random()
    ada = adapter_config(cfg, tiny, total_steps=320)
    assert (ada.init_r, ada.target_r, ada.total_step, ada.lora_dropout) == (32, 8, 1000, 0.0)
    ours = adapter_config(load_config(overrides=["peft.type=adalora"]).peft, tiny, total_steps=320)
    assert (ours.init_r, ours.total_step) == (12, 320)
    loha = adapter_config(load_config(overrides=["peft.type=loha", "peft.variant=published"]).peft, tiny, 320)
    assert (loha.module_dropout, loha.rank_dropout) == (0.1, 0.0)
    text = tiny_model("peft.text=true", "peft.variant=published")
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    assert any("text_projection" in n for n in trainable)
    ranks = {p.shape[0] for n, p in text.named_parameters() if "text_model" in n and "lora_A" in n}
    assert ranks == {8}  # the vision rank, not peft.text_r
    ours_text = tiny_model("peft.text=true")
    assert {p.shape[0] for n, p in ours_text.named_parameters() if "text_model" in n and "lora_A" in n} == {2}


# ------------------------------------------------------------------ ROI rule


def test_roi_start_row_is_the_published_floor() -> None:
    masks = torch.zeros(1, 224, 224, dtype=torch.uint8)
    masks[0, 22:] = 1  # int(0.1 * 224) = 22: the first row that may start the ROI
    boxes, fallback = roi_boxes(masks, 0.1)
    assert boxes[0, 1].item() == pytest.approx(22 / 224) and not fallback[0]


def published_patch_rows(y: int, height: int, grid: int) -> list[int]:
    """The published ROI pooling's patch test, transcribed: the box (0.0, y / h, 1.0, 1.0) from its
    ROI extractor, every patch compared exactly in Python floats; the rows of the kept patches."""
    x_min, y_min, x_max, y_max = (0.0, y / height, 1.0, 1.0)
    step = 1.0 / grid
    rows = set()
    for r in range(int(y_min / step), min(int(y_max / step) + 1, grid)):
        for x in range(int(x_min / step), min(int(x_max / step) + 1, grid)):
            if (
                x_min <= x * step
                and (x + 1) * step <= x_max
                and y_min <= r * step
                and (r + 1) * step <= y_max
            ):
                rows.add(r)
    return sorted(rows)


def test_patch_selection_differs_from_exact_float_comparison_at_four_heights() -> None:
    """The published code compares floats exactly; ours allows 1e-6 (docs/method.md, the reproduction table)."""
    grid = 14
    differ = []
    for y in range(224):
        box = torch.tensor([[0.0, y / 224, 1.0, 1.0]])
        keep, _ = patches_in_boxes(box, grid)
        ours = sorted({i // grid for i in keep[0].nonzero().flatten().tolist()})
        if published_patch_rows(y, 224, grid) != ours:
            differ.append((y, bool(published_patch_rows(y, 224, grid))))
    # the edge patch row is dropped at three heights; from 208 on no whole patch is left, where
    # the published code stops with an error and ours pools over every patch
    assert differ == [(80, True), (144, True), (160, True), *((y, False) for y in range(208, 224))]


@pytest.mark.parametrize(("height", "grid"), [(224, 14), (224, 7), (336, 24), (96, 6)])
def test_the_published_patch_rule_is_the_exact_comparison(height: int, grid: int) -> None:
    masks = torch.zeros(height, height, height, dtype=torch.uint8)
    for y in range(height):  # mask y: tissue from row y down, so its ROI starts at y (or falls back)
        masks[y, y:] = 1
    boxes, no_row = roi_boxes(masks, 0.0)
    keep, no_patch = patches_in_boxes(boxes, grid, "published", height)
    for y in range(height):
        published = published_patch_rows(y, height, grid)
        rows = sorted({i // grid for i in keep[y].nonzero().flatten().tolist()})
        assert rows == (published or list(range(grid))), y  # the published crash: the whole image
        assert bool(no_patch[y]) == (not published), y
    assert not no_row.any()


def test_a_box_without_a_whole_patch_is_a_counted_fallback() -> None:
    model = tiny_model("roi.patch_rule=published").eval()
    masks = torch.zeros(3, 224, 224, dtype=torch.uint8)
    masks[0, 40:], masks[1, 210:], masks[2, 144:] = 1, 1, 1
    with torch.no_grad():
        out = model(torch.randn(3, 3, 224, 224), masks)
    assert out.fallback.tolist() == [False, True, False]
    default = tiny_model().eval()
    with torch.no_grad():
        assert default(torch.randn(3, 3, 224, 224), masks).fallback.tolist() == [False, True, False]


class Brightness(torch.nn.Module):
    """A stand-in segmentation network: tissue where the input is brighter than a level."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.mean(1, keepdim=True) + 0.6) * 25  # (B, 1, H, W) logits


def published_boxes(network: torch.nn.Module, images: torch.Tensor) -> list:
    """The published ROI extractor, transcribed: the network (sigmoid output) on the model's input
    batch, > 0.5, then the first all-tissue row at or below int(0.1 · h) per mask (None: none)."""

    def find_largest_foreground_bbox(mask, min_y_ratio=0.1):
        h, w = mask.shape
        min_y = int(h * min_y_ratio)
        for y in range(min_y, h):
            if np.all(mask[y, :] == 1):
                return (0.0, y / h, 1.0, 1.0)
        return None

    with torch.no_grad():
        masks = torch.sigmoid(network(images))
        pred_masks = (masks.squeeze(1).cpu().numpy() > 0.5).astype(np.uint8)
    return [find_largest_foreground_bbox(mask) for mask in pred_masks]


def test_crop_timing_segments_each_model_input_as_published(synth_root: Path) -> None:
    from functools import partial

    from savlt.data.transforms import train_transform
    from savlt.seg import SegmenterSpec, TissueSegmenter

    segmenter = TissueSegmenter(Brightness(), SegmenterSpec("unet", "resnet18", (64, 64)), device="cpu")
    model = tiny_model("data.normalize=imagenet").eval()
    model.input_masks = partial(segmenter.masks_of_inputs, stats=NORMALIZATION["imagenet"])
    records = scan_dataset(synth_root, load_config().class_map(), ["huaxi"]).center("huaxi").records
    transform = train_transform(224, (0.75, 1.0), True, NORMALIZATION["imagenet"])
    pixels = []
    for seed, record in enumerate(records):
        transform.set_random_seed(seed)
        pixels.append(transform(image=np.array(Image.open(record.path).convert("RGB")))["image"])
    batch = torch.stack(pixels)
    with torch.no_grad():
        out = model(
            batch, torch.ones(len(records), 224, 224, dtype=torch.uint8)
        )  # the masks handed in are unused
    expected = published_boxes(Brightness(), batch)
    assert any(box is not None and box[1] > 0.15 for box in expected) and any(box is None for box in expected)
    for box, ours, fallback in zip(expected, out.boxes.tolist(), out.fallback.tolist(), strict=True):
        assert fallback == (box is None)  # the published code crashes there; here the whole image
        assert ours == (pytest.approx([0.0, 0.0, 1.0, 1.0]) if box is None else pytest.approx(box, abs=1e-7))


# ------------------------------------------------------------------ published artefacts


def test_a_published_split_file_relative_to_images_is_accepted(synth_root: Path, tmp_path: Path) -> None:
    center = scan_dataset(synth_root, load_config().class_map(), ["mixed"]).center("mixed")
    rels = sorted(center.by_rel())

    def entry(rel: str) -> list:  # the published format: [path below images/, label, classname]
        return [rel.removeprefix("images/"), 0, rel.split("/")[1]]

    split = {
        "train": [entry(r) for r in rels[:20]],
        "val": [entry(r) for r in rels[20:30]],
        "test": [entry(r) for r in rels[30:]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    loaded = load_split(tmp_path / "split.json", center)
    assert loaded.train == rels[:20] and loaded.test == rels[30:]


def test_seg_import_of_a_plain_state_dict(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    net = build_model("unet", "resnet18").eval()
    torch.save(net.state_dict(), tmp_path / "unet_best_model_fold0.pth")
    args = [
        "seg",
        "import",
        str(tmp_path / "unet_best_model_fold0.pth"),
        "--arch",
        "unet",
        "--encoder",
        "resnet18",
    ]
    assert main([*args, "--out", str(tmp_path / "seg"), "--trained-on", "mixed"]) == 0
    segmenter = load_segmenter(tmp_path / "seg")
    assert segmenter.spec.input_size == (224, 224) and segmenter.spec.mean == (0.485, 0.456, 0.406)
    assert segmenter.spec.trained["centers"] == ["mixed"]
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        x = (
            torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
            - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        ) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        expected = torch.sigmoid(net(x))[0, 0].numpy()
    assert np.allclose(segmenter.probabilities([image])[0], expected, atol=1e-5)
    # another architecture, not a state dict, not a torch file: one-line errors
    torch.save(build_model("linknet", "resnet18").state_dict(), tmp_path / "linknet.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    for name, message in (
        ("linknet.pth", "is not a state dict of a unet"),
        ("list.pth", "does not hold a state dict"),
        ("junk.pth", "cannot read"),
    ):
        assert (
            main(
                [
                    "seg",
                    "import",
                    str(tmp_path / name),
                    "--arch",
                    "unet",
                    "--encoder",
                    "resnet18",
                    "--out",
                    str(tmp_path / name[:-4]),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SegmenterError, match="does not exist"):
        load_segmenter(tmp_path / "nothing")


def test_the_segmenter_learns_from_the_training_center_only_and_runs_record_it(
    synth_root: Path, tmp_path: Path, one_thread
) -> None:
    seg = ["seg", "train", "--data", str(synth_root), "--folds", "2", "--epochs", "1", "--image-size", "32"]
    assert main([*seg, "--out", str(tmp_path / "seg"), "-q", "--set", "seg.encoder_weights=none"]) == 0
    folder = tmp_path / "seg" / "fold0"
    assert load_segmenter(folder).spec.trained["centers"] == ["mixed"]
    assert load_config(tmp_path / "seg" / "config.yaml").seg.centers == ["mixed"]
    metrics = train(
        fast_config(synth_root, f"roi.segmenter={folder}", "data.test_centers=[xiangya]"),
        tmp_path / "run",
        progress=False,
    )
    prior = metrics["structure_prior"]
    assert prior["mask_source"] == "segmenter" and prior["segmenter_centers"] == ["mixed"]
    assert prior["evaluated_centers_seen"] == ["mixed"]
    assert "trained on masks of evaluated center(s) mixed" in (tmp_path / "run" / "report.md").read_text()
    files = train(
        fast_config(synth_root, "roi.mask_source=files", "data.test_centers=[xiangya]"),
        tmp_path / "files",
        progress=False,
    )
    assert files["structure_prior"]["annotated_masks_at_test_time"] == ["mixed", "xiangya"]
    assert "annotated tissue masks were used at test time" in (tmp_path / "files" / "report.md").read_text()


# The published prompt file's "prompt B" (keys are the published class folders).
PROMPT_B = {
    "mild_inflammation": "A scan of inflamed cervical tissue showing a textured surface layer, and deeper layers "
    "with a clear dividing line leading into the stroma.",
    "cyst": "A cervical tissue scan shows a clearly textured surface layer. In the middle or lower part of the "
    "image, a distinct dark elliptical or curved region is visible, which is characteristic of a cyst.",
    "ectropion": "A cervical tissue scan featuring distinct clusters of protruding structures, representing the "
    "hallmark appearance of columnar epithelium eversion.",
    "high-grade_squamous_intraepithelial_lesion": "The image features alternating light and dark vertical "
    "streaks resembling icy peak formations, indicating significant structural disruption.",
    "cancer": "The image contains irregular structures and potential clusters resembling cancer nests, with "
    "significant disruption in the normal tissue architecture.",
}


def test_the_biomedclip_profile_is_the_published_variant(
    synth_root: Path, tmp_path: Path, one_thread
) -> None:
    overrides = [*FAST, "roi.mask_source=classical", "roi.mask_timing=scan", "data.test_centers=[]"]
    values = {"data.root": synth_root, "data.cache_dir": tmp_path / "cache"}
    reference = load_config(CONFIGS / "paper_reference.yaml", overrides, values)
    cfg = load_config(
        CONFIGS / "paper_reference_biomedclip.yaml", [*overrides, "model.backbone=tiny-openclip"], values
    )
    assert {c.name: c.description for c in cfg.data.classes} == PROMPT_B
    assert cfg.method_spec.roi_masking == "every_block" and cfg.model.inference_scale is None
    assert not cfg.train.double_adapter_update
    differ = {
        key
        for section in ("model", "peft", "roi", "data", "train", "eval")
        for key, value in vars(getattr(reference, section)).items()
        if getattr(getattr(cfg, section), key) != value
    }  # every other setting is the reference profile's
    assert differ == {"backbone", "roi_masking", "inference_scale", "classes", "double_adapter_update"}
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["complete"] and metrics["centers"]["mixed"]["n"] == 15


def test_predictions_at_the_learned_logit_scale() -> None:
    from savlt.models.savlt import model_from_config

    pixels, masks = torch.randn(2, 3, 224, 224), torch.ones(2, 224, 224, dtype=torch.uint8)
    logits = {}
    for scale in ("null", "100"):
        backbone = build_random()
        with torch.no_grad():
            backbone.logit_scale.fill_(math.log(30.0))
        torch.manual_seed(0)
        model = model_from_config(load_config(overrides=[f"model.inference_scale={scale}"]), backbone).eval()
        assert model.inference_scale == pytest.approx(30.0 if scale == "null" else 100.0)
        with torch.no_grad():
            logits[scale] = model.logits(model(pixels, masks))
    assert torch.allclose(logits["null"] * 100 / 30, logits["100"], atol=1e-4)


def test_the_reference_profile_trains_end_to_end(synth_root: Path, tmp_path: Path, one_thread) -> None:
    from savlt.engine.loaded import load_run
    from savlt.seg import SegmenterSpec, TissueSegmenter, save_segmenter

    torch.manual_seed(0)
    network = build_model("unet", "resnet18")
    save_segmenter(TissueSegmenter(network, SegmenterSpec("unet", "resnet18", (64, 64))), tmp_path / "seg")
    cfg = load_config(
        CONFIGS / "paper_reference.yaml",
        [*FAST, "data.test_centers=[]"],
        {"data.root": synth_root, "data.cache_dir": tmp_path / "cache", "roi.segmenter": tmp_path / "seg"},
    )
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["complete"] and metrics["centers"]["mixed"]["n"] == 15
    assert metrics["structure_prior"]["mask_timing"] == "crop"  # the segmenter on each model input
    run = load_run(tmp_path / "run")
    assert run.model.input_masks is not None and run.evaluate(progress=False)["centers"] == metrics["centers"]
    assert len(run.predict([np.full((80, 90, 3), 90, np.uint8)])) == 1
    with pytest.raises(SavltError, match="roi.mask_timing=crop runs the segmenter on each model input"):
        load_config(overrides=["roi.mask_timing=crop"])
    few = json.loads((tmp_path / "run" / "fewshot.json").read_text())
    assert few["seed"] == 42
