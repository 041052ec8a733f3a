"""The prediction service of a loaded run (``savlt serve``): a FastAPI app with the review page.

``GET /health`` (no token), ``GET /model``, ``POST /predict`` and ``GET /openapi.json`` (a bearer
token when one is set), ``GET``/``HEAD /`` the review page and ``/static/`` its files (no token: the
page asks for it). Every answer carries ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from savlt.classes import short_name
from savlt.engine.calibration import Calibration
from savlt.engine.loaded import HEATMAPS_NEED_ATTENTION, Prediction, Ready, Run
from savlt.io import NoSpaceError, atomic_path
from savlt.report.plots import heatmap_png, heatmap_title
from savlt.serve.batcher import MicroBatcher
from savlt.serve.uploads import (
    FIELD,
    ApiError,
    FileRejected,
    Limits,
    PixelBudget,
    Scan,
    Upload,
    decode_upload,
    read_uploads,
    rejected,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PREVIEW_SIDE = 1024  # the scan sent back to the page (?scan=true) is at most this many pixels wide or high
NOSNIFF = ("X-Content-Type-Options", "nosniff")  # on every answer: browsers take the content type as given
# The page loads nothing but its own files; images come back as data: URLs.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ServeOptions:
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 16  # scans per model call; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long the first scan of a batch waits for others
    token: str | None = None  # every API request but /health needs "Authorization: Bearer <token>"
    keep_uploads: Path | None = None  # where accepted uploads are kept (None: nowhere, nothing on disk)


def _png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


@contextmanager
def _failure_named(name: str) -> Iterator[None]:
    """An unexpected failure on one scan (outside the model call) as a 500 naming the scan."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported to the client as a JSON error, the server lives on
        log.exception("%s: prediction failed", name)
        raise _prediction_failed(name, exc) from None


def _prediction_failed(name: str, exc: BaseException) -> ApiError:
    return ApiError(500, f"{name}: prediction failed ({exc})")


def _heatmap(name: str, rgb: np.ndarray, attention: np.ndarray, result: dict[str, Any]) -> str:
    """The heat map ``savlt predict --heatmap`` writes for the prediction `result`, as a PNG data
    URL (drawn in memory)."""
    buffer = io.BytesIO()
    predicted = result["predicted"]
    title = heatmap_title(name, predicted, result["probabilities"][predicted])
    with _failure_named(name):
        heatmap_png(rgb, attention, result["roi_box"], buffer, title)
    return _png_data_url(buffer.getvalue())


def _scan_preview(rgb: np.ndarray) -> str:
    """The 8-bit scan the model saw, as a PNG data URL (shrunk to PREVIEW_SIDE)."""
    image = Image.fromarray(rgb)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return _png_data_url(buffer.getvalue())


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:] or "upload"


def prediction_set_summary(calibration: Calibration | None) -> dict[str, Any] | None:
    """The run's prediction sets for ``GET /model`` (alpha and score); None without them."""
    if calibration is None or calibration.conformal_alpha is None:
        return None
    return {"alpha": calibration.conformal_alpha, "score": calibration.conformal_score}


def run_summary(run: Run, options: ServeOptions) -> dict[str, Any]:
    """What ``GET /model`` answers: the run's classes, method, backbone, shots, its per-center
    metrics (metrics.json as written) and, when the run has one, its operating point."""
    metrics: dict[str, Any] = {}
    if run.paths.metrics.is_file():
        try:
            metrics = json.loads(run.paths.metrics.read_text())
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): /model shows no metrics", run.paths.metrics, exc)
    cfg = run.cfg
    centers = metrics.get("centers") or {}
    return {
        "run": run.paths.root.name,
        "method": cfg.method,
        "backbone": run.backbone_name,
        "shots": cfg.train.shots,
        "seed": cfg.train.seed,
        "train_center": cfg.data.train_center,
        "classes": list(run.class_names),
        "labels": {name: short_name(name) for name in run.class_names},
        "high_risk": list(cfg.data.high_risk),
        "heatmaps": run.model.pool is not None,
        "complete": metrics.get("complete") is True,
        "unassessable_policy": metrics.get("unassessable_policy"),
        "centers": centers,
        "operating_point": None if run.calibration is None else run.calibration.operating_point(),
        "prediction_sets": prediction_set_summary(run.calibration),
        "limits": options.limits.to_json(),
        "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms},
    }


@dataclass
class _Prepared:
    """An accepted scan: its name, its 8-bit RGB, and what ``Run.prepare`` made of it (ready for
    the model, or already answered: not assessable)."""

    name: str
    rgb: np.ndarray
    outcome: Ready | Prediction


