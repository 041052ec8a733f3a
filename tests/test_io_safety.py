"""What a real export and a real machine bring, as a user meets it: compressed TIFF volumes,
file names that are not UTF-8, input files that are not UTF-8 text or are directories, a full
disk, a port out of range, links to nothing, and the service's HTTP manners (507, nosniff, HEAD,
the token on /openapi.json).

Every data root is a copy of the synthetic data, hashed before and after.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import FAST, fast_config, tree_digest
from fastapi.testclient import TestClient

from savlt.cli import main
from savlt.engine.loaded import Run, load_run
from savlt.engine.training import train
from savlt.io import MANIFEST_NAME
from savlt.serve import Limits, ServeOptions, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [arg for setting in FAST for arg in ("--set", setting)]
LATIN1 = b"caf\xe9.png"  # "café.png" as a Latin-1 system writes it: not UTF-8
LATIN1_TEXT = "caf\\xe9.png"  # how SAVLT writes that name (docs/data.md, "File names that are not UTF-8")
MIXED_LATIN1 = b"m\xe9lange.png"  # one in the training center too: it goes through split.json
VOLUMES = {  # center -> (file, compression, tiles): volumes as scanners export them
    "xiangya": ("vol_lzw.tif", "lzw", None),
    "huaxi": ("vol_jpeg.tif", "jpeg", (32, 32)),
}
TOKEN = "t0ken"


def volume_of(scans: list[Path], compression: str, tile: tuple[int, int] | None) -> bytes:
    """A 3-page TIFF volume of `scans` (8-bit for JPEG, as stored otherwise)."""
    pages = [np.asarray(tifffile.imread(p)) if p.suffix == ".tif" else _gray(p) for p in scans]
    if compression == "jpeg":
        pages = [
            (p / max(int(p.max()), 1) * 255).astype(np.uint8) if p.dtype != np.uint8 else p for p in pages
        ]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.stack(pages), compression=compression, tile=tile, photometric="minisblack")
    return buffer.getvalue()


def _gray(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


@pytest.fixture(scope="module")
def hospital(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the synthetic data with a scan named in Latin-1 bytes in two centers and an
    LZW volume (strips) and a JPEG volume (tiles) in the external centers."""
    root = tmp_path_factory.mktemp("hospital") / "data"
    shutil.copytree(synth_root, root)
    cyst = sorted((root / "mixed" / "images" / "cyst").iterdir())[0]
    shutil.copyfile(cyst, os.path.join(os.fsencode(root / "mixed" / "images" / "cyst"), MIXED_LATIN1))
    shutil.copyfile(cyst, os.path.join(os.fsencode(root / "huaxi" / "images" / "cancer"), LATIN1))
    for center, (name, compression, tile) in VOLUMES.items():
        folder = root / center / "images" / "cancer"
        (folder / name).write_bytes(volume_of(sorted(folder.iterdir())[:3], compression, tile))
    return root


@pytest.fixture(scope="module")
def trained(hospital: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict]:
    """`savlt train` on the hospital copy: (exit status, run folder, the data tree's hashes before)."""
    before = tree_digest(hospital)
    out = tmp_path_factory.mktemp("runs") / "run"
    cache = ["--set", f"data.cache_dir={hospital.parent / 'cache'}"]
    status = main(["train", "--data", str(hospital), "--out", str(out), "-q", *SETTINGS, *cache])
    return status, out, before


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:  # strict UTF-8: it must be UTF-8
        return list(csv.DictReader(handle))


def names(rows: list[dict[str, str]]) -> list[str]:
    return [row["path"].rpartition("/")[2] for row in rows]


# ---------------------------------------------------------------- non-UTF-8 names and volumes


