"""``savlt serve RUN [--host 127.0.0.1] [--port 8000] [--device cpu|cuda] [--token-file FILE]
[--keep-uploads DIR] [limits and batching options]``: the run loaded once, served until Ctrl-C.

Registered by savlt.cli. A bad option, token file, upload folder or run folder, or an address
that cannot be listened on, is a one-line error (exit status 2) before anything is served.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket
from pathlib import Path

from savlt.errors import SavltError
from savlt.io import read_text

log = logging.getLogger(__name__)


def read_token(path: Path) -> str:
    """The bearer token: the file's one line, surrounding whitespace removed."""
    token = read_text(path, "token file").strip()
    if not token or any(c.isspace() for c in token):
        raise SavltError(
            f"token file {path} must hold one token on one line (no spaces), found {len(token)} characters"
        )
    return token


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or an error naming the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise SavltError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --host/--port"
        ) from None
    sock.set_inheritable(True)
    return sock


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _not_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535 (0: any free port), got {value}")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from savlt.config import load_config
    from savlt.engine.loaded import load_run
    from savlt.engine.runfolder import RunPaths
    from savlt.io import check_outside_data, writable_folder
    from savlt.serve.app import ServeOptions, create_app
    from savlt.serve.uploads import MB, Limits

    token = read_token(args.token_file) if args.token_file is not None else None
    if args.keep_uploads is not None:  # uploads kept in the run's data root would be taken for scans
        what = "upload folder (--keep-uploads)"
        config = RunPaths(args.run).config  # read before the model loads (load_run names a bad run)
        trained_on = load_config(config).data.root if config.is_file() else None
        check_outside_data(args.keep_uploads, [trained_on], what, holding=False)
        writable_folder(args.keep_uploads, what)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SavltError("--device cuda: no CUDA device is available here (use --device cpu)")
    limits = Limits(round(args.max_upload_mb * MB), args.max_pixels, args.max_files)
    options = ServeOptions(limits, args.max_batch, args.max_wait_ms, token, args.keep_uploads)
    sock = listening_socket(args.host, args.port)
    app = create_app(load_run(args.run, args.device), options)
    if token is None and not is_loopback(args.host):
        log.warning(
            "serving on %s without --token-file: anyone who reaches this address can use the API", args.host
        )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {args.run} at http://{shown}:{port}/ (review page; API: /predict, /model, /health; Ctrl-C stops)",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if args.verbose else "warning"))
    # uvicorn finishes the requests in flight on Ctrl-C and `kill`; a closed terminal counts as `kill`
    signal.signal(signal.SIGHUP, lambda signum, frame: server.handle_exit(signal.SIGTERM, frame))
    server.run(sockets=[sock])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained run over HTTP, with a review page for clinicians")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=_port, default=8000, help="port, 0 to 65535 (default 8000; 0: any free port)"
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where the model runs (default: a GPU when there is one), at the run's precision",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="every API request but /health then needs 'Authorization: Bearer <the token in FILE>'",
    )
    p.add_argument("--keep-uploads", type=Path, metavar="DIR", help="keep every accepted upload in DIR")
    p.add_argument(
        "--max-upload-mb", type=_positive, default=32.0, help="largest file accepted, in MB (default 32)"
    )
    p.add_argument(
        "--max-pixels", type=_count, default=4096 * 4096, help="largest scan, in pixels (default 4096²)"
    )
    p.add_argument("--max-files", type=_count, default=16, help="files per request (default 16)")
    p.add_argument(
        "--max-batch", type=_count, default=16, help="scans per model call (default 16; 1: no batching)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=_not_negative,
        default=5.0,
        help="how long a batch waits for more scans, in milliseconds (default 5)",
    )
    p.set_defaults(func=cmd_serve)
