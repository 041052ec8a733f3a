"""Image + mask transforms (albumentations): the same geometry is applied to both.

Training: RandomResizedCrop (bicubic for the image, nearest for the mask) + horizontal flip +
normalisation. Evaluation: a deterministic resize + normalisation (``eval.transform=train``
evaluates with the training transform instead, seeded per scan, as the published code does).
Normalisation uses the backbone's own statistics by default, or CLIP's or ImageNet's
(``data.normalize``; ``savlt.normalization`` turns the setting into a mean and std).
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from savlt.normalization import Stats


def train_transform(size: int, crop_scale: tuple[float, float], hflip: bool, stats: Stats) -> A.Compose:
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(size, size),
            scale=tuple(crop_scale),
            interpolation=cv2.INTER_CUBIC,
            mask_interpolation=cv2.INTER_NEAREST,
        )
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    mean, std = stats
    steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps)


def eval_transform(size: int, stats: Stats) -> A.Compose:
    mean, std = stats
    return A.Compose(
        [
            A.Resize(size, size, interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST),
            A.Normalize(mean=mean, std=std),
            ToTensorV2(),
        ]
    )
