"""Uploaded scans, read and checked in memory: the multipart body is parsed as it arrives (nothing
is spooled to disk), each file is held to the size limit while it streams, and its content is
decoded (the extension is not trusted) after its pixel count has been read from the header."""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from savlt.data.imageio import ImageDecodeError, as_scan, pil_pixels, read_tiff
from savlt.io import plain_text

FIELD = "files"
MB = 2**20
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries allowed on top of the files' bytes


@dataclass(frozen=True)
class Limits:
    """What one request may bring (``savlt serve --max-upload-mb/--max-pixels/--max-files``)."""

    max_upload_bytes: int = 32 * MB
    max_pixels: int = 4096 * 4096
    max_files: int = 16

    def to_json(self) -> dict[str, int]:
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_files": self.max_files,
        }


class ApiError(Exception):
    """A request the service refuses: an HTTP status, one line saying why, and per file the reason
    (and the limit it broke, if any)."""

    def __init__(self, status: int, message: str, files: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.files = files or []

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.files:
            body["files"] = self.files
        return body


class FileRejected(Exception):
    """One uploaded file that cannot be used; `limit` names the limit it broke (None: unreadable)."""

    def __init__(self, name: str, reason: str, limit: str | None = None) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.limit = limit

    def to_json(self) -> dict[str, Any]:
        return {"file": self.name, "error": self.reason, "limit": self.limit}


def size_text(size: float) -> str:
    """A byte count for a person: "32 MB", "1.5 MB", "800 bytes"."""
    return f"{size / MB:.3g} MB" if size >= MB / 10 else f"{size:.0f} bytes"


def rejected(problems: list[FileRejected], total: int) -> ApiError:
    """The request's error for its rejected files: 413 when a limit was broken, else 415."""
    status = 413 if any(p.limit for p in problems) else 415
    listed = "; ".join(str(p) for p in problems)
    return ApiError(
        status, f"{len(problems)} of {total} file(s) rejected: {listed}", [p.to_json() for p in problems]
    )


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class _Part:
    name: str = ""
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class _Collector:
    """The callbacks of python-multipart's streaming parser: one _Part per part, in memory."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.parts: list[_Part] = []
        self.header: list[bytes] = [b"", b""]
        self.headers: dict[bytes, bytes] = {}
        self.ended = False

    @property
    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self._add(0, data[start:end]),
            "on_header_value": lambda data, start, end: self._add(1, data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_end": self.end,
        }

    def _add(self, which: int, data: bytes) -> None:
        self.header[which] += data

    def part_begin(self) -> None:
        self.parts.append(_Part())
        self.headers = {}

    def header_end(self) -> None:
        self.headers[self.header[0].strip().lower()] = self.header[1].strip()
        self.header = [b"", b""]

    def headers_finished(self) -> None:
        part = self.parts[-1]
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != FIELD:
            raise ApiError(400, f"unexpected form field {name!r}: send the scans in the field {FIELD!r}")
        raw_name = options.get(b"filename", b"").decode("utf-8", "surrogateescape")
        name = PurePosixPath(raw_name.replace("\\", "/")).name
        part.name = (
            plain_text(name) if name else f"upload-{len(self.parts)}"
        )  # a name as `savlt predict` writes it
        if len(self.parts) > self.limits.max_files:
            raise ApiError(
                413,
                f"more than {self.limits.max_files} files in one request (--max-files): send them in "
                "several requests",
            )

    def part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        if part.size > self.limits.max_upload_bytes:
            problem = FileRejected(
                part.name,
                f"larger than the limit of {size_text(self.limits.max_upload_bytes)} per file",
                "--max-upload-mb",
            )
            raise rejected([problem], len(self.parts))
        part.chunks.append(bytes(data[start:end]))

    def end(self) -> None:
        self.ended = True


async def read_uploads(
    content_type: str, content_length: str | None, body: AsyncIterator[bytes], limits: Limits
) -> list[Upload]:
    """The files of a multipart/form-data body (field `files`), read in memory as they stream in.

    A body that is not multipart, is malformed or holds no file is a 400; too many files, a file
    over the size limit or a declared length over what the limits allow is a 413."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(
            400,
            f"send the scans as multipart/form-data in the field {FIELD!r} (got {content_type or 'no body'!r})",
        )
    budget = limits.max_files * limits.max_upload_bytes + MULTIPART_OVERHEAD
    if content_length is not None and content_length.isdigit() and int(content_length) > budget:
        raise ApiError(
            413,
            f"the request is {size_text(int(content_length))}, more than {limits.max_files} files of at most "
            f"{size_text(limits.max_upload_bytes)} each (--max-files, --max-upload-mb)",
        )
    collector = _Collector(limits)
    received = 0
    try:
        parser = MultipartParser(boundary, collector.callbacks)
        async for chunk in body:
            received += len(chunk)
            if received > budget:
                raise ApiError(
                    413,
                    f"the request is larger than {size_text(budget)}: at most {limits.max_files} files of at "
                    f"most {size_text(limits.max_upload_bytes)} each (--max-files, --max-upload-mb)",
                )
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, f"malformed multipart body ({exc})") from None
    if not collector.ended:
        raise ApiError(400, "malformed multipart body (it ends before its closing boundary)")
    if not collector.parts:
        raise ApiError(400, f"no files: send one or more scans in the multipart field {FIELD!r}")
    return [Upload(p.name, b"".join(p.chunks)) for p in collector.parts]


