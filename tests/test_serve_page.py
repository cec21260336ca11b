"""The page at ``/`` in a real headless browser (Playwright driving Debian's chromium): upload an image and see
the streamed answer, draw images into the grid, see the error line of a refused request. Screenshots of each step
go to the test's temporary folder (and /tmp/serve_shots/)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

import omnicore

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/serve_shots")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _needs(ok: bool, what: str) -> None:
    """.ci/run installs both: missing there is a failure; elsewhere the test is skipped."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; .ci/run installs it")
        pytest.skip(f"{what} is missing")


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the serve extra installs it
    sync_playwright = None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _needs(sync_playwright is not None, "the playwright package (the serve extra)")
    _needs(CHROMIUM.exists(), str(CHROMIUM) + " (apt-get install chromium)")
    from test_serve import Server, save_tiny_model

    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("page")
    model_dir = save_tiny_model(root / "tiny")
    srv = Server(model_dir, log=root / "server.log")
    try:
        srv.wait_ready()
        yield srv, omnicore.load(model_dir, device="cpu")
    finally:
        srv.stop()
        torch.set_num_threads(kept)


@pytest.fixture
def page(served, tmp_path):
    srv, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 800})
            pg.goto(srv.url + "/")
            expect(pg.locator("#status")).to_contain_text("ready", timeout=30_000)
            yield pg
        finally:
            browser.close()


def shot(pg, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    pg.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(exist_ok=True)
    shutil.copyfile(path, SHOTS / name)


def test_upload_an_image_ask_and_see_the_answer_stream_in(page, served, tmp_path):
    _, pipe = served
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=2, image_size=32)
    image = ds[1]["image"]
    image.save(tmp_path / "shape.png")
    question = "What color is the shape?"
    expected = "".join(pipe.stream_answer(image, question, max_new_tokens=24, temperature=0.0))
    page.set_input_files("#file", str(tmp_path / "shape.png"))
    expect(page.locator("#preview")).to_be_visible()
    # count how often the answer's text changes while it arrives
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('log'),
                                                             {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#question", question)
    page.fill("#max-tokens", "24")
    page.click("#send")
    answer = page.locator(".msg.assistant.done")
    expect(answer).to_have_count(1, timeout=30_000)
    assert answer.locator("span").text_content() == expected
    assert page.evaluate("window.updates") >= 3  # the user's bubble, the empty answer, then pieces as they came
    assert page.locator(".msg.user img").count() == 1
    expect(page.locator("#error")).to_be_hidden()
    shot(page, tmp_path, "chat.png")


def test_drag_and_drop_sets_the_image(page, tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    page.evaluate("""(data) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'red.png', {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", data)
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#drop-text")).to_have_text("red.png")


def test_generate_images_and_see_them_in_the_grid(page, served, tmp_path):
    from PIL import Image

    _, pipe = served
    prompt = "a green square on the right"
    page.fill("#prompt", prompt)
    page.fill("#n", "4")
    page.fill("#guidance", "3")
    page.fill("#seed", "5")
    page.click("#generate")
    grid = page.locator("#grid img")
    expect(grid).to_have_count(4, timeout=30_000)
    shown = [grid.nth(i).get_attribute("src") for i in range(4)]
    got = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).convert("RGB").tobytes() for s in shown]
    ref = pipe.generate_images([prompt], n_per_prompt=4, guidance_scale=3.0, seed=5)
    assert got == [im.tobytes() for im in ref]
    assert all(grid.nth(i).bounding_box()["width"] >= 100 for i in range(4))  # drawn large enough to see
    shot(page, tmp_path, "images.png")


def test_a_refused_request_shows_the_error_line(page, tmp_path):
    page.fill("#prompt", "a red circle")
    page.fill("#n", "99")
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("n: must be at most 16")
    shot(page, tmp_path, "error.png")
    page.fill("#n", "1")  # the next request clears it
    page.click("#generate")
    expect(page.locator("#grid img")).to_have_count(1, timeout=30_000)
    expect(error).to_be_hidden()
