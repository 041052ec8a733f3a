"""A trained run loaded back from its folder: re-evaluate it and predict with it
(``savlt.load_run``, ``savlt evaluate``, ``savlt predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from savlt.config import load_config
from savlt.data.dataset import OCTDataset
from savlt.data.imageio import ImageDecodeError, decode_image, tiff_pages
from savlt.data.quality import Thresholds, assess
from savlt.data.transforms import eval_transform
from savlt.engine.calibration import (
    REFERRAL,
    SET_SEPARATOR,
    UNCALIBRATED_RULE,
    delivered_logits,
    load_calibration,
    referrals,
)
from savlt.engine.checkpoint import load_checkpoint
from savlt.engine.inference import start_loader_workers
from savlt.engine.inputs import reload_inputs
from savlt.engine.metrics import high_risk_mask, probabilities
from savlt.engine.runfolder import RunPaths, calibration_required, claim_evaluation_folder
from savlt.engine.runtime import build_model, check_images, log_to, make_accelerator, on_main, tissue_masks
from savlt.engine.scoring import Scoring, run_header, score_sets, write_run_report
from savlt.errors import SavltError
from savlt.io import (
    OutputError,
    atomic_path,
    check_outside_data,
    contains,
    progress_batches,
    writable_file,
    writable_folder,
    write_csv,
    write_json,
)
from savlt.normalization import normalization
from savlt.report.plots import heatmap_png, heatmap_title, is_heatmap_png

# A decoded scan: (8-bit H×W×3 RGB, the pixel values as stored).
Decoded = tuple[np.ndarray, np.ndarray]
HEATMAPS_NEED_ATTENTION = "heat maps need attention pooling; this run uses model.pooling=cls"
HEATMAP_FOLDER = "heat-map folder (--heatmap)"
# How every predictions CSV of ``savlt predict --csv`` begins: how SAVLT recognises one it wrote.
PREDICTION_CSV_START = ("path", "predicted", "p_high_risk")


@dataclass
class Ready:
    """A readable, assessable scan made ready for the model (``Run.prepare``): its 8-bit RGB (for
    the heat map) and, once its tissue mask is known, the resized, normalised image and mask."""

    position: int
    name: str
    rgb: np.ndarray
    pixels: torch.Tensor | None = None  # (3, S, S)
    mask: torch.Tensor | None = None  # (S, S)


@dataclass
class Prediction:
    path: str
    predicted: str | None  # None: no diagnosis (the scan cannot be assessed, or not be read)
    probabilities: dict[str, float]
    high_risk_probability: float | None
    roi_box: tuple[float, float, float, float] | None  # normalised x0, y0, x1, y1
    roi_fallback: bool | None
    heatmap: str | None = None
    assessable: bool = True
    reason: str | None = None  # why the scan cannot be assessed
    error: str | None = None  # why the file cannot be read
    calibrated: bool = False  # probabilities scaled by the run's temperature (calibration.json)
    # The screen by the run's rule (refer when the predicted class is high-risk or p(high-risk)
    # reaches the threshold): "refer" / "no referral"; None: no diagnosis.
    referral: str | None = None
    referral_threshold: float | None = None  # the threshold in use, on high_risk_probability
    operating_point_established: bool | None = None  # False: the screen fell back to the predicted class
    referral_rule: str | None = None  # the rule applied, in words (and why it fell back)
    prediction_set: list[str] | None = None  # the classes not ruled out at the run's coverage
    logits: dict[str, float] | None = None  # the model's class logits, before the temperature

    @classmethod
    def without_diagnosis(cls, path: str, reason: str | None = None, error: str | None = None) -> Prediction:
        return cls(path, None, {}, None, None, None, assessable=False, reason=reason, error=error)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Run:
    """A trained run loaded back from its folder (``savlt.load_run``)."""

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        self.paths = RunPaths(folder)
        if not self.paths.config.is_file():
            raise SavltError(f"{self.paths.root} is not a SAVLT run folder (no config.yaml)")
        self.cfg = load_config(self.paths.config)
        self.accelerator = make_accelerator(self.cfg, device)  # the run's precision on any device
        self.model, self.backbone_name = build_model(self.cfg, self.accelerator.device)
        load_checkpoint(self.model, self.paths.checkpoint)
        self.model.eval()
        # None: a run made before calibration existed; a calibrated run's missing file is an error
        self.calibration = load_calibration(self.paths.calibration, calibration_required(self.paths))
        self.masks = tissue_masks(self.cfg, self.model)
        stats = normalization(self.cfg.data.normalize, self.model.clip_model.normalization)
        self.transform = eval_transform(self.cfg.data.image_size, stats)
        self.thresholds = Thresholds.of(self.cfg)

    @property
    def class_names(self) -> list[str]:
        return self.cfg.class_names

    def evaluate(
        self,
        data_root: str | Path | None = None,
        centers: list[str] | None = None,
        out: str | Path | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Re-score the run (internal test split + external centers) on a data root; on another
        hospital's export (a root without the training center) only its own centers are scored.
        `out` (default RUN/evaluation) follows the run-folder rules (``claim_evaluation_folder``):
        missing, empty or an evaluation of this run, which is replaced; `overwrite` replaces
        another SAVLT run or evaluation folder."""
        cfg = self.cfg
        if data_root is not None:
            cfg = load_config(self.paths.config, values={"data.root": Path(data_root)})
        start_loader_workers(cfg, OCTDataset)
        target = RunPaths(out or self.paths.root / "evaluation")
        main = self.accelerator.is_main_process
        with ExitStack() as hold:  # the main process holds the folder's lock for the whole evaluation
            claim = claim_evaluation_folder(target, self.paths.root, cfg, self.cfg.data.root, overwrite)
            on_main(self.accelerator, lambda: hold.enter_context(claim))
            inputs = reload_inputs(cfg, self.paths.split, self.paths.few_shot, centers)
            sets = inputs.eval_sets()
            if centers is not None:
                sets = {c: r for c, r in sets.items() if c in centers}
            header = run_header(cfg, self.backbone_name, inputs, self.masks, self.calibration)
            with log_to(target.root / "evaluate.log", main):
                records = [r for center in sets.values() for r in center]
                check = partial(check_images, cfg, records, progress, "nothing was scored")
                unassessable = on_main(self.accelerator, check, share=True) or {}
                scoring = Scoring(
                    cfg,
                    self.accelerator,
                    self.masks,
                    target,
                    header,
                    self.calibration,
                    unassessable,
                    inputs.patient_sources(),
                    progress,
                )
                metrics, results = score_sets(self.model, sets, scoring)
                if main:
                    title = f"SAVLT evaluation: {self.paths.root.name}"
                    write_run_report(target.root, metrics, results, cfg, [], title, self.calibration)
                    metrics["complete"] = True  # as a run's: a stopped evaluation never looks finished
                    write_json(target.metrics, metrics)
        return metrics

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[str | Path | np.ndarray | Decoded],
        heatmap_dir: str | Path | None = None,
        batch_size: int = 16,
        progress: bool = False,
        skip_unreadable: bool = False,
    ) -> list[Prediction]:
        """Class, probabilities, high-risk probability and ROI of each scan (path, a page of a
        volume as ``<file>#<page>``, an 8-bit H×W[×3] array, or a decoded scan as (8-bit H×W×3 RGB,
        its stored pixel values), which is assessed on the stored values as a file is), in the
        order given. The probabilities are calibrated with the run's temperature; ``referral``
        follows the run's rule (refer when the predicted class is high-risk, or when the high-risk
        probability reaches the threshold of an established operating point), said in words in
        ``referral_rule``; ``prediction_set`` holds the classes not ruled out (see
        ``savlt.engine.calibration``). A scan that cannot be assessed gets no diagnosis (``assessable`` false, with the reason);
        with `skip_unreadable`, a file that cannot be read comes back with its ``error`` instead of
        stopping the others. It is `prepare` for each scan, then `diagnose` for each batch."""
        folder = self._heatmap_folder(heatmap_dir)  # before any scan is read
        if folder is not None:
            for position, item in enumerate(images):
                check_heatmap_file(heatmap_file(folder, position, scan_name(item, position)))
        done: list[Prediction] = []
        for chunk in progress_batches(list(enumerate(images)), batch_size, "predicting", progress):
            prepared = [
                self.prepare(item, position, skip_unreadable=skip_unreadable) for position, item in chunk
            ]
            diagnosed = iter(self.diagnose([p for p in prepared if isinstance(p, Ready)], heatmap_dir))
            done += [next(diagnosed) if isinstance(p, Ready) else p for p in prepared]
        return done

    def prepare(
        self,
        item: str | Path | np.ndarray | Decoded,
        position: int,
        name: str | None = None,
        skip_unreadable: bool = False,
    ) -> Ready | Prediction:
        """The work on one scan before the model, which needs no other scan (so any thread can do
        it while the model runs): decode, assess and, unless the run's segmenter makes the tissue
        masks (in `diagnose`, a batch at a time), mask, resize and normalise. A scan that cannot be
        assessed (or, with `skip_unreadable`, a file that cannot be read) comes back as its
        Prediction. `position` is the scan's number among those predicted together (it names an
        array, ``array-<position>``, and the scan's heat-map file); `name` (default: the path, or
        that array name) is the result's ``path``."""
        is_file = isinstance(item, str | Path)
        name = name or scan_name(item, position)
        try:
            rgb, raw = _decoded(item, position)
        except ImageDecodeError as exc:
            if not (skip_unreadable and is_file):
                raise
            return Prediction.without_diagnosis(name, error=str(exc))
        reason = assess(rgb, raw, self.thresholds)
        if reason is not None:
            return Prediction.without_diagnosis(name, reason=reason)
        ready = Ready(position, name, rgb)
        if not self.model.uses_masks:
            self._to_tensors(ready, np.ones(rgb.shape[:2], bool))
        elif self.masks.segmenter is None:
            self._to_tensors(ready, self.masks.masks_for_images([rgb])[0])
        return ready  # with a segmenter, `diagnose` masks and transforms a batch at a time

    def diagnose(self, ready: Sequence[Ready], heatmap_dir: str | Path | None = None) -> list[Prediction]:
        """One forward pass over prepared scans, their predictions in the same order; the heat maps
        (with `heatmap_dir`) are written there as ``<position>_<stem>_heatmap.png``."""
        folder = self._heatmap_folder(heatmap_dir)
        files = [heatmap_file(folder, r.position, r.name) for r in ready] if folder else []
        if len(set(files)) < len(files):  # never overwrite one scan's heat map with another's
            clash = next(f for f in files if files.count(f) > 1)
            raise SavltError(
                f"two scans would write the heat map {clash}: prepare them with distinct positions"
            )
        for file in files:
            check_heatmap_file(file)
        predictions, attention = self.diagnose_with_attention(ready)
        if files and attention is not None:
            for item, prediction, weights, file in zip(ready, predictions, attention, files, strict=True):
                predicted = str(prediction.predicted)
                title = heatmap_title(item.name, predicted, prediction.probabilities[predicted])
                with atomic_path(file) as tmp:
                    heatmap_png(item.rgb, weights, prediction.roi_box, tmp, title)  # type: ignore[arg-type]
                prediction.heatmap = str(file)
        return predictions

    @torch.no_grad()
    def diagnose_with_attention(self, ready: Sequence[Ready]) -> tuple[list[Prediction], np.ndarray | None]:
        """One forward pass over prepared scans: their predictions in the same order, and the
        pooling attention of each as (scans, g, g), averaged over heads (None with
        ``model.pooling=cls``): what a heat map shows (``savlt.report.plots.heatmap_png``)."""
        if not ready:
            return [], None
        waiting = [r for r in ready if r.pixels is None]
        if waiting:
            for item, mask in zip(
                waiting, self.masks.masks_for_images([r.rgb for r in waiting]), strict=True
            ):
                self._to_tensors(item, mask)
        risk = high_risk_mask(self.class_names, self.cfg.data.high_risk)
        pixels = torch.stack([r.pixels for r in ready]).to(self.accelerator.device)  # type: ignore[misc]
        mask = torch.stack([r.mask for r in ready]).to(self.accelerator.device)  # type: ignore[misc]
        with self.accelerator.autocast():
            out = self.model(pixels, mask)
            logits = self.model.logits(out).float().cpu().numpy()
        calibration = self.calibration
        probs = probabilities(delivered_logits(calibration, logits))
        refer = referrals(calibration, probs, risk)
        sets = None if calibration is None else calibration.prediction_sets(logits)
        op = {} if calibration is None else calibration.operating_point()
        boxes, fallback = out.boxes.cpu().tolist(), out.fallback.cpu().tolist()
        attention = None
        if out.attention is not None:
            grid = self.model.grid
            attention = out.attention.float().mean(dim=1).reshape(len(ready), grid, grid).cpu().numpy()
        predictions = [
            Prediction(
                path=item.name,
                predicted=self.class_names[int(probs[i].argmax())],
                probabilities={n: float(p) for n, p in zip(self.class_names, probs[i], strict=True)},
                high_risk_probability=float(probs[i][risk].sum()),
                roi_box=tuple(boxes[i]),  # type: ignore[arg-type]
                roi_fallback=bool(fallback[i]),
                calibrated=calibration is not None,
                referral=REFERRAL[bool(refer[i])],
                referral_threshold=op.get("threshold"),
                operating_point_established=op.get("established"),
                referral_rule=op.get("rule", UNCALIBRATED_RULE),
                prediction_set=None
                if sets is None
                else [n for n, chosen in zip(self.class_names, sets[i], strict=True) if chosen],
                logits={n: float(z) for n, z in zip(self.class_names, logits[i], strict=True)},
            )
            for i, item in enumerate(ready)
        ]
        return predictions, attention

    def _to_tensors(self, ready: Ready, mask: np.ndarray) -> None:
        out = self.transform(image=ready.rgb, mask=mask.astype(np.uint8))
        ready.pixels, ready.mask = out["image"], out["mask"]

    def _heatmap_folder(self, heatmap_dir: str | Path | None) -> Path | None:
        """The heat-map folder, checked (and made) before any work; None without one. It may not
        lie in the run's data root: heat maps there would be taken for scans."""
        if heatmap_dir is None:
            return None
        if self.model.pool is None:
            raise SavltError(HEATMAPS_NEED_ATTENTION)
        check_outside_data(heatmap_dir, [self.cfg.data.root], HEATMAP_FOLDER, holding=False)
        writable_folder(heatmap_dir, HEATMAP_FOLDER)
        return Path(heatmap_dir)


