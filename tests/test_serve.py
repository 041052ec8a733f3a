"""The prediction service (``savlt serve``) through FastAPI's test client: every endpoint, bad
input, limits, the token, and micro-batching (tiny CLIP, a run trained in a few seconds)."""

from __future__ import annotations

import base64
import io
import json
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import fast_config
from fastapi.testclient import TestClient
from PIL import Image

from savlt.cli import main
from savlt.engine.loaded import load_run
from savlt.engine.training import train
from savlt.report.plots import HEATMAP_DPI, HEATMAP_SIZE, heatmap_png
from savlt.serve import Limits, ServeOptions, create_app
from savlt.serve.batcher import MicroBatcher

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread):
    """A trained tiny run (internal test split only) and the run loaded once."""
    out = tmp_path_factory.mktemp("serve") / "run"
    train(fast_config(synth_root, "data.test_centers=[]"), out, progress=False)
    return out, load_run(out)


@pytest.fixture(scope="module")
def scans(synth_root: Path) -> list[Path]:
    """Scans of the three synthetic scanners: 8-bit PNG, 16-bit TIFF, JPEG."""
    return [
        *sorted((synth_root / "mixed" / "images" / "cyst").iterdir())[:2],
        *sorted((synth_root / "xiangya" / "images" / "cancer").iterdir())[:2],
        *sorted((synth_root / "huaxi" / "images" / "ectropion").iterdir())[:2],
    ]


def client_for(served, **options) -> TestClient:
    return TestClient(create_app(served[1], ServeOptions(**options)))


def upload(*files: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, data)) for name, data in files]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same_prediction(got: dict, expected: dict, tol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    assert got["predicted"] == expected["predicted"]
    assert got["assessable"] == expected["assessable"] and got["reason"] == expected["reason"]
    for name, p in expected["probabilities"].items():
        assert got["probabilities"][name] == pytest.approx(p, abs=tol)
    assert got["high_risk_probability"] == pytest.approx(expected["high_risk_probability"], abs=tol)
    assert got["roi_box"] == pytest.approx(expected["roi_box"], abs=1e-6)
    assert got["roi_fallback"] == expected["roi_fallback"]


def test_health_model_and_page(served) -> None:
    out, run = served
    with client_for(served) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ready"
        model = client.get("/model").json()
        assert model["classes"] == run.class_names and model["labels"]["cancer"] == "cancer"
        assert model["high_risk"] == ["high-grade_squamous_intraepithelial_lesion", "cancer"]
        assert (model["method"], model["backbone"], model["shots"]) == ("savlt", "tiny", 4)
        metrics = json.loads((out / "metrics.json").read_text())
        assert model["centers"] == metrics["centers"] and "accuracy" in model["centers"]["mixed"]
        op = model["operating_point"]  # 2 high-risk validation scans: the screen falls back to the class
        assert op["established"] is False and op["threshold"] is None
        assert "fewer than the 20" in op["not_established_because"] and op["rule"] == run.calibration.rule()
        assert model["prediction_sets"] == {"alpha": 0.1, "score": "lac"}
        assert model["heatmaps"] is True and model["limits"]["max_files"] == 16
        assert "/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 404  # its scripts would come from a CDN
        page = client.get("/")
        assert page.status_code == 200 and "SAVLT scan review" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
            assert text and "http://" not in text and "https://" not in text  # nothing from the internet
    assert client.get("/health").status_code == 503  # the worker stops with the app


def test_predictions_are_what_savlt_predict_json_gives(served, scans: list[Path], capsys) -> None:
    out, _ = served
    assert main(["predict", str(out), *map(str, scans), "--json", "-q"]) == 0
    expected = json.loads(capsys.readouterr().out)
    with client_for(served) as client:
        response = client.post("/predict", files=upload(*((p.name, p.read_bytes()) for p in scans)))
    assert response.status_code == 200
    got = response.json()["predictions"]
    assert [g["path"] for g in got] == [p.name for p in scans]
    for g, e in zip(got, expected, strict=True):
        assert_same_prediction(g, e)
        assert g["heatmap"] is None and "scan" not in g


def test_a_tiff_volume_gives_one_prediction_per_page_as_savlt_predict_does(
    served, scans: list[Path], tmp_path: Path, capsys
) -> None:
    out, _ = served
    pages = [tifffile.imread(p) for p in scans[2:4]]  # two 16-bit B-scans of the same size
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.stack(pages))
    assert main(["predict", str(out), str(volume), "--json", "-q"]) == 0
    expected = json.loads(capsys.readouterr().out)
    with client_for(served) as client:
        got = client.post("/predict", files=upload((volume.name, volume.read_bytes()))).json()["predictions"]
    assert [g["path"] for g in got] == ["volume.tif#0", "volume.tif#1"]
    for g, e in zip(got, expected, strict=True):
        assert Path(e["path"]).name == g["path"]
        assert_same_prediction(g, e)
    small = Limits(max_pixels=pages[0].size, max_files=1)
    with client_for(served, limits=small) as client:
        response = client.post("/predict", files=upload((volume.name, volume.read_bytes())))
    assert response.status_code == 413 and response.json()["files"][0]["file"] == "volume.tif#1"


