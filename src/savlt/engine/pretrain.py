"""``savlt pretrain``: domain-adaptive contrastive pretraining of a CLIP backbone on image–text pairs.

The CLIP loss (symmetric cross-entropy over the batch, learnable temperature) trains the whole
model, or LoRA adapters on both towers (``pretrain.adapters=lora``, merged into the weights at the
end). AdamW with a linear warm-up and cosine decay, gradient accumulation, bf16 on a GPU, on
``accelerate`` like ``savlt train``; with several processes each one contrasts its share of the
batch. A held-out share of the pairs gives image→text and text→image recall@1/5 as training goes.

OUT/config.yaml          the configuration (pretrain.*, model.backbone, data.image_size …)
OUT/history.jsonl        loss, lr and held-out recall per step, written as it goes
OUT/checkpoint/          the last resumable state (trained tensors, optimiser, step)
OUT/config.json, model.safetensors, tokenizer files, preprocessor_config.json
                         the pretrained CLIP: ``--model OUT`` loads it (with the mean and std it
                         was trained with, for ``data.normalize=backbone``)
OUT/README.md            the model card: data, steps, recall figures, how to rebuild it
OUT/savlt-manifest.json  what wrote the folder and, once finished, every file it wrote

OUT is written only when it is missing, empty or holds a pretraining and nothing SAVLT did not
write there (it is continued, see ``_resume``; ``savlt.outputs``); never inside, around or over
the pairs, nor over the backbone it starts from. A user error before the first checkpoint leaves
OUT as it was found.

It trains Hugging Face CLIP backbones (the output is a Hugging Face CLIP folder); open_clip
backbones are refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from savlt.config import Config, ConfigError, PeftConfig, load_config
from savlt.data.pairs import Pair, PairDataset, load_pairs, split_pairs
from savlt.data.transforms import eval_transform, train_transform
from savlt.engine.inference import loader_for, start_loader_workers
from savlt.engine.inputs import StepBatches
from savlt.engine.loop import run_steps
from savlt.engine.runfolder import run_inputs, same_run, with_absolute_paths
from savlt.engine.runtime import backbone_for, log_to, make_accelerator, on_main, seed_everything
from savlt.errors import SavltError
from savlt.io import (
    append_line,
    atomic_path,
    check_inputs_outside,
    ordinary_permissions,
    write_json,
    write_text,
)
from savlt.models.adapters import add_adapters
from savlt.models.hf_clip import HFClip
from savlt.normalization import Stats, normalization
from savlt.outputs import claim_folder

log = logging.getLogger("savlt")

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature at 1/100


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss for L2-normalised features (B, E) of B matching pairs: the mean of the
    cross-entropies image→text and text→image, with logits exp(logit_scale)·image·textᵀ."""
    logits = logit_scale.exp() * image @ text.T  # (B, B)
    targets = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways for an (N, N) image×text similarity whose diagonal holds the pairs."""
    n = similarity.shape[0]
    truth = torch.arange(n, device=similarity.device)
    out = {}
    for name, sims in (("i2t", similarity), ("t2i", similarity.T)):
        rank = (sims > sims[truth, truth][:, None]).sum(dim=1)  # how many beat the true match
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


@dataclass
class Towers:
    """The two encoders of a (possibly adapted) CLIP, as the loss and the recall need them."""

    clip: nn.Module  # an HFClip, or a PeftModel around one

    @property
    def base(self) -> HFClip:
        return self.clip.base_model.model if isinstance(self.clip, PeftModel) else self.clip

    def features(
        self, module: nn.Module, pixels: torch.Tensor, texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features of matching pairs, and the logit scale, through
        `module`: the towers themselves, or the process-group wrapper ``accelerate`` made of them,
        which shares the gradients between processes only when the call goes through it."""
        ids, mask = self.base.tokenize(texts)
        return module(pixels, ids.to(pixels.device), mask.to(pixels.device))


class PretrainPaths:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.history = self.root / "history.jsonl"
        self.checkpoint = self.root / "checkpoint"
        self.card = self.root / "README.md"