def scan_name(item: str | Path | np.ndarray | Decoded, position: int) -> str:
    """The name a scan's prediction carries: its path, or for an array ``array-<position>``."""
    return str(item) if isinstance(item, str | Path) else f"array-{position}"


def heatmap_file(folder: Path, position: int, name: str) -> Path:
    """Where the heat map of the scan `name`, number `position` of those predicted, is written."""
    return folder / f"{position:04d}_{Path(name).stem}_heatmap.png"


def check_heatmap_file(file: Path) -> None:
    """Refuse to write the heat map `file` over a file that is not a heat map SAVLT wrote."""
    if (file.exists() or file.is_symlink()) and not is_heatmap_png(file):
        raise OutputError(
            f"{HEATMAP_FOLDER}: {file} exists and is not a heat map SAVLT wrote; SAVLT never replaces a "
            "file it did not write: move it, or choose another folder"
        )


def _decoded(item: str | Path | np.ndarray | Decoded, position: int) -> Decoded:
    """(8-bit RGB, the stored pixel values) of a file (one page of a volume), an array or a
    decoded scan."""
    if isinstance(item, str | Path):
        pages = tiff_pages(item)  # 1 for a page name (<file>#<page>)
        if pages > 1:
            raise ImageDecodeError(
                item, f"it is a volume of {pages} B-scans: name one as {item}#0 … #{pages - 1}"
            )
        return decode_image(item)
    if isinstance(item, tuple):
        rgb, stored = np.asarray(item[0]), np.asarray(item[1])
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or stored.shape[:2] != rgb.shape[:2]:
            raise ImageDecodeError(
                f"scan #{position}",
                f"expected (8-bit H×W×3 RGB, stored values of the same H×W), got {rgb.dtype} {rgb.shape} "
                f"and {stored.shape}",
            )
        return rgb, stored
    array = np.asarray(item)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageDecodeError(
            f"array #{position}", f"expected a uint8 H×W or H×W×3 array, got {array.dtype} {array.shape}"
        )
    return (np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array), array


