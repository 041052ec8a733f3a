"""Decoding scans and tissue masks into arrays, with errors that name the file.

OCT frames come as 8-bit PNG/JPEG/BMP or as 16-bit / float TIFF. Everything is turned into an
8-bit RGB array: deeper types are rescaled by the image's own range (scanners use only part of the
16-bit range) and grayscale is replicated to three channels, which is what CLIP expects.

A multi-page TIFF is a volume: each page is one B-scan, named ``<file>#<page>`` (pages count from
0), a path that every reader here accepts. Files and the service's uploads are read by the same TIFF
reader (``read_tiff``): uncompressed, PackBits, LZW, Deflate (zlib), JPEG and the other compressions
``imagecodecs`` decodes, in strips or tiles; a file tifffile cannot parse is left to Pillow.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from savlt.errors import SavltError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
MASK_EXTENSION = ".png"


class ImageDecodeError(SavltError):
    """A file that is not a usable image or mask; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


_PAGE = re.compile(r"^(?P<file>.+\.tiff?)#(?P<page>\d+)$", re.IGNORECASE)


def page_path(file: str | Path, page: int) -> Path:
    """The name of one page (B-scan) of a multi-page TIFF volume: ``<file>#<page>``."""
    file = Path(file)
    return file.with_name(f"{file.name}#{page}")


def split_page(path: str | Path) -> tuple[Path, int | None]:
    """(the file, the page) of a page name ``<file>.tif#<page>``; (path, None) for anything else,
    a file that exists under the full name included."""
    path = Path(path)
    found = _PAGE.match(path.name)
    if found is None or path.is_file():
        return path, None
    return path.with_name(found["file"]), int(found["page"])


def tiff_pages(path: str | Path) -> int:
    """How many B-scans a TIFF file holds (the pages of its first series); 1 for any other file
    and for a TIFF whose pages cannot be counted (the decode check then reports it)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return 1
    try:
        with tifffile.TiffFile(path) as tif:
            return max(1, len(tif.series[0].pages)) if tif.series else 1
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse: read (and judged) as one image
        return 1


def volume_pages(files: list[Path]) -> list[Path]:
    """`files` with every multi-page TIFF replaced by its pages (``<file>#0``, ``<file>#1``, …)."""
    found: list[Path] = []
    for file in files:
        pages = tiff_pages(file)
        found += [page_path(file, i) for i in range(pages)] if pages > 1 else [file]
    return found


def read_tiff(
    source: Path | BinaryIO,
    name: str,
    page: int | None = None,
    check: Callable[[str, int, int], None] | None = None,
) -> list[tuple[str, np.ndarray]] | None:
    """The stored pixels of a TIFF file or upload, each with its scan name: the one image (`name`),
    every page of a volume (``<name>#0``, ``<name>#1``, …) or only `page`. `check(scan name,
    width, height)` sees each page's size before it is decoded (the service's pixel limits).

    None when tifffile cannot parse the file, or cannot decode its only image (Pillow then reads
    it); a page of a volume that cannot be decoded, or a page past its end, is an ImageDecodeError.
    """
    try:
        tif = tifffile.TiffFile(source)
    except Exception:  # noqa: BLE001 - tifffile raises many kinds for what it cannot parse
        return None
    with tif:
        try:
            pages = list(tif.series[0].pages) if tif.series else list(tif.pages[:1])
            sizes = [(int(p.keyframe.imagewidth), int(p.keyframe.imagelength)) for p in pages]
        except Exception:  # noqa: BLE001 - a damaged header
            return None
        count = len(pages)
        if page is not None and page >= count:
            raise ImageDecodeError(f"{name}#{page}", f"the volume has {count} page(s) (0 to {count - 1})")
        found = []
        for number in range(count) if page is None else [page]:
            scan = name if count == 1 else f"{name}#{number}"
            if check is not None:
                check(scan, *sizes[number])
            try:
                found.append((scan, np.asarray(pages[number].asarray())))
            except Exception as exc:  # noqa: BLE001 - tifffile and its codecs raise many kinds
                if count == 1:
                    return None
                raise ImageDecodeError(scan, f"corrupt or truncated TIFF volume ({exc})") from None
        return found


def _read_raw(path: Path) -> np.ndarray:
    """The pixel array as stored (any dtype, 2-D or H×W×C); a page name reads that page."""
    path, page = split_page(path)
    name = path if page is None else page_path(path, page)
    if not path.is_file():
        raise ImageDecodeError(name, "no such file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(name, "the file is empty (0 bytes)")
    if page is not None or path.suffix.lower() in (".tif", ".tiff"):
        found = read_tiff(path, str(path), page or 0)
        if found is not None:
            return found[0][1]
        if page:
            raise ImageDecodeError(name, "not a TIFF volume that can be read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return pil_pixels(img)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"corrupt or truncated image ({exc})") from None


def pil_pixels(img: Image.Image) -> np.ndarray:
    """The fully decoded pixels of an opened Pillow image (truncated files fail here); palette
    images become RGB(A), CMYK becomes RGB."""
    img.load()
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    return np.asarray(img)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Rescale non-8-bit pixels to 0..255 by their own min/max range."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    data = pixels.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(pixels.shape, dtype=np.uint8)
    low, high = data[finite].min(), data[finite].max()
    data = np.where(finite, data, low)
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((data - low) * (255.0 / (high - low))).astype(np.uint8)


def to_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    """H×W×3 from grayscale, gray+alpha, RGB or RGBA; anything else is an error."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 2:  # gray + alpha
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        return np.ascontiguousarray(pixels[:, :, :3])
    raise ImageDecodeError(path, f"unsupported pixel layout {pixels.shape} (expected grayscale, RGB or RGBA)")


def decode_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A scan as (8-bit RGB array H×W×3, the pixel values as stored in the file)."""
    path = Path(path)
    return as_scan(_read_raw(path), path)


def as_scan(pixels: np.ndarray, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Stored pixels as a scan: (8-bit RGB array H×W×3, the pixels); `path` names it in errors."""
    path = Path(path)
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4) and pixels.shape[2] > 4:
        pixels = np.moveaxis(pixels, 0, -1)  # channel-first TIFF
    rgb = to_rgb(to_uint8(pixels) if pixels.ndim == 2 else pixels, path)
    if rgb.dtype != np.uint8:
        rgb = to_uint8(rgb)
    if min(rgb.shape[:2]) < 8:
        raise ImageDecodeError(path, f"image is too small ({rgb.shape[1]}×{rgb.shape[0]} pixels)")
    return rgb, pixels


def read_image(path: str | Path) -> np.ndarray:
    """Decode a scan to an 8-bit RGB array of shape H×W×3."""
    return decode_image(path)[0]


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A binary tissue mask (0/255 or 0/1 PNG) as a bool H×W array, checked against `shape`."""
    path = Path(path)
    pixels = _read_raw(path)
    if pixels.ndim == 3:
        if not (pixels[..., :1] == pixels[..., : min(3, pixels.shape[2])]).all():
            raise ImageDecodeError(path, "mask is not single-channel (colour values differ)")
        pixels = pixels[..., 0]
    values = np.unique(pixels)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:6]) + (" …" if len(values) > 6 else "")
        raise ImageDecodeError(path, f"mask is not binary (values {shown}; expected 0/255 or 0/1)")
    if shape is not None and tuple(pixels.shape) != tuple(shape):
        raise ImageDecodeError(
            path,
            f"mask size {pixels.shape[1]}×{pixels.shape[0]} differs from its image ({shape[1]}×{shape[0]})",
        )
    return pixels > 0