def _towers(cfg: Config, backbone: HFClip) -> Towers:
    clip: nn.Module = backbone
    if cfg.pretrain.adapters == "lora":
        backbone.requires_grad_(False)
        clip = add_adapters(
            backbone, PeftConfig(text=True, text_r=8, text_alpha=16.0, r=8, alpha=16.0, dropout=0.0), 1
        )
        for param in backbone.projections(text=True):
            param.requires_grad_(True)
    else:
        backbone.requires_grad_(True)
    backbone.logit_scale.requires_grad_(True)
    if cfg.pretrain.init_temperature is not None:
        with torch.no_grad():
            backbone.logit_scale.fill_(math.log(1 / cfg.pretrain.init_temperature))
    return Towers(clip)


def _lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up over pretrain.warmup of the steps, then cosine decay to 0."""
    warm = max(1, round(cfg.pretrain.warmup * total))
    if step < warm:
        return cfg.pretrain.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.pretrain.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_recall(
    towers: Towers, pairs: list[Pair], cfg: Config, accelerator: Accelerator
) -> dict[str, float]:
    """Recall@1/5 image→text and text→image over the held-out pairs (one process scores them)."""
    was = towers.clip.training
    towers.clip.eval()
    stats = normalization(cfg.data.normalize, towers.base.normalization)
    dataset = PairDataset(pairs, eval_transform(cfg.data.image_size, stats))
    loader = loader_for(dataset, cfg, cfg.eval.batch_size, accelerator.device, shuffle=False)
    images, texts = [], []
    for pixels, index in loader:
        with accelerator.autocast():
            image, text, _ = towers.features(
                towers.clip, pixels.to(accelerator.device), [pairs[i].text for i in index.tolist()]
            )
        images.append(image)
        texts.append(text)
    towers.clip.train(was)
    return recall_at(torch.cat(images) @ torch.cat(texts).T)


def _trainable(towers: Towers) -> dict[str, nn.Parameter]:
    return {n: p for n, p in towers.clip.named_parameters() if p.requires_grad}


def _save_checkpoint(
    paths: PretrainPaths, towers: Towers, optimizer: torch.optim.Optimizer, step: int
) -> None:
    folder = paths.checkpoint
    state = {n: p.detach().cpu().contiguous() for n, p in _trainable(towers).items()}
    with atomic_path(folder / "trained.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_path(folder / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    write_json(folder / "state.json", {"step": step})  # written last: the checkpoint is complete


def _resume(paths: PretrainPaths, cfg: Config, towers: Towers, optimizer: torch.optim.Optimizer) -> int:
    """The step to start from: 0, or the last checkpoint's when this folder holds the same run."""
    state_file = paths.checkpoint / "state.json"
    if not state_file.is_file():
        return 0
    saved = load_config(paths.config)
    # pretrain.stop_after does not define the run: it may be continued or ended earlier
    if not same_run(saved, cfg, leave_out=("seg",)):
        raise ConfigError(
            f"{paths.root} holds a pretraining run with another configuration: use another --out "
            f"folder, or delete {paths.checkpoint} to start again"
        )
    try:
        step = int(json.loads(state_file.read_text())["step"])
        tensors = load_file(str(paths.checkpoint / "trained.safetensors"))
        optimizer.load_state_dict(torch.load(paths.checkpoint / "optimizer.pt", weights_only=True))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SavltError(
            f"the checkpoint in {paths.checkpoint} cannot be read ({exc}); delete it to start again"
        ) from None
    params = _trainable(towers)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    log.info("resuming from step %d (%s)", step, paths.checkpoint)
    return step