def test_train_and_evaluate_write_a_latin1_name_and_every_page_of_compressed_volumes(
    trained, hospital: Path, capsys
) -> None:
    status, out, before = trained
    assert status == 0
    for folder in (out, out / "evaluation"):
        if folder != out:
            assert main(["evaluate", str(out), "-q"]) == 0
        huaxi = names(read_rows(folder / "predictions" / "huaxi.csv"))
        assert LATIN1_TEXT in huaxi
        assert [n for n in huaxi if n.startswith("vol_jpeg")] == [f"vol_jpeg.tif#{i}" for i in range(3)]
        xiangya = names(read_rows(folder / "predictions" / "xiangya.csv"))
        assert [n for n in xiangya if n.startswith("vol_lzw")] == [f"vol_lzw.tif#{i}" for i in range(3)]
        for text_file in (folder / "metrics.json", folder / "report.md"):
            text_file.read_text(encoding="utf-8")
    split = (out / "split.json").read_text(encoding="utf-8")  # read back by evaluate, above
    assert "images/cyst/m\\\\xe9lange.png" in split and "\\udc" not in split
    assert "\\udc" not in (out / "train.log").read_text(encoding="utf-8")
    assert tree_digest(hospital) == before


def test_predict_writes_the_same_names_in_the_table_json_and_csv(
    trained, hospital: Path, tmp_path: Path, capsys
) -> None:
    _, out, _ = trained
    latin1 = Path(os.fsdecode(os.path.join(os.fsencode(hospital / "huaxi" / "images" / "cancer"), LATIN1)))
    volume = hospital / "xiangya" / "images" / "cancer" / "vol_lzw.tif"
    assert (
        main(
            ["predict", str(out), str(latin1), str(volume), "--json", "-q", "--csv", str(tmp_path / "p.csv")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "\\udc" not in printed
    got = [Path(p["path"]).name for p in json.loads(printed)]
    assert got == [LATIN1_TEXT, "vol_lzw.tif#0", "vol_lzw.tif#1", "vol_lzw.tif#2"]
    assert names(read_rows(tmp_path / "p.csv")) == got
    assert main(["predict", str(out), str(latin1), "-q"]) == 0
    assert LATIN1_TEXT in capsys.readouterr().out


def multipart(*files: tuple[bytes, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body naming each file by its raw bytes (as a Latin-1 system sends them)."""
    boundary = b"savlt-boundary-7f3a"
    body = b""
    for name, data in files:
        body += (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="files"; filename="'
            + name
            + b'"\r\n'
        )
        body += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=" + boundary.decode()}


@pytest.fixture(scope="module")
def served(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """A run trained on the synthetic data as it is (internal test split only), and it loaded."""
    out = tmp_path_factory.mktemp("served") / "run"
    train(fast_config(synth_root, "data.test_centers=[]"), out, progress=False)
    return out, load_run(out)


@pytest.fixture(scope="module")
def run(served) -> Run:
    return served[1]


def client_for(run, **options) -> TestClient:
    return TestClient(create_app(run, ServeOptions(**options)))


@pytest.mark.parametrize(
    ("compression", "tile"),
    [("zlib", None), ("lzw", None), ("jpeg", None), ("zlib", (32, 32)), ("lzw", (32, 32))],
)
def test_the_service_predicts_every_page_of_a_compressed_volume_as_predict_does(
    served, hospital: Path, tmp_path: Path, capsys, compression: str, tile
) -> None:
    out, run = served
    scans = sorted((hospital / "mixed" / "images" / "cancer").glob("*.png"))[:3]
    volume = tmp_path / f"{compression}.tif"
    volume.write_bytes(volume_of(scans, compression, tile))
    assert main(["predict", str(out), str(volume), "--json", "-q"]) == 0
    expected = json.loads(capsys.readouterr().out)
    with client_for(run) as client:
        body, headers = multipart((volume.name.encode(), volume.read_bytes()))
        response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 200
    got = response.json()["predictions"]
    assert [g["path"] for g in got] == [f"{volume.name}#{i}" for i in range(3)]
    for g, e in zip(got, expected, strict=True):
        assert g["predicted"] == e["predicted"]
        assert g["high_risk_probability"] == pytest.approx(e["high_risk_probability"], abs=1e-5)


def test_the_pixel_limit_counts_every_page_of_a_compressed_volume(run, hospital: Path) -> None:
    scans = sorted((hospital / "mixed" / "images" / "cancer").glob("*.png"))[:3]
    data = volume_of(scans, "zlib", None)
    height, width = _gray(scans[0]).shape
    with client_for(run, limits=Limits(max_pixels=height * width, max_files=2)) as client:
        body, headers = multipart((b"vol.tif", data))
        response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 413
    assert response.json()["files"][0]["file"] == "vol.tif#2"  # the third page is one too many


def test_the_service_answers_a_latin1_name_as_predict_writes_it(run, hospital: Path) -> None:
    data = sorted((hospital / "mixed" / "images" / "cyst").glob("*.png"))[0].read_bytes()
    with client_for(run) as client:
        body, headers = multipart((LATIN1, data))
        response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 200
    assert [p["path"] for p in response.json()["predictions"]] == [LATIN1_TEXT]


# ---------------------------------------------------------------- input files that are not text


def _not_utf8(path: Path) -> Path:
    path.write_bytes(b"# r\xe9glages\ntrain:\n  shots: 4\n")
    return path


def test_input_files_that_are_not_utf8_or_are_directories_are_one_line_errors(
    hospital: Path, tmp_path: Path, capsys
) -> None:
    before = tree_digest(hospital)
    latin1 = _not_utf8(tmp_path / "latin1.yaml")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    out = ["--out", str(tmp_path / "run"), *SETTINGS, "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    cases = [
        (
            ["data", "check", str(hospital), "-q", "--config", str(latin1)],
            f"config file {latin1} is not UTF-8",
        ),
        (
            ["data", "check", str(hospital), "-q", "--config", str(folder)],
            f"config file {folder} is a directory",
        ),
        (["sweep", str(latin1), "--out", str(tmp_path / "sweep")], f"sweep file {latin1} is not UTF-8"),
        (["sweep", str(folder), "--out", str(tmp_path / "sweep")], f"sweep file {folder} is a directory"),
        (
            ["train", "--data", str(hospital), *out, "--set", f"data.split_file={latin1}"],
            f"split file {latin1} is not UTF-8",
        ),
        (
            ["train", "--data", str(hospital), *out, "--set", f"data.split_file={folder}"],
            f"split file {folder} is a directory",
        ),
        (["serve", str(tmp_path), "--token-file", str(latin1)], f"token file {latin1} is not UTF-8"),
        (["serve", str(tmp_path), "--token-file", str(folder)], f"token file {folder} is a directory"),
        (
            ["pretrain", str(latin1.with_suffix(".csv")), "--model", "tiny", "--out", str(tmp_path / "pre")],
            f"pairs file {latin1.with_suffix('.csv')} is not UTF-8",
        ),
    ]
    latin1.with_suffix(".csv").write_bytes(b"file,text\nimages/a.png,l\xe9sion\n")
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert "is not UTF-8 text (byte 0xe9" in err
    assert tree_digest(hospital) == before


def test_a_metadata_csv_that_is_not_utf8_is_named_by_data_check(
    hospital: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "data"
    shutil.copytree(hospital / "xiangya", root / "xiangya")
    (root / "xiangya" / "metadata.csv").write_bytes(b"file,patient\nimages/cancer/a.tif,Jos\xe9\n")
    assert main(["data", "check", str(root), "-q"]) == 1
    assert f"metadata file {root / 'xiangya' / 'metadata.csv'} is not UTF-8 text" in capsys.readouterr().out


# ---------------------------------------------------------------- a full disk


def full_disk(monkeypatch, folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Make every file opened for writing in `folder` (except names containing one of `keep`)
    fail as a full disk does: the lowest write point every SAVLT writer and pathlib go through,
    ``io.open``, raises OSError(ENOSPC) without a file name, as a failing write() does."""
    real_open = io.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax"):
            path = Path(file)
            if path.parent == folder and not any(k in path.name for k in keep):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_on_full_disk)


def test_a_disk_full_when_training_ends_is_one_line_naming_the_file(
    hospital: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    before = tree_digest(hospital)
    out = tmp_path / "run"
    early = (
        ".savlt.lock",
        MANIFEST_NAME,
        "config.yaml",
        "split.json",
        "fewshot.json",
        "history.jsonl",
        "train.log",
    )
    full_disk(monkeypatch, out, keep=early)  # full from the end of training on
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "--data", str(hospital), "--out", str(out), "-q", *SETTINGS, *cache]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert f"cannot write {out / 'adapter.safetensors'}: no space left on the device" in last
    assert "Traceback" not in err
    assert not any(p.name.startswith(".adapter") or p.name == "adapter.safetensors" for p in out.iterdir())
    assert tree_digest(hospital) == before


def test_a_full_disk_for_kept_uploads_answers_507(run, hospital: Path, tmp_path: Path, monkeypatch) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    full_disk(monkeypatch, kept)
    data = sorted((hospital / "mixed" / "images" / "cyst").glob("*.png"))[0].read_bytes()
    with client_for(run, keep_uploads=kept) as client:
        body, headers = multipart((b"scan.png", data))
        response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 507
    assert "no space left" in response.json()["error"] and "scan.png" in response.json()["error"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert list(kept.iterdir()) == []


# ---------------------------------------------------------------- the service's manners and port


def test_serve_refuses_a_port_out_of_range(tmp_path: Path, capsys) -> None:
    for port in ("70000", "-1"):
        with pytest.raises(SystemExit) as stop:
            main(["serve", str(tmp_path), "--port", port])
        assert stop.value.code == 2
        assert (
            f"argument --port: must be 0 to 65535 (0: any free port), got {port}" in capsys.readouterr().err
        )


def test_head_nosniff_and_the_token_on_openapi(run) -> None:
    with client_for(run, token=TOKEN) as client:
        page = client.get("/")
        head = client.head("/")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == page.headers["content-length"]
        assert client.get("/openapi.json").status_code == 401
        spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert spec.status_code == 200 and "/predict" in spec.json()["paths"]
        answers = [
            page,
            head,
            spec,
            client.get("/health"),
            client.get("/model"),
            client.get("/static/app.js"),
        ]
        answers.append(client.post("/predict", headers={"Authorization": f"Bearer {TOKEN}"}))
        for answer in answers:
            assert answer.headers["x-content-type-options"] == "nosniff", answer.url
    with client_for(run) as client:
        assert client.get("/openapi.json").status_code == 200  # no token set: open, as the API is


# ---------------------------------------------------------------- links to nothing


def test_a_link_to_nothing_is_a_problem_for_data_check_and_a_warning_for_train(
    hospital: Path, tmp_path: Path, capsys, caplog
) -> None:
    root = tmp_path / "data"
    shutil.copytree(hospital, root, symlinks=True)
    link = root / "huaxi" / "images" / "cancer" / "on_the_nas.png"
    link.symlink_to(tmp_path / "unmounted" / "scan.png")
    center = root / "beijing"
    center.symlink_to(tmp_path / "unmounted" / "beijing")
    before = tree_digest(root)
    assert main(["data", "check", str(root), "-q"]) == 1
    printed = capsys.readouterr().out
    for path in (link, center):
        assert f"[broken_link] {path} is a symbolic link to" in printed
    settings = [*SETTINGS, "--set", "train.max_steps=1", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "-q", *settings]) == 0
    assert "2 symbolic link(s) to nothing, not used" in caplog.text
    assert tree_digest(root) == before
