"""Load on ``savlt serve`` over loopback: N concurrent clients, throughput and p50/p95 latency with
micro-batching on (``--max-batch 16``) and off (``--max-batch 1``), same run, same scans.

    .venv/bin/python benchmarks/serve_load.py [--run RUN] [--clients 8] [--requests 200] [--rounds 3]

Without --run, a tiny-backbone run is trained on synthetic data in a temporary folder (seconds).
Both servers are ``savlt serve`` processes on 127.0.0.1, started together and measured in turn,
--rounds times (the order alternating), so that a change in the machine's load hits both alike;
the figures are the medians over rounds (latency percentiles over all requests). The clients are
threads of this process, each with its own keep-alive connection, sending one 256×320 PNG scan
per request. Besides wall-clock figures, the server's CPU time per request (from /proc) is shown:
it does not depend on what else the machine runs. Each round stops after --requests requests or
--seconds seconds, whichever comes first.

``--against SRC`` adds a third server, batched, running the savlt package of another checkout
(e.g. ``git worktree add /tmp/main main`` then ``--against /tmp/main/src``), measured in the same
turns.

Before the servers start, the model call alone (``Run.diagnose``, in this process, same device and
torch threads) is timed on --max-batch scans one by one and as one batch: the ratio is the most
micro-batching can gain on this machine, HTTP, decoding and per-scan work aside.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import side_by_side
from PIL import Image

from savlt.data.imageio import read_image
from savlt.data.synth import generate_dataset
from savlt.engine.loaded import Ready, load_run

FAST = [
    "train.shots=4",
    "train.max_steps=4",
    "train.batch_size=8",
    "data.num_workers=0",
    "eval.bootstrap=20",
    "data.test_centers=[]",
]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder (default: train one with --backbone)")
    parser.add_argument(
        "--backbone",
        default="tiny",
        help="backbone of the run trained without --run (random-vit-b16: ViT-B/16 shapes)",
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per round (at most)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per round (at most)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--against",
        type=Path,
        metavar="SRC",
        help="also measure a batched server of another version: the src/ folder of its checkout",
    )
    parser.add_argument(
        "--heatmap-clients",
        type=int,
        default=0,
        help="how many of the clients ask for heat maps (as the page does)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--server-threads", type=int, help="torch threads of the server (OMP_NUM_THREADS; default: torch's)"
    )
    return parser.parse_args()


def scans_and_run(args: argparse.Namespace, work: Path) -> tuple[list[tuple[str, bytes]], Path]:
    """PNG bytes of 40 synthetic 256×320 scans, and the run to serve."""
    generate_dataset(work / "data", seed=1, per_class=8, size=(256, 320), preview=False, progress=False)
    files = sorted((work / "data" / "mixed" / "images").rglob("*.png"))[:40]
    scans = []
    for path in files:
        buffer = io.BytesIO()
        Image.fromarray(read_image(path)[:, :, 0]).save(buffer, format="PNG")
        scans.append((path.name, buffer.getvalue()))
    if args.run is not None:
        return scans, args.run
    # Trained by `savlt train` in a process of its own: this one then loads the run on --device.
    command = [
        sys.executable,
        "-m",
        "savlt.cli",
        "train",
        "--data",
        str(work / "data"),
        "--out",
        str(work / "run"),
    ]
    for setting in [*FAST, f"model.backbone={args.backbone}", f"data.cache_dir={work / 'cache'}"]:
        command += ["--set", setting]
    subprocess.run([*command, "-q"], check=True, stdout=subprocess.DEVNULL)
    return scans, work / "run"


def model_ceiling(run: Path, scans: list[tuple[str, bytes]], args: argparse.Namespace) -> tuple[float, float]:
    """Seconds per scan of the model call alone: --max-batch scans one by one, and as one batch."""
    if args.server_threads:
        torch.set_num_threads(args.server_threads)
    loaded = load_run(run, device=args.device)
    ready = []
    for number, (_, data) in enumerate(scans[: args.max_batch]):
        item = loaded.prepare(np.asarray(Image.open(io.BytesIO(data))), number)
        if isinstance(item, Ready):
            ready.append(item)
    times = side_by_side(
        {
            "one by one": lambda: [loaded.diagnose([item]) for item in ready],
            "one batch": lambda: loaded.diagnose(ready),
        },
        repeats=7,
        device=args.device,
    )
    return times["one by one"] / len(ready), times["one batch"] / len(ready)


def start_server(
    run: Path, max_batch: int, args: argparse.Namespace, source: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """``savlt serve`` in a process of its own; with `source`, the savlt package of that folder."""
    command = [sys.executable, "-m", "savlt.cli", "serve", str(run), "--port", "0", "--device", args.device]
    command += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source.resolve()), env.get("PYTHONPATH")]))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 1.0)[0]:
            found = re.search(r"at (http://127\.0\.0\.1:\d+/)", process.stdout.readline())
            if found:
                return process, found[1]
    process.kill()
    raise SystemExit("savlt serve did not start")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU time of the process so far (Linux)."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    url: str,
    scans: list[tuple[str, bytes]],
    clients: int,
    requests: int,
    seconds: float,
    heatmap_clients: int = 0,
) -> list[tuple[bool, float]]:
    """(heat map asked, latency in s) of each request of `clients` threads sending one scan per
    request until `requests` were sent or `seconds` passed; the first `heatmap_clients` threads
    ask for the heat map and the scan back, as the review page does."""
    latencies: list[tuple[bool, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.monotonic() + seconds

    def client(heatmap: bool) -> None:
        endpoint = "predict?heatmap=true&scan=true" if heatmap else "predict"
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= requests:
                        return
                    name, data = scans[sent[0] % len(scans)]
                    sent[0] += 1
                started = time.perf_counter()
                response = http.post(endpoint, files=[("files", (name, data))])
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append((heatmap, elapsed))
                    else:
                        failures.append(response.text)

    threads = [threading.Thread(target=client, args=(number < heatmap_clients,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} request(s) failed, e.g. {failures[0]}")
    return latencies


def main() -> None:
    args = parse()
    servers = {"batched": args.max_batch, "unbatched": 1}
    sources = {}
    if args.against is not None:
        if not (args.against / "savlt" / "cli.py").is_file():
            raise SystemExit(f"--against {args.against}: not a src/ folder holding the savlt package")
        sources["batched, --against"] = args.against
        servers["batched, --against"] = args.max_batch
    rounds: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
    latencies: dict[str, list[tuple[bool, float]]] = {label: [] for label in servers}
    with tempfile.TemporaryDirectory(prefix="savlt-serve-bench-") as work:
        scans, run = scans_and_run(args, Path(work))
        alone, batched = model_ceiling(run, scans, args)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the loaded run is gone: the servers get the device to themselves
        started = {
            label: start_server(run, max_batch, args, sources.get(label))
            for label, max_batch in servers.items()
        }
        try:
            for _, url in started.values():
                measure(url, scans, args.clients, 2 * args.clients, 30.0)  # warm-up
            for number in range(args.rounds):
                order = list(servers) if number % 2 == 0 else list(reversed(servers))
                for label in order:
                    process, url = started[label]
                    before, cpu = httpx.get(url + "health").json()["batches"], cpu_seconds(process)
                    wall = time.perf_counter()
                    times = measure(
                        url, scans, args.clients, args.requests, args.seconds, args.heatmap_clients
                    )
                    wall = time.perf_counter() - wall
                    after, cpu = httpx.get(url + "health").json()["batches"], cpu_seconds(process) - cpu
                    latencies[label] += times
                    batches = after["batches"] - before["batches"]
                    rounds[label].append(
                        {
                            "throughput": len(times) / wall,
                            "heatmaps": sum(heatmap for heatmap, _ in times) / wall,
                            "cpu_ms": 1000 * cpu / len(times),
                            "batch": (after["images"] - before["images"]) / max(1, batches),
                        }
                    )
        finally:
            for process, _ in started.values():
                stop(process)
    print(
        f"{args.clients} concurrent clients, {args.rounds} rounds of {args.requests} requests per server, one "
        f"256×320 PNG per request ({args.heatmap_clients} client(s) asking for heat maps), device "
        f"{args.device}, {os.cpu_count()} CPU cores"
    )
    print(
        f"{'server':<38} {'requests/s':>10} {'p50 ms':>7} {'p95 ms':>7} {'CPU ms/request':>14} {'mean batch':>10}"
    )
    throughput = {}
    for label, max_batch in servers.items():
        median = {key: float(np.median([r[key] for r in rounds[label]])) for key in rounds[label][0]}
        throughput[label] = median["throughput"]
        p50, p95 = np.percentile(np.array([t for _, t in latencies[label]]) * 1000, [50, 95])
        name = f"{label} (--max-batch {max_batch})"
        print(
            f"{name:<38} {median['throughput']:>10.1f} {p50:>7.1f} {p95:>7.1f} {median['cpu_ms']:>14.2f} "
            f"{median['batch']:>10.2f}"
        )
        if args.heatmap_clients:
            for heatmap, kind in ((True, "with heat map"), (False, "without")):
                times = [t for asked, t in latencies[label] if asked == heatmap]
                if times:
                    p50, p95 = np.percentile(np.array(times) * 1000, [50, 95])
                    rate = median["heatmaps"] if heatmap else median["throughput"] - median["heatmaps"]
                    print(f"  {kind:<36} {rate:>10.1f} {p50:>7.1f} {p95:>7.1f}")
    print(f"throughput batched / unbatched: {throughput['batched'] / throughput['unbatched']:.2f}x")
    print(
        f"the model call alone (Run.diagnose, {args.max_batch} scans): {1000 * alone:.2f} ms/scan one by one, "
        f"{1000 * batched:.2f} ms/scan as one batch: at most {alone / batched:.2f}x from batching"
    )


if __name__ == "__main__":
    main()