def _model_card(
    paths: PretrainPaths,
    cfg: Config,
    n_train: int,
    n_val: int,
    steps: int,
    recall: dict[str, float],
    stats: Stats,
) -> None:
    p = cfg.pretrain
    figures = ", ".join(f"{k} {v:.3f}" for k, v in recall.items())
    mean, std = (", ".join(f"{v:.4g}" for v in part) for part in stats)
    lines = [
        f"# CLIP pretrained with `savlt pretrain`: {paths.root.name}",
        "",
        f"- started from: `{cfg.model.backbone}`; {'LoRA adapters, merged' if p.adapters == 'lora' else 'full fine-tuning'}",
        f"- data: `{p.pairs}` ({n_train} training pairs, {n_val} held out)",
        f"- {steps} steps of batch {p.batch_size} × {p.grad_accum} (cosine schedule over {p.max_steps} steps), "
        f"AdamW lr {p.lr:g}, weight decay {p.weight_decay:g}, warm-up {p.warmup:g}; input "
        f"{cfg.data.image_size}, normalisation mean ({mean}) std ({std}) (`data.normalize={cfg.data.normalize}`, "
        f"in preprocessor_config.json); seed {p.seed}",
        f"- held-out recall: {figures}",
        "",
        "Load it with `savlt train --model " + str(paths.root) + "` (or `load_backbone`). Rebuild it with",
        "",
        "```bash",
        f"savlt pretrain {p.pairs} --config {paths.config.name} --out NEW_FOLDER   # config.yaml of this folder",
        "```",
        "",
    ]
    write_text(paths.card, "\n".join(lines))


