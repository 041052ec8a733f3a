"""Hugging Face CLIP against open_clip (BiomedCLIP) shapes: training step and evaluation throughput,
ROI against CLS pooling, and the in-backbone ROI masking against ROI pooling alone.

    python benchmarks/backbones.py [--batch 8] [--repeats 5] [--device cuda --bf16]

Random weights (no download): ``random-vit-b16`` has openai/clip-vit-base-patch16's shapes and
``random-biomedclip`` BiomedCLIP's (timm ViT-B/16 trunk, BERT-base text tower, 512-d). LoRA r=8
on every vision block. The methods are timed in turns (one call of each per round, the median of
the rounds), so a load change on a shared machine hits them alike. Targets: ROI / CLS close to 1,
every_block / pool at most 1.05.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext

import torch
from common import batch_for, model_for, side_by_side

METHODS = {"clip_lora": "CLS pooling", "savlt": "ROI pooling", "savlt_every_block": "ROI + every_block"}


def train_step(method: str, preset: str, args: argparse.Namespace) -> Callable[[], None]:
    model = model_for(method, preset, args.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixels, masks, labels = batch_for(args.batch, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = model.loss(model(pixels, masks if model.uses_masks else None), labels) / args.batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def evaluation(method: str, preset: str, args: argparse.Namespace) -> Callable[[], None]:
    model = model_for(method, preset, args.device).eval()
    pixels, masks, _ = batch_for(args.eval_batch, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()

    @torch.no_grad()
    def forward() -> None:
        with autocast:
            model.logits(model(pixels, masks if model.uses_masks else None))

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--presets", nargs="+", default=["random-vit-b16", "random-biomedclip"])
    args = parser.parse_args()
    precision = " bf16" if args.bf16 else ""
    print(
        f"{args.device}{precision}, torch threads {torch.get_num_threads()}, medians of {args.repeats} rounds"
    )
    for preset in args.presets:
        train = side_by_side({m: train_step(m, preset, args) for m in METHODS}, args.repeats, args.device)
        evals = side_by_side({m: evaluation(m, preset, args) for m in METHODS}, args.repeats, args.device)
        print(f"\n{preset}: training step (B={args.batch}) and evaluation (B={args.eval_batch})")
        for method, label in METHODS.items():
            print(
                f"  {label:<18} {train[method] * 1e3:9.1f} ms/step   "
                f"{args.eval_batch / evals[method]:8.1f} images/s"
            )
        print(
            f"  ROI / CLS            train {train['savlt'] / train['clip_lora']:.3f}   "
            f"eval {evals['savlt'] / evals['clip_lora']:.3f}"
        )
        print(
            f"  every_block / pool   train {train['savlt_every_block'] / train['savlt']:.3f}   "
            f"eval {evals['savlt_every_block'] / evals['savlt']:.3f}"
        )


if __name__ == "__main__":
    main()
