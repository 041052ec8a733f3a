"""The tissue segmenter as a checkpoint folder, and the predictor the ROI pipeline calls.

A checkpoint is a folder holding ``model.safetensors`` (the weights) and ``segmenter.json`` (what
is needed to rebuild the network and to pre-process its input), so that ``load_segmenter(folder)``
needs no other flag and never touches the network: the weights come from the folder, never from
a download. Pre-processing lives here once and is shared with training, so what the model saw in
training is exactly what it sees at prediction time.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from savlt.config import SegConfig
from savlt.errors import SavltError
from savlt.io import OutputError, atomic_path, state_mismatch, write_json
from savlt.normalization import NORMALIZATION, Stats

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "segmenter.json"
FORMAT = "savlt-tissue-segmenter"
FORMAT_VERSION = 1
ARCHS: tuple[str, ...] = typing.get_args(typing.get_type_hints(SegConfig)["arch"])
IMAGENET_MEAN, IMAGENET_STD = NORMALIZATION["imagenet"]


class SegmenterError(SavltError):
    """A segmenter checkpoint or set-up that cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class SegmenterSpec:
    """Everything besides the weights that is needed to rebuild and run a segmenter."""

    arch: str
    encoder: str
    input_size: tuple[int, int]  # (H, W) the network sees
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per RGB channel, on the 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = 0.5  # on the sigmoid probability
    encoder_weights: str | None = None  # how the encoder was initialised (for the record only)
    trained: dict[str, Any] = field(default_factory=dict)  # fold, epoch, validation scores, data

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return {"format": FORMAT, "version": FORMAT_VERSION, **data, "smp_version": smp.__version__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: Path) -> SegmenterSpec:
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise SegmenterError(
                f"{where} is not a SAVLT segmenter description (format {data.get('format')!r}, "
                f"version {data.get('version')!r}; expected {FORMAT!r}, version {FORMAT_VERSION})"
            )
        try:
            spec = cls(
                arch=str(data["arch"]),
                encoder=str(data["encoder"]),
                input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                threshold=float(data["threshold"]),
                encoder_weights=data.get("encoder_weights"),
                trained=dict(data.get("trained") or {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SegmenterError(f"{where}: missing or malformed field ({exc!r})") from None
        if spec.arch not in ARCHS:
            raise SegmenterError(f"{where}: unknown architecture {spec.arch!r} (known: {', '.join(ARCHS)})")
        if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
            raise SegmenterError(f"{where}: mean and std must be three numbers each, std > 0")
        return spec


def build_model(arch: str, encoder: str) -> torch.nn.Module:
    """A randomly initialised smp network with one logit channel (weights are loaded separately)."""
    if arch not in ARCHS:
        raise SegmenterError(f"unknown segmenter architecture {arch!r} (known: {', '.join(ARCHS)})")
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=3, classes=1)
    except KeyError:
        known = ", ".join(smp.encoders.get_encoder_names()[:12])
        raise SegmenterError(
            f"unknown encoder {encoder!r} for {arch} (segmentation_models_pytorch encoders include {known}, …)"
        ) from None


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 H×W×3 (or H×W) -> uint8 size[0]×size[1]×3, the one resize used in training and prediction."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SegmenterError(f"expected a uint8 H×W×3 image, got {image.dtype} array of shape {image.shape}")
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool H×W -> bool size[0]×size[1] (area-weighted, then majority), matching resize_image."""
    area = cv2.resize(mask.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return area >= 0.5


def normalise(images: torch.Tensor, spec: SegmenterSpec) -> torch.Tensor:
    """(B, 3, H, W) float in 0..1 -> the network's input scale."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def to_unit_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..1 on `device`."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TissueSegmenter:
    """A trained network plus its pre-processing: uint8 images of any size in, bool masks out."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: SegmenterSpec,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Tissue probability (float32 H×W, each input's own size) for uint8 H×W×3 images."""
        self.model.eval()
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            small = np.stack([resize_image(image, self.spec.input_size) for image in chunk])  # (b, h, w, 3)
            with torch.inference_mode():
                batch = normalise(to_unit_batch(small, self.device), self.spec)  # (b, 3, h, w)
                probs = torch.sigmoid(self.model(batch))  # (b, 1, h, w)
                for image, prob in zip(chunk, probs, strict=True):
                    full = F.interpolate(
                        prob[None], size=image.shape[:2], mode="bilinear", align_corners=False
                    )
                    out.append(full[0, 0].float().cpu().numpy())  # (H, W)
        return out

    def masks_of_inputs(self, pixels: torch.Tensor, stats: Stats) -> torch.Tensor:
        """(B, H, W) bool tissue masks of model inputs `pixels` (B, 3, H, W), normalised with
        `stats`, at their own size, as the published code's ROI extractor makes them: the network
        runs on the inputs as they are (re-normalised first only when `stats` are not its own) and
        a pixel is tissue when its sigmoid probability exceeds the threshold."""
        batch = pixels.float()
        if (tuple(stats[0]), tuple(stats[1])) != (tuple(self.spec.mean), tuple(self.spec.std)):
            mean, std = (torch.tensor(part, device=pixels.device).view(1, 3, 1, 1) for part in stats)
            batch = normalise(batch * std + mean, self.spec)
        self.model.eval()
        with torch.no_grad():
            probs = torch.sigmoid(self.model(batch.to(self.device)))  # (B, 1, H, W)
        return (probs[:, 0] > self.spec.threshold).to(pixels.device)

    def predict_masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Bool H×W tissue masks, one per input image, each of that image's own size."""
        return [prob >= self.spec.threshold for prob in self.probabilities(images)]


def save_segmenter(segmenter: TissueSegmenter, folder: str | Path) -> Path:
    """Write the checkpoint folder; each file is replaced atomically so a crash never leaves half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in segmenter.model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    write_json(folder / SPEC_FILE, segmenter.spec.to_json())
    return folder


def resolve_checkpoint(folder: str | Path) -> Path:
    """A checkpoint folder; a training folder (with summary.json) resolves to its best fold."""
    folder = Path(folder)
    if (folder / SPEC_FILE).is_file():
        return folder
    summary = folder / "summary.json"
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_fold")
        if best is not None and (folder / f"fold{best}" / SPEC_FILE).is_file():
            log.info("%s is a training folder; using its best fold, fold%s", folder, best)
            return folder / f"fold{best}"
    if not folder.is_dir():
        raise SegmenterError(f"segmenter folder {folder} does not exist")
    raise SegmenterError(
        f"{folder} is not a segmenter checkpoint (no {SPEC_FILE}); "
        "pass a fold folder written by `savlt seg train`, e.g. SEGDIR/fold0"
    )


def _check_state_fits(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], folder: Path, spec: SegmenterSpec
) -> None:
    """Compare names and shapes first, so a mismatch is one clear line rather than a torch traceback."""
    mismatch = state_mismatch(
        {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()}
    )
    if mismatch:
        raise SegmenterError(
            f"segmenter checkpoint {folder}: the weights in {WEIGHTS_FILE} do not fit a {spec.arch} with encoder "
            f"{spec.encoder} as {SPEC_FILE} says ({mismatch}); the files come from different models"
        )


def load_segmenter(folder: str | Path, device: str | torch.device | None = None) -> TissueSegmenter:
    """Rebuild a segmenter from its checkpoint folder (or a training folder: its best fold), offline."""
    folder = resolve_checkpoint(folder)
    try:
        data = json.loads((folder / SPEC_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise SegmenterError(f"{folder / SPEC_FILE} is not valid JSON ({exc})") from None
    spec = SegmenterSpec.from_json(data, folder / SPEC_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SegmenterError(f"segmenter checkpoint {folder} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SegmenterError(f"cannot read {weights}: {exc}") from None
    model = build_model(spec.arch, spec.encoder)
    _check_state_fits(model, state, folder, spec)
    model.load_state_dict(state)
    return TissueSegmenter(model, spec, device=device)


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a PyTorch file (weights-only loading, never
    arbitrary pickles); anything else is a one-line error naming the file."""
    if not path.is_file():
        raise SegmenterError(f"{what} file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SegmenterError(f"cannot read {what} {path} (weights-only loading): {reason}") from None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise SegmenterError(f"{what} {path} does not hold a state dict (parameter name -> tensor)")
    return state


def import_segmenter(
    file: str | Path,
    arch: str,
    encoder: str,
    folder: str | Path,
    input_size: int = 224,
    threshold: float = 0.5,
    centers: list[str] | None = None,
) -> Path:
    """Turn a plain PyTorch state dict (``torch.save(model.state_dict(), FILE)``, as the published
    segmentation scripts write it) into a segmenter folder. The network is rebuilt from `arch` and
    `encoder`; the input is `input_size` square with ImageNet normalisation and the mask is the
    sigmoid probability at `threshold` (the published set-up). `centers`, when known, records the
    centers whose masks trained it. `folder` must not hold a segmenter's files already (nothing is
    replaced)."""
    file, folder = Path(file), Path(folder)
    for name in (WEIGHTS_FILE, SPEC_FILE):
        if (folder / name).exists() or (folder / name).is_symlink():
            raise OutputError(
                f"segmenter folder {folder} already holds {name}: seg import never replaces a file: choose "
                "another --out"
            )
    state = read_state_dict(file, "segmenter weights")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    model = build_model(arch, encoder)
    mismatch = state_mismatch(
        {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()}
    )
    if mismatch:
        raise SegmenterError(
            f"{file} is not a state dict of a {arch} with encoder {encoder} ({mismatch}); "
            "check --arch and --encoder"
        )
    model.load_state_dict(state)
    if input_size < 32 or input_size % 32:
        raise SegmenterError(f"--image-size {input_size} must be a multiple of 32, at least 32")
    spec = SegmenterSpec(
        arch=arch,
        encoder=encoder,
        input_size=(input_size, input_size),
        threshold=threshold,
        encoder_weights="imported",
        trained={"imported_from": str(file.resolve()), "centers": centers},
    )
    return save_segmenter(TissueSegmenter(model, spec, device="cpu"), folder)
