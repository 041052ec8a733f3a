"""The feature cache: frozen-backbone image features computed once and reused by every run of a
method that keeps the backbone frozen (zero-shot, the linear probe and the feature-based baselines
of ``savlt.methods``), whatever its seed, shot count or protocol.

A feature is the backbone's L2-normalised, projected CLS feature of one view of one scan. View 0 is
the evaluation view (the deterministic resize, or the seeded training transform under
``eval.transform=train``, cached under its own key); views 1..N are augmented training views (the
training transform, seeded by the scan's path and the view number, so a view is the same in every
run and process). Files live under the data cache (``data.cache_dir``, else ``<root>/.savlt``)::

    features/<key>/<center>/view<v>.npz     keys (scan path | size | mtime) and features (N, E)

`key` hashes everything a feature depends on besides the scan: every weight of the backbone (all
its tensors' bytes, so a backbone changed anywhere, e.g. pretrained further, gets its own
features), the image size, the pixel statistics, the precision, and for training views
the crop range and flips. A scan whose file changed (size or modification time) is computed again;
a cache that cannot be written (no writable cache folder) keeps the features of the run in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from savlt.config import Config
from savlt.data.discover import ImageRecord
from savlt.engine.inference import run_inference
from savlt.io import atomic_path
from savlt.models.savlt import SavltModel
from savlt.normalization import normalization

log = logging.getLogger("savlt")

FORMAT = 1  # raised when what a cached feature means changes


def scan_key(record: ImageRecord) -> str:
    """The scan's identity in the cache: its path, and the size and modification time of its file."""
    text = str(record.path)
    file = Path(text.rpartition("#")[0]) if record.page is not None else record.path
    stat = file.stat()
    return f"{text}|{stat.st_size}|{stat.st_mtime_ns}"


class FeatureCache:
    """Features of `model`'s frozen image side (``SavltModel.frozen_features``) for any records
    and view, from the files under `folder` (None: kept in memory for this object only)."""

    def __init__(self, model: SavltModel, cfg: Config, accelerator: Accelerator, folder: Path | None) -> None:
        if not model.frozen_features:
            raise ValueError(f"method {cfg.method} does not keep the image features frozen")
        self.model, self.cfg, self.accelerator = model, cfg, accelerator
        stats = normalization(cfg.data.normalize, model.clip_model.normalization)
        identity = {
            "format": FORMAT,
            "backbone": weights_digest(model.clip_model),
            "image_size": cfg.data.image_size,
            "stats": [list(map(float, part)) for part in stats],
            "precision": accelerator.mixed_precision,
        }
        augmented = {**identity, "crop_scale": list(cfg.train.crop_scale), "hflip": cfg.train.hflip}
        evaluation = (
            identity if cfg.eval.transform == "deterministic" else {**augmented, "eval_transform": "train"}
        )
        self.keys = {False: _digest(evaluation), True: _digest(augmented)}
        self.folder = folder / "features" if folder is not None else None
        self.memory: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.computed = 0  # scans × views computed by this object (the rest came from the cache)

    def path(self, center: str, view: int) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / self.keys[view > 0] / center / f"view{view}.npz"

    def features(self, records: Sequence[ImageRecord], view: int = 0, progress: bool = False) -> np.ndarray:
        """(N, E) float32 features of `records` at `view`, in their order (computed when missing)."""
        records = list(records)
        if not records:
            return np.zeros((0, self.model.clip_model.embed_dim), dtype=np.float32)
        by_center: dict[str, list[ImageRecord]] = {}
        for record in records:
            by_center.setdefault(record.center, []).append(record)
        found: dict[str, np.ndarray] = {}
        for center, members in by_center.items():
            found.update(self._center(center, members, view, progress))
        return np.stack([found[scan_key(r)] for r in records])

    def _center(
        self, center: str, records: list[ImageRecord], view: int, progress: bool
    ) -> dict[str, np.ndarray]:
        path = self.path(center, view)
        several = self.accelerator.num_processes > 1
        with _locked(path, self.accelerator.is_main_process):
            stored = full = self._read(path, center, view)
            unique = list({scan_key(r): r for r in records}.items())
            if several:  # every process takes the main process's view of the cache (read under its lock)
                shared = [{key: stored[key] for key, _ in unique if key in stored}]
                broadcast_object_list(shared)
                stored = shared[0]
            missing = [r for key, r in unique if key not in stored]
            if missing:
                desc = f"features of {center}" + (f" (view {view})" if view else "")
                result = run_inference(
                    self.model, missing, self.cfg, self.accelerator, None, desc, progress, view=view
                )
                self.computed += len(missing)
                new = dict(
                    zip((scan_key(r) for r in missing), result.features.astype(np.float32), strict=True)
                )
                stored.update(new)
                if several:  # the file keeps every scan it held besides this run's
                    full.update(new)
                self._write(path, center, view, full)
            return stored

    def _read(self, path: Path | None, center: str, view: int) -> dict[str, np.ndarray]:
        if path is None:
            return dict(self.memory.get((center, view), {}))
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as data:
                return dict(zip(data["keys"].tolist(), data["features"], strict=True))
        except (OSError, ValueError, KeyError) as exc:  # a damaged file is computed again
            log.warning("feature cache %s cannot be read (%s): computing it again", path, exc)
            return {}

    def _write(self, path: Path | None, center: str, view: int, stored: dict[str, np.ndarray]) -> None:
        if path is None:
            self.memory[(center, view)] = stored
            return
        if not self.accelerator.is_main_process:
            return
        keys = sorted(stored)
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez(handle, keys=np.array(keys), features=np.stack([stored[k] for k in keys]))


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of `module` (names, shapes, dtypes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path | None, main: bool) -> Iterator[None]:
    """Hold the cache file's lock (another run computing the same features waits, then reads them)."""
    if path is None or not main:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / f".{path.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
