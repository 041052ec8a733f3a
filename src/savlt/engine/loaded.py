"""A trained run loaded back from its folder: re-evaluate it and predict with it
(``savlt.load_run``, ``savlt evaluate``, ``savlt predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from savlt.config import load_config
from savlt.data.imageio import ImageDecodeError, read_image
from savlt.data.transforms import eval_transform
from savlt.engine.checkpoint import load_checkpoint
from savlt.engine.inputs import reload_inputs
from savlt.engine.rundir import (
    RunPaths,
    build_model,
    log_to,
    make_accelerator,
    run_header,
    score_sets,
    tissue_masks,
    write_run_report,
)
from savlt.errors import SavltError
from savlt.report.plots import heatmap_png


@dataclass
class Prediction:
    path: str
    predicted: str
    probabilities: dict[str, float]
    high_risk_probability: float
    roi_box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1
    roi_fallback: bool
    heatmap: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Run:
    """A trained run loaded back from its folder (``savlt.load_run``)."""

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        self.paths = RunPaths(folder)
        if not self.paths.config.is_file():
            raise SavltError(f"{self.paths.root} is not a SAVLT run folder (no config.yaml)")
        self.cfg = load_config(self.paths.config)
        self.accelerator = make_accelerator(self.cfg) if device is None else Accelerator(cpu=device == "cpu")
        self.model, self.backbone_name = build_model(self.cfg, self.accelerator.device)
        load_checkpoint(self.model, self.paths.checkpoint)
        self.model.eval()
        self.masks = tissue_masks(self.cfg, self.accelerator.device)
        self.transform = eval_transform(self.cfg.data.image_size)

    @property
    def class_names(self) -> list[str]:
        return self.cfg.class_names

    def evaluate(
        self,
        data_root: str | Path | None = None,
        centers: list[str] | None = None,
        out: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Re-score the run (internal test split + external centers) on a data root."""
        cfg = self.cfg
        if data_root is not None:
            cfg = load_config(self.paths.config, values={"data.root": Path(data_root)})
        inputs = reload_inputs(cfg, self.paths.split, self.paths.few_shot, centers)
        sets = inputs.eval_sets()
        if centers is not None:
            sets = {c: r for c, r in sets.items() if c in centers}
        target = RunPaths(out or self.paths.root / "evaluation")
        target.root.mkdir(parents=True, exist_ok=True)
        header = run_header(cfg, self.backbone_name, inputs)
        with log_to(target.root / "evaluate.log", self.accelerator.is_main_process):
            metrics, results = score_sets(
                self.model, sets, cfg, self.accelerator, self.masks, target, header, progress
            )
            if self.accelerator.is_main_process:
                title = f"SAVLT evaluation: {self.paths.root.name}"
                write_run_report(target.root, metrics, results, cfg, [], title)
        return metrics

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[str | Path | np.ndarray],
        heatmap_dir: str | Path | None = None,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Class, probabilities, high-risk probability and ROI of each scan (path or H×W[×3] array)."""
        if heatmap_dir is not None and self.model.pool is None:
            raise SavltError("heat maps need attention pooling; this run uses model.pooling=cls")
        predictions: list[Prediction] = []
        risk = [n in self.cfg.data.high_risk for n in self.class_names]
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            arrays = [_as_rgb(item, start + i) for i, item in enumerate(chunk)]
            masks = (
                self.masks.masks_for_images(arrays)
                if self.model.uses_masks
                else [np.ones(a.shape[:2], bool) for a in arrays]
            )
            batch = [
                self.transform(image=a, mask=m.astype(np.uint8)) for a, m in zip(arrays, masks, strict=True)
            ]
            pixels = torch.stack([b["image"] for b in batch]).to(self.accelerator.device)
            mask = torch.stack([b["mask"] for b in batch]).to(self.accelerator.device)
            with self.accelerator.autocast():
                out = self.model(pixels, mask)
                probs = self.model.logits(out).float().softmax(dim=1).cpu().numpy()
            for i, item in enumerate(chunk):
                name = str(item) if isinstance(item, str | Path) else f"array-{start + i}"
                box = tuple(float(v) for v in out.boxes[i].cpu())
                heatmap = None
                if heatmap_dir is not None:
                    grid = self.model.grid
                    attention = out.attention[i].float().mean(dim=0).reshape(grid, grid).cpu().numpy()
                    Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
                    stem = Path(name).stem if isinstance(item, str | Path) else name
                    heatmap = str(Path(heatmap_dir) / f"{start + i:04d}_{stem}_heatmap.png")
                    heatmap_png(arrays[i], attention, box, Path(heatmap))
                predictions.append(
                    Prediction(
                        path=name,
                        predicted=self.class_names[int(probs[i].argmax())],
                        probabilities={n: float(p) for n, p in zip(self.class_names, probs[i], strict=True)},
                        high_risk_probability=float(probs[i][risk].sum()),
                        roi_box=box,  # type: ignore[arg-type]
                        roi_fallback=bool(out.fallback[i]),
                        heatmap=heatmap,
                    )
                )
        return predictions


def _as_rgb(item: str | Path | np.ndarray, position: int) -> np.ndarray:
    if isinstance(item, str | Path):
        return read_image(item)
    array = np.asarray(item)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageDecodeError(
            f"array #{position}", f"expected a uint8 H×W or H×W×3 array, got {array.dtype} {array.shape}"
        )
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array


def load_run(folder: str | Path, device: str | None = None) -> Run:
    return Run(folder, device)