def test_heat_map_and_scan_come_back_as_pngs(served, scans: list[Path], tmp_path: Path) -> None:
    _, run = served
    with client_for(served) as client:
        response = client.post(
            "/predict?heatmap=true&scan=true", files=upload((scans[0].name, scans[0].read_bytes()))
        )
    item = response.json()["predictions"][0]
    for key in ("heatmap", "scan"):
        assert item[key].startswith("data:image/png;base64,")
    scan = Image.open(io.BytesIO(base64.b64decode(item["scan"].split(",", 1)[1])))
    assert scan.size == Image.open(scans[0]).size
    heat = Image.open(io.BytesIO(base64.b64decode(item["heatmap"].split(",", 1)[1])))
    assert heat.format == "PNG" and heat.width > scan.width
    # the very heat map `savlt predict --heatmap` writes (drawn by the request's thread, in memory)
    written = Image.open(run.predict([scans[0]], heatmap_dir=tmp_path)[0].heatmap)
    assert np.array_equal(np.asarray(heat), np.asarray(written))


def test_heat_maps_drawn_in_several_threads_at_once_are_those_drawn_one_by_one() -> None:
    rng = np.random.default_rng(0)
    scans = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(4)]
    maps = [rng.random((14, 14)) for _ in range(4)]

    def draw(i: int) -> bytes:
        buffer = io.BytesIO()
        heatmap_png(scans[i], maps[i], (0.0, 0.25, 1.0, 1.0), buffer)
        return buffer.getvalue()

    alone = [draw(i) for i in range(4)]
    together: dict[int, bytes] = {}
    threads = [threading.Thread(target=lambda i=i: together.update({i: draw(i)})) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [together[i] for i in range(4)] == alone and len(set(alone)) == 4
    buffer = io.BytesIO()
    heatmap_png(np.zeros((2000, 8, 3), np.uint8), maps[0], (0.0, 0.25, 1.0, 1.0), buffer)
    assert Image.open(buffer).height <= HEATMAP_SIZE[2] * HEATMAP_DPI  # a sliver of a scan: height capped


def test_a_scan_that_cannot_be_assessed_gets_no_diagnosis(served) -> None:
    flat8 = np.full((64, 80), 128, np.uint8)
    flat16 = (30000 + np.random.default_rng(0).integers(0, 4, (64, 80))).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, flat16)
    with client_for(served) as client:
        response = client.post(
            "/predict", files=upload(("flat.png", png_bytes(flat8)), ("flat16.tif", buffer.getvalue()))
        )
        batches = client.get("/health").json()["batches"]
    assert response.status_code == 200
    for item in response.json()["predictions"]:
        assert item["assessable"] is False and item["predicted"] is None
        assert "near-constant" in item["reason"]  # judged on the stored 16-bit values, not stretched
    assert batches["images"] == 0  # answered by the request itself: never queued for the model