@dataclass
class Scan:
    """One decoded scan: its name (a page of a TIFF volume: ``<file>#<page>``, as ``savlt predict``
    names it), the 8-bit RGB array and the pixel values as stored."""

    name: str
    rgb: np.ndarray
    raw: np.ndarray


class PixelBudget:
    """The pixels a request may decode, checked from each scan's header before it is decoded: at
    most `max_pixels` a scan, and `max_files` × `max_pixels` in all (the pages of a volume count
    one by one)."""

    def __init__(self, limits: Limits) -> None:
        self.max_pixels = limits.max_pixels
        self.total = limits.max_files * limits.max_pixels
        self.left = self.total

    def take(self, name: str, width: int, height: int) -> None:
        pixels = width * height
        if pixels > self.max_pixels:
            reason = f"{width}×{height} = {pixels} pixels, more than the limit of {self.max_pixels} per scan"
            raise FileRejected(name, reason, "--max-pixels")
        if pixels > self.left:
            reason = f"the request's scans hold more than {self.total} pixels in all"
            raise FileRejected(name, reason, "--max-files × --max-pixels")
        self.left -= pixels


def _pillow(name: str, data: bytes, budget: PixelBudget) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                budget.take(name, img.width, img.height)
                return pil_pixels(img)
    except UnidentifiedImageError:
        raise FileRejected(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = f"Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
        raise FileRejected(name, f"too many pixels to decode safely ({limit})", limit) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FileRejected(name, f"corrupt or truncated image ({exc})") from None


def _scan(name: str, pixels: np.ndarray) -> Scan:
    try:
        rgb, pixels = as_scan(pixels, name)
    except ImageDecodeError as exc:
        raise FileRejected(name, exc.reason) from None
    return Scan(name, rgb, pixels)


def decode_upload(upload: Upload, budget: PixelBudget) -> list[Scan]:
    """The scans of an uploaded file, decoded from its content (TIFF found by its signature and read
    by the reader ``savlt predict`` uses, any other format by Pillow): one scan, or one per page of
    a TIFF volume, each page held to the pixel limits before it is decoded. FileRejected names the
    file (or page) and the reason."""
    if not upload.data:
        raise FileRejected(upload.name, "the file is empty (0 bytes)")
    try:
        pages = (
            read_tiff(io.BytesIO(upload.data), upload.name, check=budget.take)
            if upload.data[:4] in TIFF_MAGIC
            else None
        )
    except ImageDecodeError as exc:
        raise FileRejected(str(exc.path), exc.reason) from None
    if pages is None:
        pages = [(upload.name, _pillow(upload.name, upload.data, budget))]
    return [_scan(name, pixels) for name, pixels in pages]
