"""ROI pooling forward+backward: the batched, masked version against the per-sample/per-patch loop.

    python benchmarks/roi_pooling.py [--batch 32] [--device cuda]

Shapes of ViT-B/16: B × 196 patch tokens × 768, 4 heads. Prints both times, the speed-up and the
largest absolute difference of outputs and gradients.
"""

from __future__ import annotations

import torch
from common import parse, timed
from reference import roi_pool_reference

from savlt.models.pooling import RoiAttentionPool
from savlt.models.roi import patches_in_boxes


def main() -> None:
    args = parse(__doc__)
    torch.manual_seed(0)
    pool = RoiAttentionPool(768, heads=4).to(args.device)
    tokens = torch.randn(args.batch, 196, 768, device=args.device, requires_grad=True)
    y0 = torch.rand(args.batch, device=args.device) * 0.6
    boxes = torch.stack([torch.zeros_like(y0), y0, torch.ones_like(y0), torch.ones_like(y0)], dim=1)
    keep = patches_in_boxes(boxes, 14)

    def run(fn) -> tuple[torch.Tensor, torch.Tensor]:
        tokens.grad = None
        out = fn()
        out.square().sum().backward()
        return out.detach(), tokens.grad.detach().clone()

    def batched():
        return run(lambda: pool(tokens, keep)[0])

    def loop():
        return run(lambda: roi_pool_reference(pool, tokens, keep))

    fast_out, fast_grad = batched()
    slow_out, slow_grad = loop()
    diff = max(float((fast_out - slow_out).abs().max()), float((fast_grad - slow_grad).abs().max()))
    t_fast = timed(batched, args.repeats, args.device)
    t_slow = timed(loop, max(1, args.repeats // 5), args.device)
    print(f"ROI pooling fwd+bwd, B={args.batch}, 196×768, 4 heads, {args.device}")
    print(f"  batched : {t_fast * 1e3:9.2f} ms")
    print(f"  loop    : {t_slow * 1e3:9.2f} ms")
    print(f"  speed-up: {t_slow / t_fast:9.0f}×   max |diff| (output, gradient): {diff:.2e}")


if __name__ == "__main__":
    main()
