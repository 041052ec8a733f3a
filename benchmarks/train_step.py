"""A full training step (forward, loss, backward, AdamW) with ROI pooling against CLS pooling.

    python benchmarks/train_step.py [--batch 32] [--device cuda --bf16]

Random weights with the shapes of ViT-B/16, LoRA on all 12 vision layers. The ROI step includes
the ROI computation from the batch's masks; the ratio ROI / CLS should stay close to 1.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from common import batch_for, model_for, parse, timed


def step_fn(method: str, args):
    model = model_for(method, args.preset, args.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixels, masks, labels = batch_for(args.batch, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step() -> None:
        with autocast:
            out = model(pixels, masks if model.uses_masks else None)
            loss = model.loss(out, labels) / args.batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse(__doc__, batch=32)
    times = {m: timed(step_fn(m, args), args.repeats, args.device) for m in ("clip_lora", "savlt")}
    print(
        f"training step, B={args.batch}, {args.preset}, LoRA r=8 on all vision layers, {args.device}"
        f"{' bf16' if args.bf16 else ''}"
    )
    print(f"  CLS pooling (clip_lora): {times['clip_lora'] * 1e3:9.1f} ms")
    print(f"  ROI pooling (savlt)    : {times['savlt'] * 1e3:9.1f} ms")
    print(f"  ratio ROI / CLS        : {times['savlt'] / times['clip_lora']:9.3f}")


if __name__ == "__main__":
    main()