class Service:
    """A loaded run behind a micro-batcher: uploads in, ``Prediction.to_json()`` per scan out.
    Each request's own thread decodes, assesses, masks and transforms its scans
    (``Run.prepare``); the batcher's thread does only what gains from batches
    (``Run.diagnose_with_attention``), and the request's thread draws the heat maps asked for."""

    def __init__(self, run: Run, options: ServeOptions) -> None:
        self.run = run
        self.options = options
        self.summary = run_summary(run, options)
        self.batcher = MicroBatcher(self._predict_batch, options.max_batch, options.max_wait_ms / 1000)

    def _predict_batch(self, ready: Sequence[Ready]) -> list[tuple[dict[str, Any], np.ndarray | None]]:
        """One model call (in the batcher's thread) on scans of possibly several requests: each
        scan's result and its attention (g×g; None under CLS pooling), from which the request's
        own thread draws the heat map when it asked for one."""
        predictions, attention = self.run.diagnose_with_attention(ready)
        maps = [None] * len(predictions) if attention is None else list(attention)
        return [(p.to_json(), weights) for p, weights in zip(predictions, maps, strict=True)]

    def _prepare(self, uploads: list[Upload]) -> list[_Prepared]:
        """Decode every upload (all rejected files are named together), keep them if asked, and
        prepare each scan for the model. A scan goes to the model as (8-bit RGB, stored values),
        exactly what ``savlt predict`` reads from a file, so a 16-bit scan is judged assessable on
        its stored values here too."""
        budget = PixelBudget(self.options.limits)
        scans: list[Scan] = []
        problems: list[FileRejected] = []
        for upload in uploads:
            try:
                scans += decode_upload(upload, budget)
            except FileRejected as problem:
                problems.append(problem)
        if problems:
            raise rejected(problems, len(uploads))
        if self.options.keep_uploads is not None:
            stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
            for upload in uploads:
                target = self.options.keep_uploads / f"{stamp}-{uuid4().hex[:8]}-{_safe_name(upload.name)}"
                try:
                    with atomic_path(target) as tmp:
                        tmp.write_bytes(upload.data)
                except NoSpaceError as exc:
                    log.error("%s", exc)
                    raise ApiError(
                        507,
                        f"the upload {upload.name} cannot be kept (--keep-uploads): no space left on the "
                        "server's disk; nothing was diagnosed",
                    ) from None
        prepared = []
        for position, scan in enumerate(scans):
            with _failure_named(scan.name):
                outcome = self.run.prepare((scan.rgb, scan.raw), position, name=scan.name)
            prepared.append(_Prepared(scan.name, scan.rgb, outcome))
        return prepared

    async def predict(self, uploads: list[Upload], heatmap: bool, scan: bool) -> list[dict[str, Any]]:
        if heatmap and not self.summary["heatmaps"]:
            raise ApiError(400, HEATMAPS_NEED_ATTENTION)
        prepared = await run_in_threadpool(self._prepare, uploads)
        ready = [item for item in prepared if isinstance(item.outcome, Ready)]
        futures = self.batcher.submit([item.outcome for item in ready])
        outcomes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        answers = iter(outcomes)
        results = []
        for item in prepared:
            answer = next(answers) if isinstance(item.outcome, Ready) else item.outcome
            if isinstance(answer, BaseException):
                raise _prediction_failed(item.name, answer)
            if isinstance(answer, Prediction):  # not assessable: answered without the model
                result = answer.to_json()
            else:
                result, attention = dict(answer[0]), answer[1]
                if heatmap:
                    result["heatmap"] = await run_in_threadpool(
                        _heatmap, item.name, item.rgb, attention, result
                    )
            result["path"] = item.name
            if scan:
                result["scan"] = await run_in_threadpool(_scan_preview, item.rgb)
            results.append(result)
        return results


class NoSniff:
    """ASGI middleware: every answer says ``X-Content-Type-Options: nosniff``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                header = (NOSNIFF[0].lower().encode(), NOSNIFF[1].encode())
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def create_app(run: Run, options: ServeOptions | None = None) -> FastAPI:
    """The service of a loaded run; its micro-batcher runs while the app's lifespan does."""
    options = options or ServeOptions()
    service = Service(run, options)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.batcher.close)

    app = FastAPI(
        title="SAVLT",
        summary="Cervical OCT scans diagnosed by a trained SAVLT run",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load their scripts from a CDN
        redoc_url=None,
        openapi_url=None,  # served below, behind the token
    )
    app.add_middleware(NoSniff)

    def authorised(request: Request) -> None:
        if options.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), options.token.encode()
        ):
            raise ApiError(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %r", exc)
        return JSONResponse(  # answered outside the middleware, so the header is set here
            {"error": f"internal error ({type(exc).__name__}): see the server log"},
            status_code=500,
            headers=dict([NOSNIFF]),
        )

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorised)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        """Ready (200) when the run is loaded and its prediction worker runs, else 503."""
        ready = service.batcher.running
        body = {"status": "ready" if ready else "not ready", "run": service.summary["run"]}
        body["batches"] = service.batcher.stats.to_json()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/model", dependencies=[Depends(authorised)])
    async def model() -> dict[str, Any]:
        """Classes, high-risk classes, backbone, method, shots, per-center metrics, operating point."""
        return service.summary

    @app.post(
        "/predict",
        dependencies=[Depends(authorised)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": [FIELD],
                            "properties": {
                                FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}
                            },
                        }
                    }
                },
            }
        },
    )
    async def predict(request: Request, heatmap: bool = False, scan: bool = False) -> dict[str, Any]:
        """One result per uploaded scan (multipart field `files`), as ``savlt predict --json`` gives it,
        `path` being the file's name; `heatmap=true`: the heat map as a PNG data URL in `heatmap`;
        `scan=true`: the decoded scan as a PNG data URL in `scan`."""
        if not service.batcher.running:
            raise ApiError(503, "the service is not ready (its prediction worker is not running)")
        try:
            uploads = await read_uploads(
                request.headers.get("content-type", ""),
                request.headers.get("content-length"),
                request.stream(),
                options.limits,
            )
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected before the upload was complete") from None
        return {"predictions": await service.predict(uploads, heatmap, scan)}

    return app
