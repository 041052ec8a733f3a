"""Adapter-only checkpoints in safetensors: what was trained, never the frozen backbone.

The file holds every trainable tensor (adapters, visual projection, pooling, prototypes or the
linear head) and what a head fitted without training (its persistent buffers, e.g. Tip-Adapter's
cache values and α, β) and, as metadata, the backbone it was trained on with a fingerprint of its frozen
weights, so loading onto another backbone is refused with a clear message.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from savlt.errors import SavltError
from savlt.io import atomic_path, state_mismatch
from savlt.models.savlt import SavltModel

FORMAT = "savlt-adapter-1"


class CheckpointError(SavltError):
    """A checkpoint that cannot be used with this model; the message names the file."""


def _fitted(model: SavltModel) -> dict[str, torch.Tensor]:
    """Every tensor a run fitted: the trainable parameters and the head's persistent buffers."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    parameters = {name for name, _ in model.head.named_parameters()}
    for name, value in model.head.state_dict(keep_vars=True).items():
        if name not in parameters:
            tensors[f"head.{name}"] = value
    return tensors


def trainable_state(model: SavltModel) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in _fitted(model).items()}


def save_checkpoint(model: SavltModel, path: str | Path, backbone_name: str, method: str) -> None:
    metadata = {
        "format": FORMAT,
        "backbone": backbone_name,
        "fingerprint": model.clip_model.fingerprint(),
        "method": method,
    }
    data = save(trainable_state(model), metadata=metadata)  # written by Python: a full disk is named
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a SAVLT adapter checkpoint (format {metadata.get('format')!r})")
    return metadata


def load_checkpoint(model: SavltModel, path: str | Path) -> None:
    """Load trained tensors into `model`, after checking backbone, names and shapes."""
    path = Path(path)
    metadata = read_metadata(path)
    fingerprint = model.clip_model.fingerprint()
    if metadata.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained on backbone {metadata.get('backbone')!r} "
            f"(fingerprint {metadata.get('fingerprint')}), but the loaded backbone differs "
            f"(fingerprint {fingerprint}): load it with the backbone it was trained on"
        )
    tensors = load_file(str(path))
    model.head.take_shapes(
        {n.removeprefix("head."): t.shape for n, t in tensors.items() if n.startswith("head.")}
    )
    expected = _fitted(model)
    mismatch = state_mismatch(
        {n: p.shape for n, p in expected.items()}, {n: t.shape for n, t in tensors.items()}
    )
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({mismatch}); was it saved with another "
            "method, adapter type, class list or backbone?"
        )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