def pretrain(
    cfg: Config, out: str | Path, progress: bool = True, save_dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Contrastive pretraining of cfg.model.backbone on cfg.pretrain.pairs into `out`; returns the
    final held-out recall. Running it again on the same folder resumes from the last checkpoint.
    Relative paths in `cfg` are taken from the current directory and saved absolute."""
    cfg = with_absolute_paths(cfg)
    p = cfg.pretrain
    if not p.pairs:
        raise ConfigError("no pairs: give PAIRS.csv (or a data root) to savlt pretrain (pretrain.pairs)")
    paths = PretrainPaths(out)
    accelerator = make_accelerator(cfg)
    backbone = backbone_for(cfg)  # first: a backbone that cannot be used leaves no folder behind
    if not isinstance(backbone, HFClip):
        raise ConfigError(
            f"savlt pretrain trains Hugging Face CLIP backbones; {cfg.model.backbone!r} is an open_clip "
            "model: start from a Hugging Face CLIP (e.g. --model small) instead"
        )
    start_loader_workers(cfg, PairDataset)
    with ExitStack() as hold:  # the main process holds the folder's lock for the whole pretraining
        on_main(accelerator, lambda: hold.enter_context(_claim(paths, cfg)))
        recall = _pretrain(cfg, paths, accelerator, backbone, progress, save_dtype)
    accelerator.wait_for_everyone()
    return recall


def _claim(paths: PretrainPaths, cfg: Config) -> contextlib.AbstractContextManager[None]:
    """Hold the output folder for this pretraining (see the module's docstring)."""
    check_inputs_outside(paths.root, {"model.backbone": run_inputs(cfg).get("model.backbone")})
    return claim_folder(
        paths.root,
        "pretraining",
        committed=lambda: (paths.checkpoint / "state.json").is_file(),
        continues=lambda folder: True,
        roots={"the pairs": [cfg.pretrain.pairs]},
    )


class _PretrainSteps:
    """The contrastive pretraining step (see ``engine.loop``): CLIP's symmetric loss on each
    process's share of the batch, the warm-up + cosine learning rate, the temperature kept in
    range, held-out recall every ``pretrain.eval_every`` steps, the history and a resumable
    checkpoint every ``pretrain.save_every`` steps (both on the main process)."""

    def __init__(
        self,
        towers: Towers,
        wrapped: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        accelerator: Accelerator,
        paths: PretrainPaths,
        train_pairs: list[Pair],
        val_pairs: list[Pair],
        end: int,
    ) -> None:
        self.towers, self.wrapped, self.optimizer, self.cfg = towers, wrapped, optimizer, cfg
        self.accelerator, self.paths, self.end = accelerator, paths, end
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.recall: dict[str, float] = {}

    def loss(self, batch: Any, micro: int) -> torch.Tensor:
        pixels, index = batch
        texts = [self.train_pairs[i].text for i in index.tolist()]
        image, text, logit_scale = self.towers.features(
            self.wrapped, pixels.to(self.accelerator.device), texts
        )
        return clip_loss(image, text, logit_scale) / self.cfg.pretrain.grad_accum

    def before_update(self, step: int) -> None:
        self.lr = _lr_at(step - 1, self.cfg.pretrain.max_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def after_update(self, step: int) -> dict[str, Any]:
        with torch.no_grad():
            self.towers.base.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"lr": self.lr, "temperature": float(1 / self.towers.base.logit_scale.detach().exp())}

    def end_step(self, step: int, entry: dict[str, Any]) -> dict[str, str]:
        p = self.cfg.pretrain
        if step % p.eval_every == 0 or step == self.end:
            self.recall = evaluate_recall(self.towers, self.val_pairs, self.cfg, self.accelerator)
            entry.update(self.recall)
        if self.accelerator.is_main_process:
            append_line(self.paths.history, json.dumps(entry))
            if step % p.save_every == 0 or step == self.end:
                _save_checkpoint(self.paths, self.towers, self.optimizer, step)
        return {"i2t_r1": f"{self.recall['i2t_r1']:.2f}"} if self.recall else {}


def _pretrain(
    cfg: Config,
    paths: PretrainPaths,
    accelerator: Accelerator,
    backbone: HFClip,
    progress: bool,
    save_dtype: torch.dtype,
) -> dict[str, Any]:
    p = cfg.pretrain
    main = accelerator.is_main_process
    with log_to(paths.root / "pretrain.log", main):
        seed_everything(p.seed)
        pairs = load_pairs(
            p.pairs, cfg.class_map(), {c.name: c.description for c in cfg.data.classes}, progress and main
        )
        train_pairs, val_pairs = split_pairs(pairs, p.val_fraction, p.seed)
        torch.manual_seed(p.seed)
        towers = _towers(cfg, backbone)
        towers.clip.to(accelerator.device)
        optimizer = torch.optim.AdamW(list(_trainable(towers).values()), lr=p.lr, weight_decay=p.weight_decay)
        start = _resume(paths, cfg, towers, optimizer)
        if main:
            cfg.save(paths.config)
            if start == 0:
                paths.history.unlink(missing_ok=True)
        log.info(
            "pretraining %s on %d pairs (%d held out), %d steps",
            cfg.model.backbone,
            len(train_pairs),
            len(val_pairs),
            p.max_steps,
        )
        sampler = StepBatches(
            len(train_pairs),
            p.batch_size,
            p.max_steps * p.grad_accum,
            seed=p.seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
        end = p.stop_after or p.max_steps
        batches = [
            b[accelerator.process_index :: accelerator.num_processes]
            for b in sampler.batches[start * p.grad_accum : end * p.grad_accum]
        ]
        stats = normalization(cfg.data.normalize, backbone.normalization)
        dataset = PairDataset(
            train_pairs, train_transform(cfg.data.image_size, cfg.train.crop_scale, cfg.train.hflip, stats)
        )
        loader = loader_for(dataset, cfg, 1, accelerator.device, batch_sampler=batches)
        wrapped, optimizer = accelerator.prepare(towers.clip, optimizer)
        towers.clip.train()
        task = _PretrainSteps(
            towers, wrapped, optimizer, cfg, accelerator, paths, train_pairs, val_pairs, end
        )
        started = time.time()
        run_steps(
            task,
            accelerator,
            wrapped,
            optimizer,
            loader,
            p.grad_accum,
            (start, end),
            "pretraining",
            "pretrain.lr",
            progress,
        )
        recall = task.recall
        if not recall:  # resumed at the end: score the finished model
            recall = evaluate_recall(towers, val_pairs, cfg, accelerator)
        del wrapped
        if main:
            model = towers.clip.merge_and_unload() if isinstance(towers.clip, PeftModel) else towers.clip
            model.to("cpu", save_dtype).save_pretrained(paths.root, stats)
            for written in paths.root.iterdir():
                if written.is_file():
                    ordinary_permissions(written)
            _model_card(paths, cfg, len(train_pairs), len(val_pairs), end, recall, stats)
            log.info("pretraining took %.1f s; held-out recall %s", time.time() - started, recall)
    return recall
