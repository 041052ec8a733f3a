"""A synthetic image–text corpus for contrastive pretraining (``savlt synth OUT --pretrain``).

Scans come from scanners that are none of the evaluation centers' (``PRETRAIN_SCANNERS``, each
with the signature derived from its name), so a backbone pretrained here meets the evaluation
centers out of distribution. Each scan gets a caption describing the structure that is visible,
in varied words: several phrasings per structure, sometimes with the scanner and depth details,
never one of the class descriptions used as text anchors (``savlt.classes.DEFAULT_CLASSES``).

OUT/pairs.csv (columns file, text, with files relative to OUT) and OUT/images/<scanner>/<stem>.png;
OUT is claimed as for the data set (``files.claim_synth_folder``). The same seed gives the same
files and captions.
"""

from __future__ import annotations

import csv
import io
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from savlt.classes import DEFAULT_CLASSES, short_name
from savlt.data.synth.checks import SynthError, check_centers, check_int, check_size
from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W
from savlt.data.synth.files import (
    DEFAULT_CENTERS,
    SynthSummary,
    claim_synth_folder,
    write_scan,
)
from savlt.data.synth.render import image_rng, render_bscan
from savlt.io import write_text

PRETRAIN_SCANNERS: tuple[str, ...] = ("scanner-a", "scanner-b", "scanner-c", "scanner-d")

# What each class looks like, in several wordings: one or two structure phrases make a caption.
STRUCTURES: dict[str, tuple[str, ...]] = {
    "mild_inflammation": (
        "distinct layered structures",
        "clearly layered tissue",
        "gray-white upper and lower layers",
        "a bright upper layer over a gray-white lower layer",
        "well separated horizontal layers",
        "intact layered epithelium and stroma",
    ),
    "cyst": (
        "oval dark areas",
        "round dark cavities",
        "smooth curved layered structures",
        "dark oval spaces below curved layers",
        "smoothly bent layers around dark areas",
        "fluid-filled dark ovals",
    ),
    "ectropion": (
        "continuous papillary protrusions",
        "papillary bumps along the surface",
        "finger-like protrusions of columnar epithelium",
        "columnar epithelium in the upper region",
        "a wavy papillary upper region",
        "rows of papillae near the surface",
    ),
    "high-grade_squamous_intraepithelial_lesion": (
        "densely packed icicle-like structures",
        "icicle-like vertical streaks",
        "dense downward icicle shapes",
        "closely packed vertical spikes in the epithelium",
        "thickened epithelium with icicle-like texture",
        "packed icicle structures below the surface",
    ),
    "cancer": (
        "irregular tumor nests",
        "necrotic dark areas",
        "disordered tissue with tumor nests",
        "irregular bright nests and dark necrosis",
        "loss of layering with irregular nests",
        "patchy necrotic regions",
    ),
}
OPENINGS = (
    "OCT image",
    "Cervical OCT scan",
    "OCT B-scan of the cervix",
    "Optical coherence tomography image",
    "Cross-sectional OCT image",
    "Medical OCT scan",
)
LINKS = ("with", "showing", "that shows", "revealing", "displaying", "where one sees")
DETAILS = (
    "",
    "",
    ", imaged by {scanner}",
    " at shallow depth",
    " in the upper tissue",
    ", {scanner} acquisition",
    " just below the surface",
)


def caption(class_name: str, scanner: str, rng: np.random.Generator) -> str:
    """One caption of a scan of `class_name`, never equal to a class description."""
    while True:
        phrases = list(rng.choice(STRUCTURES[class_name], size=int(rng.integers(1, 3)), replace=False))
        text = f"{rng.choice(OPENINGS)} {rng.choice(LINKS)} {' and '.join(phrases)}"
        text += str(rng.choice(DETAILS)).format(scanner=scanner)
        if text not in DEFAULT_CLASSES.values():
            return text


def generate_pretrain_corpus(
    out: str | Path,
    *,
    seed: int = 0,
    per_class: int = 40,
    scanners: Sequence[str] = PRETRAIN_SCANNERS,
    size: tuple[int, int] = (DEFAULT_H, DEFAULT_W),
    progress: bool = True,
) -> SynthSummary:
    """Writes OUT/pairs.csv and OUT/images/<scanner>/*.png: `per_class` scans of every class from
    every scanner. The scanners may not be the evaluation centers (mixed, xiangya, huaxi)."""
    started = time.perf_counter()
    out = Path(out).expanduser()
    seed = check_int("seed", seed, 0)
    per_class = check_int("per_class", per_class, 1)
    scanners = check_centers(scanners)
    size = check_size(size)
    clash = sorted(set(scanners) & set(DEFAULT_CENTERS))
    if clash:
        raise SynthError(
            f"scanner {clash[0]!r} is an evaluation center: pretraining scans must come from other "
            f"scanners (e.g. {', '.join(PRETRAIN_SCANNERS)})"
        )
    classes = list(DEFAULT_CLASSES)
    jobs = [(s, c, i) for s in scanners for c in range(len(classes)) for i in range(per_class)]
    rows = []
    with claim_synth_folder(out):
        for scanner, class_index, index in tqdm(
            jobs, desc="synth (pretraining)", unit="img", disable=not progress
        ):
            class_name = classes[class_index]
            image, _ = render_bscan(scanner, class_name, image_rng(seed, scanner, class_index, index), size)
            rel = f"images/{scanner}/{scanner}_{short_name(class_name).lower()}_{index:04d}.png"
            write_scan(out / rel, image, scanner)
            text_rng = np.random.default_rng([seed, zlib.crc32(rel.encode("utf-8"))])
            rows.append((rel, caption(class_name, scanner, text_rng)))
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["file", "text"])
        writer.writerows(rows)
        write_text(out / "pairs.csv", table.getvalue())
    counts = {scanner: dict.fromkeys(classes, per_class) for scanner in scanners}
    return SynthSummary(out, counts, None, time.perf_counter() - started)