def write_prediction_csv(
    path: str | Path, predictions: Sequence[Prediction], class_names: Sequence[str]
) -> None:
    """The predictions as a CSV file (``savlt predict --csv``): one row per image, read or not."""
    header = [
        *PREDICTION_CSV_START,
        *(f"p_{n}" for n in class_names),
        "roi_x0",
        "roi_y0",
        "roi_x1",
        "roi_y1",
        "roi_fallback",
        "assessable",
        "not_assessable_because",
        "error",
        "heatmap",
        "referral",
        "operating_point_established",
        "prediction_set",
        *(f"logit_{n}" for n in class_names),
    ]
    rows = (
        [
            p.path,
            p.predicted or "",
            "" if p.high_risk_probability is None else f"{p.high_risk_probability:.6f}",
            *(f"{p.probabilities[n]:.6f}" if p.probabilities else "" for n in class_names),
            *([f"{v:.4f}" for v in p.roi_box] if p.roi_box else ["", "", "", ""]),
            "" if p.roi_fallback is None else int(p.roi_fallback),
            int(p.assessable),
            p.reason or "",
            p.error or "",
            p.heatmap or "",
            p.referral or "",
            "" if p.operating_point_established is None else int(p.operating_point_established),
            "" if p.prediction_set is None else SET_SEPARATOR.join(p.prediction_set),
            *(f"{p.logits[n]:.9g}" if p.logits else "" for n in class_names),
        ]
        for p in predictions
    )
    write_csv(path, header, rows)


