"""The prediction service and the review page of a trained run (``savlt serve RUN``).

Python API::

    from savlt import load_run
    from savlt.serve import ServeOptions, create_app
    app = create_app(load_run("runs/demo"), ServeOptions(max_batch=16, token="secret"))
    # serve it with uvicorn, or test it with fastapi.testclient.TestClient(app)

``savlt.serve.app`` (the endpoints and the service), ``savlt.serve.batcher`` (micro-batching) and
``savlt.serve.uploads`` (multipart bodies read in memory, limits, decoding). The names below are
imported on first use, so ``savlt --help`` does not import FastAPI or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from savlt.serve.app import ServeOptions, create_app
    from savlt.serve.uploads import Limits

__all__ = ["Limits", "ServeOptions", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "Limits":
        from savlt.serve import uploads

        return uploads.Limits
    if name in __all__:
        from savlt.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'savlt.serve' has no attribute {name!r}")
