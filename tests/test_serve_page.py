"""``savlt serve`` started as a user starts it, and its review page in a real browser: Debian's
Chromium, headless, driven by Playwright (pointed at the system browser; nothing is downloaded).

Without Chromium (``apt-get install chromium``; ``make test`` installs it when run as root) the
browser test is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import fast_config
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from savlt.engine.training import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "page-token-42"


@pytest.fixture(scope="module")
def server(synth_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread):
    """`savlt serve RUN --port 0 --token-file F` in its own process: (base URL, process). A
    sensitivity target of 0.1 puts the referral threshold at the validation draw's riskiest
    high-risk scan, above some scans predicted high-risk."""
    folder = tmp_path_factory.mktemp("served")
    cfg = fast_config(synth_root, "data.test_centers=[]", "eval.target_sensitivity=0.1")
    train(cfg, folder / "run", progress=False)
    (folder / "token").write_text(TOKEN + "\n")
    command = [sys.executable, "-m", "savlt.cli", "serve", str(folder / "run"), "--port", "0"]
    command += ["--token-file", str(folder / "token"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if select.select([process.stdout], [], [], 1.0)[0]:
                lines.append(process.stdout.readline())
                found = re.search(r"at (http://127\.0\.0\.1:\d+/)", lines[-1])
                if found:
                    yield found[1], process
                    break
        else:
            pytest.fail("savlt serve did not start:\n" + "".join(lines))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def test_the_served_api_over_http(server, synth_root: Path) -> None:
    url, process = server
    scan = sorted((synth_root / "mixed" / "images" / "cyst").iterdir())[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("health").json()["status"] == "ready"
        assert client.get("model").status_code == 401
        assert client.get("model", headers=auth).json()["backbone"] == "tiny"
        files = [("files", (scan.name, scan.read_bytes()))]
        assert client.post("predict", files=files).status_code == 401
        answer = client.post("predict", files=files, headers=auth).json()["predictions"][0]
        assert answer["path"] == scan.name and answer["predicted"] is not None
        bad = client.post("predict", files=[("files", ("x.png", b"no"))], headers=auth)
        assert bad.status_code == 415 and "x.png" in bad.json()["error"]
        assert client.get("health").json()["status"] == "ready" and process.poll() is None


def test_the_review_page_in_chromium(server, chromium: str, synth_root: Path, tmp_path: Path) -> None:
    url, _ = server
    cancer = sorted((synth_root / "huaxi" / "images" / "cancer").iterdir())[0]
    cyst = sorted((synth_root / "mixed" / "images" / "cyst").iterdir())[0]
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((96, 128), 90, np.uint8)).save(flat)
    notes = tmp_path / "notes.png"
    notes.write_text("not a scan")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    model = httpx.get(url + "model", headers=auth).json()
    files = [("files", (p.name, p.read_bytes())) for p in (cancer, cyst)]
    expected = httpx.post(url + "predict", files=files, headers=auth, timeout=30).json()["predictions"]
    candidates = sorted((synth_root / "mixed" / "images").rglob("*.png"))
    answers = []
    for start in range(0, len(candidates), 16):  # the service's --max-files
        files = [("files", (p.name, p.read_bytes())) for p in candidates[start : start + 16]]
        answers += httpx.post(url + "predict", files=files, headers=auth, timeout=60).json()["predictions"]
    contradicting = next(
        path
        for path, a in zip(candidates, answers, strict=True)
        if a["predicted"] in model["high_risk"] and a["high_risk_probability"] < a["referral_threshold"]
    )

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("request", lambda r: r.url.startswith((url, "data:", "blob:")) or problems.append(r.url))
        page.goto(url)

        expect(page.locator("#token-panel")).to_be_visible()  # the page loads without the token
        page.locator("#token-input").fill(TOKEN)
        page.keyboard.press("Enter")
        expect(page.locator("#summary")).to_be_visible()
        expect(page.locator("#summary-facts")).to_contain_text("savlt")
        expect(page.locator("#center-table tbody tr")).to_have_count(len(model["centers"]))
        expect(page.locator("#pick")).to_be_enabled()

        page.locator("#file-input").set_input_files([cancer, cyst, flat, notes])
        for path, answer in zip((cancer, cyst), expected, strict=True):
            card = page.locator(f'.card[data-file="{path.name}"]')
            expect(card).to_have_attribute("data-state", "done", timeout=30_000)
            top = answer["probabilities"][answer["predicted"]]
            assert card.locator(".predicted-class").inner_text() == model["labels"][answer["predicted"]]
            assert card.locator(".predicted-probability").inner_text() == f"{100 * top:.1f} %"
            risk = card.locator(".risk-text").inner_text()
            assert f"{100 * answer['high_risk_probability']:.1f} %" in risk
            assert risk.startswith("Refer:" if answer["referral"] == "refer" else "No referral:")
            if answer["referral_threshold"] is not None:
                assert "referral threshold" in risk
            expect(card.locator(".probabilities li")).to_have_count(len(model["classes"]))
            box = card.locator(".roi-box").bounding_box()
            assert box is not None and box["width"] > 10 and box["height"] > 10

        card = page.locator(f'.card[data-file="{cancer.name}"]')
        toggle = card.locator(".toggle-heatmap")
        expect(card.locator(".heatmap-image")).to_be_hidden()
        toggle.focus()
        page.keyboard.press("Enter")  # the heat map, by keyboard
        expect(toggle).to_have_attribute("aria-pressed", "true")
        expect(card.locator(".heatmap-image")).to_be_visible()
        expect(card.locator(".scan-frame")).to_be_hidden()
        assert card.locator(".heatmap-image").evaluate("img => img.naturalWidth") > 0
        page.keyboard.press("Space")
        expect(card.locator(".scan-frame")).to_be_visible()
        page.keyboard.press("Space")

        flat_card = page.locator('.card[data-file="flat.png"]')
        expect(flat_card).to_have_attribute("data-state", "unassessable")
        expect(flat_card.locator(".card-status")).to_contain_text("Not assessable")
        notes_card = page.locator('.card[data-file="notes.png"]')
        expect(notes_card).to_have_attribute("data-state", "error")
        expect(notes_card.locator(".card-status")).to_contain_text("notes.png: not a recognised image format")

        # a scan predicted high-risk below the referral threshold: referred, and the page says so
        page.locator("#file-input").set_input_files([contradicting])
        card = page.locator(f'.card[data-file="{contradicting.name}"]')
        expect(card).to_have_attribute("data-state", "done", timeout=30_000)
        expect(card.locator(".risk-text")).to_contain_text("Refer:")
        expect(card.locator(".risk-text")).to_contain_text("below the referral threshold")
        expect(card.locator(".risk-text")).to_contain_text("but the predicted class is high-risk")
        expect(card.locator(".risk-text")).to_have_class(re.compile("positive"))
        expect(page.locator(".research-use")).to_contain_text("not a medical device")

        page.locator("body").click(position={"x": 5, "y": 5})
        reached = []
        for _ in range(12):  # the file picker is reachable with the Tab key
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.id"))
        assert "pick" in reached, reached
        for width in (1366, 1024):  # a laptop's width: nothing runs off the side
            page.set_viewport_size({"width": width, "height": 900})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        page.set_viewport_size({"width": 1366, "height": 900})
        page.evaluate("document.activeElement.blur()")
        shot = Path(os.environ.get("SAVLT_SCREENSHOT") or tmp_path / "review_page.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        browser.close()
    assert not problems, problems  # no script error, nothing asked of another host
