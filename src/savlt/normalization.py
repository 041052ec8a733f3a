"""Pixel statistics: the per-channel mean and std (0..1 scale) images are normalised with.

What ``data.normalize`` names (``backbone``, ``clip``, ``imagenet``) is turned into numbers here,
in one place that imports nothing heavy, so the data pipeline, the backbone registry and the run
identity (``savlt.engine.runfolder``) agree without importing each other.
"""

from __future__ import annotations

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

# What every OpenAI CLIP checkpoint (and BiomedCLIP) was trained with, and ImageNet's (the
# published SAVLT code and most segmentation encoders).
NORMALIZATION: dict[str, Stats] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CLIP_STATS: Stats = NORMALIZATION["clip"]


def normalization(setting: str, backbone: Stats) -> Stats:
    """``data.normalize`` as a mean and std: "backbone" takes the backbone's own."""
    return backbone if setting == "backbone" else NORMALIZATION[setting]