def test_a_16_bit_scan_is_judged_as_savlt_predict_judges_its_file(served, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    faint = np.empty((96, 128), np.uint16)
    faint[:32] = 30000 + rng.integers(0, 40, (32, 128))  # air above
    faint[32:] = 30080 + rng.integers(0, 20, (64, 128))  # faint tissue below
    faint[0, 0] = 65535  # one hot pixel: the 8-bit view has 0s and 1s, the stored values 100 levels
    path = tmp_path / "faint.tif"
    tifffile.imwrite(path, faint)
    expected = served[1].predict([path])[0].to_json()
    with client_for(served) as client:
        response = client.post("/predict", files=upload(("faint.tif", path.read_bytes())))
    got = response.json()["predictions"][0]
    assert expected["assessable"] is True  # judged on the stored values, as the file is
    assert_same_prediction({**got, "path": None}, {**expected, "path": None})


def test_bad_input_is_a_4xx_naming_the_file_and_the_server_keeps_serving(served, scans: list[Path]) -> None:
    good = scans[0].read_bytes()
    truncated = good[: len(good) // 2]
    limits = Limits(max_upload_bytes=len(good) + 10, max_pixels=200 * 200, max_files=3)
    big = png_bytes(np.zeros((300, 300), np.uint8))
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.zeros((210, 210), np.uint16), compression="zlib")
    with client_for(served, limits=limits) as client:
        cases = [
            (
                upload(("notes.png", b"patient notes, not a scan")),
                415,
                "notes.png: not a recognised image format",
            ),
            (upload(("cut.png", truncated)), 415, "cut.png: corrupt or truncated"),
            (upload(("empty.png", b"")), 415, "empty.png: the file is empty"),
            (
                upload(("tiny.png", png_bytes(np.zeros((4, 4), np.uint8)))),
                415,
                "tiny.png: image is too small",
            ),
            (upload(("huge.png", good + b"\0" * 20)), 413, "huge.png: larger than the limit"),
            (
                upload(("wide.png", big)),
                413,
                "wide.png: 300×300 = 90000 pixels, more than the limit of 40000 per scan",
            ),
            (upload(("wide.tif", tiff.getvalue())), 413, "wide.tif: 210×210"),
            (
                upload(*[(f"{i}.png", good) for i in range(4)]),
                413,
                "more than 3 files in one request (--max-files)",
            ),
            (upload(("ok.png", good), ("bad.png", b"xx")), 415, "1 of 2 file(s) rejected: bad.png"),
        ]
        for files, status, message in cases:
            response = client.post("/predict", files=files)
            assert response.status_code == status, (message, response.json())
            assert message in response.json()["error"]
        rejected = client.post("/predict", files=upload(("huge.png", good + b"\0" * 20))).json()["files"]
        assert rejected == [{"file": "huge.png", "error": rejected[0]["error"], "limit": "--max-upload-mb"}]
        renamed = client.post(
            "/predict", files=upload(("scan.txt", good))
        )  # the content decides, not the name
        assert renamed.status_code == 200 and renamed.json()["predictions"][0]["predicted"] is not None
        requests = [
            ({"data": {"files": "x"}}, 400, "multipart/form-data"),
            ({"files": [("other", ("a.png", good))]}, 400, "unexpected form field 'other'"),
            (
                {
                    "content": b"--xyz\r\nbroken",
                    "headers": {"content-type": "multipart/form-data; boundary=xyz"},
                },
                400,
                "malformed",
            ),
            (
                {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
                400,
                "malformed",
            ),
            (
                {
                    "content": b"x",
                    "headers": {
                        "content-type": "multipart/form-data; boundary=x",
                        "content-length": str(10**9),
                    },
                },
                413,
                "more than 3 files",
            ),
        ]
        for kwargs, status, message in requests:
            response = client.post("/predict", **kwargs)
            assert response.status_code == status and message in response.json()["error"], response.text
        assert client.post("/predict?heatmap=maybe", files=upload(("a.png", good))).status_code == 422
        assert client.get("/health").json()["status"] == "ready"
        again = client.post("/predict", files=upload(("a.png", good)))
        assert again.status_code == 200 and again.json()["predictions"][0]["assessable"] is True


def test_an_unexpected_failure_on_one_scan_is_a_500_naming_it(served, scans: list[Path], monkeypatch) -> None:
    _, run = served
    prepare = run.prepare

    def failing(item, position, name=None, skip_unreadable=False):
        if name == "bad.png":
            raise RuntimeError("something broke")
        return prepare(item, position, name, skip_unreadable)

    monkeypatch.setattr(run, "prepare", failing)
    with client_for(served) as client:
        response = client.post("/predict", files=upload(("bad.png", scans[0].read_bytes())))
        assert response.status_code == 500
        assert response.json() == {"error": "bad.png: prediction failed (something broke)"}
        assert client.post("/predict", files=upload(("good.png", scans[0].read_bytes()))).status_code == 200


def test_the_token_guards_every_api_request_but_health_and_the_page(served, scans: list[Path]) -> None:
    files = upload((scans[0].name, scans[0].read_bytes()))
    with client_for(served, token=TOKEN) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = client.get("/model", headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert client.post("/predict", files=files, headers=headers).status_code == 401
        assert client.get("/model", headers=AUTH).status_code == 200
        assert client.post("/predict", files=files, headers=AUTH).status_code == 200
    with client_for(served) as client:
        assert client.get("/model").status_code == 200


def test_uploads_stay_in_memory_unless_kept(served, scans: list[Path], tmp_path: Path, monkeypatch) -> None:
    scan16 = np.random.default_rng(1).integers(0, 65535, (768, 1024), dtype=np.uint16)
    scan16[:200] = 0  # a dark band above the tissue
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, scan16)
    large = buffer.getvalue()  # 1.5 MB: more than a form parser keeps in memory before spooling to disk

    def no_temporary_files(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_temporary_files)
    with client_for(served) as client:
        assert client.post("/predict", files=upload(("large.tif", large))).status_code == 200
    kept = tmp_path / "kept"
    kept.mkdir()
    with client_for(served, keep_uploads=kept) as client:
        client.post("/predict", files=upload(("large.tif", large), (scans[0].name, scans[0].read_bytes())))
    files = sorted(kept.iterdir(), key=lambda p: p.name.endswith(".tif"))
    assert [p.name.split("-", 2)[2] for p in files] == [scans[0].name, "large.tif"]
    assert files[1].read_bytes() == large


def test_concurrent_requests_are_batched_and_equal_single_predictions(served, synth_root: Path) -> None:
    _, run = served
    paths = sorted((synth_root / "huaxi" / "images").rglob("*.jpg"))[:6]
    single = [run.predict([p])[0].to_json() for p in paths]
    answers: dict[int, dict] = {}
    # The batch closes when it is full, not on a clock: however slow the machine, the six requests
    # meet in one model call unless batching is broken (the minute is only a backstop).
    with client_for(served, max_batch=len(paths), max_wait_ms=60_000) as client:
        start = threading.Barrier(len(paths))

        def send(i: int) -> None:  # every other request asks for the heat map, as the page does
            start.wait()
            query = "?heatmap=true" if i % 2 else ""
            response = client.post(f"/predict{query}", files=upload((paths[i].name, paths[i].read_bytes())))
            answers[i] = response.json()["predictions"][0]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(paths))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        stats = client.get("/health").json()["batches"]
    # one model call for all of them, heat maps asked or not
    assert stats == {"batches": 1, "images": len(paths), "largest": len(paths), "mean": len(paths)}
    for i, expected in enumerate(single):
        assert answers[i]["path"] == paths[i].name
        assert (answers[i]["heatmap"] or "").startswith("data:image/png") == bool(i % 2)
        assert_same_prediction(
            answers[i], {**expected, "path": paths[i].name, "heatmap": answers[i]["heatmap"]}
        )


def test_micro_batcher_groups_waits_and_isolates_failures() -> None:
    calls: list[int] = []

    def predict(images):
        calls.append(len(images))
        if any(int(image[0, 0]) == 13 for image in images):
            raise ValueError("unlucky scan")
        return [int(image[0, 0]) for image in images]

    images = [np.full((2, 2), v, np.uint8) for v in range(5)]
    # Every batch here closes because it is full, never on the clock (the minute is a backstop),
    # so the grouping is the same on a loaded machine.
    batcher = MicroBatcher(predict, max_batch=2, max_wait=60)
    batcher.start()
    futures = batcher.submit(images[:4])
    assert [f.result(30) for f in futures] == [0, 1, 2, 3]
    assert calls == [2, 2]
    calls.clear()
    batcher.max_batch = 4  # two requests of two scans each: one model call
    mixed = batcher.submit(images[:2]) + batcher.submit([np.full((2, 2), 13, np.uint8), images[3]])
    assert mixed[0].result(5) == 0 and mixed[1].result(5) == 1 and mixed[3].result(5) == 3
    with pytest.raises(ValueError, match="unlucky"):
        mixed[2].result(5)
    assert calls == [4, 1, 1, 1, 1]  # the failed batch of both requests, then each scan alone
    assert batcher.stats.to_json() == {"batches": 5, "images": 7, "largest": 2, "mean": 1.4}
    batcher.max_batch = 3
    gone = batcher.submit([images[2]] * 3)
    gone[1].cancel()  # its request went away while it was queued
    assert [gone[0].result(5), gone[2].result(5)] == [2, 2] and batcher.running
    late = batcher.submit([images[1]])
    batcher.close()
    assert late[0].result(0) == 1 and not batcher.running
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit(images)


def test_a_lone_request_waits_at_most_max_wait() -> None:
    """Read on the waits the worker asks for, not on a clock: each is at most max_wait, and the
    lone request is answered when they run out."""
    batcher = MicroBatcher(lambda images: list(range(len(images))), max_batch=16, max_wait=0.05)
    waits: list[float | None] = []
    get = batcher._queue.get

    def recorded(block: bool = True, timeout: float | None = None):
        waits.append(timeout)
        return get(block, timeout)

    batcher._queue.get = recorded
    batcher.start()
    assert batcher.submit([np.zeros((2, 2), np.uint8)])[0].result(30) == 0
    batcher.close()
    timed = [w for w in waits if w is not None]  # the worker's idle wait for a first scan has none
    assert timed and all(0 <= w <= 0.05 for w in timed)


def test_serve_command_errors_are_one_line(served, tmp_path: Path, capsys) -> None:
    out, _ = served
    empty = tmp_path / "token"
    empty.write_text("  \n")
    cases = [
        (["--token-file", str(empty)], "must hold one token"),
        (["--token-file", str(tmp_path / "missing")], "token file not found"),
        (["--keep-uploads", str(empty)], "is an existing file"),
        (["--host", "203.0.113.1"], "cannot listen on 203.0.113.1:8000"),
    ]
    for extra, message in cases:
        assert main(["serve", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["serve", str(out), "--max-files", "0"])
    assert "must be >= 1" in capsys.readouterr().err
