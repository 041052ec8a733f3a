"""Evaluation throughput (images/s): the SAVLT forward against the bare vision backbone.

    python benchmarks/eval_throughput.py [--batch 64] [--device cuda --bf16]

Both at the same batch size, no gradients. SAVLT includes the ROI from masks, ROI attention
pooling, projection and both alignment heads (text features cached); the ratio should be >= 0.9.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from common import batch_for, model_for, parse, timed


def main() -> None:
    args = parse(__doc__, batch=64)
    model = model_for("savlt", args.preset, args.device).eval()
    pixels, masks, _ = batch_for(args.batch, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else nullcontext()
    backbone = model.clip_model

    @torch.no_grad()
    def bare() -> None:
        with autocast:
            backbone.project_image(backbone.cls_feature(backbone.vision_tokens(pixels)))

    @torch.no_grad()
    def full() -> None:
        with autocast:
            model.logits(model(pixels, masks))

    t_bare = timed(bare, args.repeats, args.device)
    t_full = timed(full, args.repeats, args.device)
    print(f"evaluation, B={args.batch}, {args.preset}, {args.device}{' bf16' if args.bf16 else ''}")
    print(f"  bare backbone : {args.batch / t_bare:9.1f} images/s")
    print(f"  SAVLT forward : {args.batch / t_full:9.1f} images/s")
    print(f"  ratio         : {t_bare / t_full:9.3f}")


if __name__ == "__main__":
    main()
