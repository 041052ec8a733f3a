"""The torch Dataset: decoded scan + tissue mask through one transform, with label and path.

Masks are computed once per image before training (see ``savlt.data.masks``) and handed in
as a mapping, so no segmenter runs inside a training step. Augmentation randomness comes from a
per-sample seed chosen by the sampler, so a run is reproducible whatever the number of loader
workers or processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from savlt.data.discover import ImageRecord
from savlt.data.imageio import read_image

Sample = tuple[torch.Tensor, torch.Tensor, int, str]


class OCTDataset(Dataset[Sample]):
    """Items are (image float 3×S×S, mask uint8 S×S in {0,1}, label index, path).

    Index with an int, or with ``(index, seed)`` to fix the augmentation of that draw.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        transform: A.Compose,
        masks: Mapping[Path, np.ndarray] | None = None,
    ) -> None:
        self.records = list(records)
        self.label_index = {name: i for i, name in enumerate(class_names)}
        unknown = {r.label for r in self.records} - set(self.label_index)
        if unknown:
            raise ValueError(
                f"records carry classes {sorted(unknown)} that are not configured ({list(class_names)})"
            )
        self.transform = transform
        self.masks = masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        index, seed = item if isinstance(item, tuple) else (item, None)
        record = self.records[index]
        image = read_image(record.path)
        if self.masks is not None:
            mask = self.masks[record.path].astype(np.uint8)
        else:  # no structure prior needed (e.g. CLS pooling): the whole image counts as tissue
            mask = np.ones(image.shape[:2], dtype=np.uint8)
        if seed is not None:
            self.transform.set_random_seed(seed)
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"], self.label_index[record.label], str(record.path)