def is_prediction_csv(path: Path) -> bool:
    """Whether `path` is a predictions CSV SAVLT wrote: a file (no link) whose header begins with
    PREDICTION_CSV_START."""
    if path.is_symlink() or not path.is_file():
        return False
    start = ",".join(PREDICTION_CSV_START).encode() + b","
    try:
        with path.open("rb") as handle:
            return handle.read(len(start)) == start
    except OSError:
        return False


def check_prediction_csv(path: Path, inputs: Sequence[str | Path], data_root: str | Path | None) -> None:
    """Refuse, before any scan is read, to write the predictions CSV `path` over one of the
    `inputs`, into the data root, or over any file that is not a predictions CSV SAVLT wrote."""
    what = "CSV file (--csv)"
    if any(contains(path, item) for item in inputs):
        raise OutputError(f"{what} {path} is one of the scans to predict: choose another file name")
    check_outside_data(path, [data_root], what, holding=False)
    if (path.exists() or path.is_symlink()) and not path.is_dir() and not is_prediction_csv(path):
        raise OutputError(
            f"{what} {path} exists and is not a predictions CSV SAVLT wrote (its first line does not begin "
            f"{','.join(PREDICTION_CSV_START)},…); SAVLT never replaces a file it did not write: choose "
            "another file name"
        )
    writable_file(path, what)


def load_run(folder: str | Path, device: str | None = None) -> Run:
    return Run(folder, device)
