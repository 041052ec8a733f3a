"""Image + mask transforms (albumentations): the same geometry is applied to both.

Training: RandomResizedCrop (bicubic for the image, nearest for the mask) + horizontal flip +
CLIP normalisation. Evaluation: a deterministic resize + normalisation, never a random crop.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

# The normalisation every CLIP checkpoint was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_transform(
    size: int, crop_scale: tuple[float, float] = (0.75, 1.0), hflip: bool = True
) -> A.Compose:
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
    steps += [A.Normalize(mean=CLIP_MEAN, std=CLIP_STD), ToTensorV2()]
    return A.Compose(steps)


def eval_transform(size: int) -> A.Compose:
    return A.Compose(
        [
            A.Resize(size, size, interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST),
            A.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            ToTensorV2(),
        ]
    )
