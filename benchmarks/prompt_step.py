"""A prompt-learning training step against a CLIP-LoRA training step, same backbone and batch.

    python benchmarks/prompt_step.py [--batch 32] [--preset tiny|random-vit-b16] [--device cuda --bf16]

CLIP-LoRA's step: the batch's images forward and backward through the LoRA-adapted vision tower,
AdamW. A prompt-learning step (as ``savlt train`` runs it): the batch's image features come from
the feature cache, the text tower runs forward and backward on the C = 5 class prompts (CoCoOp:
B·C image-conditioned prompts in one call), KgCoOp and BiomedCoOp add their terms, SGD. The
"+ frozen image forward" rows add what the step would cost without the cache (the frozen vision
tower's forward on the batch). The issue's target: prompt / CLIP-LoRA <= 1.3.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from common import batch_for, model_for, parse, side_by_side
from train_step import step_fn

from savlt.config import load_config
from savlt.engine import prompting


def prompt_step(method: str, args, with_images: bool):
    model = model_for(method, args.preset, args.device).train()
    cfg = load_config(overrides=[f"method={method}", f"model.backbone={args.preset}"])
    loss_of = prompting.prompt_loss(model, cfg)  # the loss `savlt train` trains on
    optimizer = torch.optim.SGD(model.head.parameters(), lr=2e-3, momentum=0.9, weight_decay=5e-4)
    pixels, _, labels = batch_for(args.batch, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()
    with torch.no_grad():
        cached = model(pixels).features  # what the feature cache holds

    def step() -> None:
        with autocast:
            if with_images:
                with torch.no_grad():
                    features = model(pixels).features
            else:
                features = cached
            loss = loss_of(features, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse(__doc__, batch=32)
    steps = {"clip_lora": step_fn("clip_lora", args)}
    for method in ("coop", "kgcoop", "cocoop", "biomedcoop"):
        steps[method] = prompt_step(method, args, with_images=False)
        steps[f"{method} + frozen image forward"] = prompt_step(method, args, with_images=True)
    times = side_by_side(steps, args.repeats, args.device)
    print(
        f"training step, B={args.batch}, {args.preset}, C=5 classes, {args.device}{' bf16' if args.bf16 else ''}"
    )
    base = times["clip_lora"]
    print(f"  {'CLIP-LoRA (LoRA r=8, vision tower)':42s}: {base * 1e3:9.1f} ms")
    for name, seconds in times.items():
        if name != "clip_lora":
            print(f"  {name:42s}: {seconds * 1e3:9.1f} ms   ratio to CLIP-LoRA {seconds / base:6.3f}")


if __name__ == "__main__":
    main()
