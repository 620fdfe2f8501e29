"""``excelseg app`` in a real browser: headless Chromium (the system's ``chromium`` package) driven by Playwright's
Python API. The page is started the way a user starts it — ``excelseg app`` in its own process, offline with no
``--clip``, so it falls back to the shipped synthetic CLIP — on a free loopback port.

The test uploads a generated scene, types its class names, runs, and checks the legend (an HTML list with one
``data-class`` per present class) and the downloadable palette PNG; changes only the class names and checks the
time display says the image tower was cached; uploads a non-image and checks the message; then checks the next
request still works. A screenshot goes to the test's tmp dir (and, with ``EXCELSEG_APP_SCREENSHOT=PATH``, a
compact copy of the result screen to PATH — how ``docs/app.png`` is made).

Without Chromium or Playwright the test is skipped with the command that installs them — except under CI
(``CI`` set), where it fails: CI must run it.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from excelseg.app import EXAMPLE_SEED, EXAMPLE_SIDE, app_process
from excelseg.synthetic import SceneGenerator

SCENE = 30  # example-seed scene whose three classes the shipped synthetic CLIP finds (5.5, 6.5, 3.5 % of the pixels)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT = 180  # seconds for the app process to import, load the CLIP and serve the page
RESULT_TIMEOUT = 60_000  # ms for one request to come back into the page
INSTALL = ("install them with: apt-get install -y chromium (as root) and pip install playwright gradio "
           "(or pip install -e '.[dev]'); then run: pytest tests/test_app_browser.py")


def _requirements() -> tuple[object, str]:
    """Playwright's sync API and the system browser, or skip (fail under CI) saying how to install them."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("playwright (Python package)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing.append("gradio (Python package)")
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    if browser is None:
        missing.append("Chromium (system package 'chromium')")
    if missing:
        message = f"browser test needs {', '.join(missing)}; {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser test must run: {message}")
        pytest.skip(message)
    return sync_playwright, browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``excelseg app`` in a child process, offline, with no --clip; yields its URL."""
    _requirements()
    try:
        with app_process([], tmp_path_factory.mktemp("home"), timeout=START_TIMEOUT) as (_, url):
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _upload(page, path: Path) -> None:
    """Put a file into the image input and wait until the page shows it (uploaded to the server)."""
    page.locator("#image-input input[type=file]").set_input_files(str(path))
    page.wait_for_function("([name]) => [...document.querySelectorAll('#image-input img')]"
                           ".some(i => decodeURIComponent(i.src).endsWith('/' + name))",
                           arg=[path.name], timeout=RESULT_TIMEOUT)


def _legend(page) -> list[str]:
    return page.eval_on_selector_all("#excelseg-legend li[data-class]", "els => els.map(e => e.dataset.class)")


def _run_and_wait(page, expect_in_status: str) -> str:
    """Press Segment and wait until the status line says ``expect_in_status`` (it changes on every request)."""
    page.evaluate("() => { const s = document.querySelector('#status'); if (s) s.dataset.seen = s.innerText; }")
    page.click("#run")
    page.wait_for_function(
        "([want]) => { const s = document.querySelector('#status'); return s && s.innerText.includes(want) "
        "&& (s.dataset.seen === undefined || s.innerText !== s.dataset.seen || want === '') }",
        arg=[expect_in_status], timeout=RESULT_TIMEOUT)
    return page.inner_text("#status")


def _save_docs_screenshot(png: bytes, target: str) -> None:
    """A compact copy of the result screen (≤ 960 px wide, 96-colour palette: < 200 kB) for docs/app.md."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width > 960:
        img = img.resize((960, round(img.height * 960 / img.width)), Image.LANCZOS)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(target, optimize=True)


def test_page_in_a_real_browser(server, tmp_path):
    sync_playwright, browser_path = _requirements()
    scene = SceneGenerator(size=EXAMPLE_SIDE, seed=EXAMPLE_SEED).scene(SCENE)
    names = list(scene.names)
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("#run", timeout=RESULT_TIMEOUT)
            header = page.inner_text("#excelseg-header")
            assert "only know the 16 synthetic classes" in header and "--clip ViT-B-16" in header

            # a generated scene and its class names: the legend lists exactly those classes
            _upload(page, image)
            page.locator("#classes textarea").fill(", ".join(names))
            status = _run_and_wait(page, "classes found")
            assert f"{len(names)} of {len(names)} classes found" in status
            page.wait_for_selector("#overlay img", timeout=RESULT_TIMEOUT)
            assert _legend(page) == names
            timing = page.inner_text("#timing")
            assert "image tower: " in timing and "cached" not in timing
            assert page.locator("#heatmaps img").count() >= len(names)

            # the downloadable palette PNG has the image's size
            href = page.get_attribute("#download-png a[download]", "href")
            assert href and href.endswith("_labels.png")
            png = Image.open(io.BytesIO(page.request.get(href).body()))
            assert png.size == (EXAMPLE_SIDE, EXAMPLE_SIDE) and png.mode == "P"
            shot = page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            if os.environ.get("EXCELSEG_APP_SCREENSHOT"):
                _save_docs_screenshot(shot, os.environ["EXCELSEG_APP_SCREENSHOT"])

            # only the class names change: the image tower is not run again
            page.locator("#classes textarea").fill(names[0])
            _run_and_wait(page, "1 of 1 classes found")
            assert "image tower: cached" in page.inner_text("#timing")
            assert _legend(page) == names[:1]

            # a non-image with an image name reaches excelseg's reader: a readable message, no result
            notes = tmp_path / "notes.png"
            notes.write_text("meeting notes, not pixels")
            _upload(page, notes)
            status = _run_and_wait(page, "Error")
            assert "cannot read image notes.png: not an image" in status
            assert _legend(page) == []
            # a file the browser knows is no image is refused before upload, with Gradio's message
            text = tmp_path / "notes.txt"
            text.write_text("more notes")
            page.locator("#image-input input[type=file]").set_input_files(str(text))
            page.get_by_text("Invalid file type").first.wait_for(timeout=RESULT_TIMEOUT)
            page.screenshot(path=str(tmp_path / "app_error.png"), full_page=True)

            # and the next request works
            _upload(page, image)
            page.locator("#classes textarea").fill(", ".join(names))
            _run_and_wait(page, f"{len(names)} of {len(names)} classes found")
            assert _legend(page) == names
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
