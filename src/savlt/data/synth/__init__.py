"""Synthetic multi-center cervical OCT B-scans, so the pipeline can be run and tested without patient data.

Every image is rendered the way an OCT B-scan is formed: a reflectivity map of the tissue (carrying the
structure the class description names) is hung below a tilted, curved tissue surface, attenuated
exponentially with depth, multiplied by correlated speckle, blurred by the scanner's optics, buried in a
noise floor and log-compressed for display. Each center is a different "scanner": its own gain, display
dynamic range and gamma, speckle strength and grain, resolution, noise floor, surface tilt, air band and
file format, so a model trained on one center meets a real domain shift on the others.

File formats per center: ``mixed`` writes 8-bit PNG, ``xiangya`` 16-bit grayscale TIFF (uint16 using only
part of the range, roughly 600..40000, so readers must rescale by the image's own range), ``huaxi`` 8-bit
JPEG (quality 90); any other center name writes 8-bit PNG with a scanner signature derived from
``zlib.crc32`` of its name. Masks are always 8-bit PNG, 255 at and below the tissue surface, 0 in the air.

With ``patients_per_class`` the scans of a class and center come from that many patients, a patient's
scans being neighbouring B-scans of one tissue; a ``metadata.csv`` per center names them, and some patients
can be written as multi-page TIFF volumes (see ``files.generate_dataset``).

Modules: ``tissue`` (reflectivity per class), ``scanner`` (signatures and image formation), ``render``
(one B-scan, or a patient's B-scans), ``files`` (the data set on disk), ``pretrain`` (the captioned pretraining corpus),
``preview`` (the contact sheet), ``checks`` (arguments
and ``SynthError``) and ``fields`` (random fields shared by tissue and scanner).
"""

from savlt.data.synth.checks import MAX_SIZE, MIN_SIZE, SynthError
from savlt.data.synth.fields import DEFAULT_H, DEFAULT_W, pixel_scale
from savlt.data.synth.files import DEFAULT_CENTERS, SynthSummary, generate_dataset
from savlt.data.synth.pretrain import PRETRAIN_SCANNERS, generate_pretrain_corpus
from savlt.data.synth.preview import write_preview
from savlt.data.synth.render import image_rng, render_bscan
from savlt.data.synth.scanner import ScannerSignature, scanner_signature

__all__ = [
    "DEFAULT_CENTERS",
    "DEFAULT_H",
    "DEFAULT_W",
    "MAX_SIZE",
    "MIN_SIZE",
    "PRETRAIN_SCANNERS",
    "ScannerSignature",
    "SynthError",
    "SynthSummary",
    "generate_dataset",
    "generate_pretrain_corpus",
    "image_rng",
    "pixel_scale",
    "render_bscan",
    "scanner_signature",
    "write_preview",
]
