"""The web page in a real headless Chromium (Debian's), driven by Playwright, against a real server."""

from pathlib import Path

import httpx
import pytest
from PIL import Image

from model.synthetic import SPLITS, render
from tests.deploy.tools import tool
from tests.service.server import REPO, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ARTIFACTS = REPO / "runs" / "artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("page"), "--max-batch-size", "2") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=tool("chromium"), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.png"
    Image.fromarray(render(SPLITS["test"] + 5, 320)[0]).save(path)
    return path


def test_upload_draws_what_the_api_answers(server, browser, tmp_path):
    image = sample(tmp_path)
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(server.url + "/")
    assert page.title() == "AKConv detector"
    page.set_input_files("#file", str(image))
    page.fill("#conf", "0.25")
    page.dispatch_event("#conf", "input")
    page.click("#detect")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)

    expected = httpx.post(server.url + "/detect", params={"conf": 0.25}, files={"file": image.read_bytes()}).json()
    rows = page.locator("#detections tbody tr")
    assert rows.count() == len(expected["detections"]) > 0
    for i, detection in enumerate(expected["detections"]):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[0].strip() == detection["class_name"]
        assert cells[1] == f"{detection['confidence']:.2f}"
    drawn = page.eval_on_selector("#canvas", "c => JSON.parse(c.dataset.boxes)")
    assert [d["class_id"] for d in drawn] == [d["class_id"] for d in expected["detections"]]
    for box, detection in zip(drawn, expected["detections"], strict=True):
        assert box["box"] == pytest.approx(list(detection["box"].values()), abs=0.01)
    assert page.eval_on_selector("#canvas", "c => [c.width, c.height]") == [320, 320]
    assert "detection(s)" in page.inner_text("#status")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
    page.close()


def test_keyboard_and_narrow_screen(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(server.url + "/")
    page.set_input_files("#file", str(sample(tmp_path)))
    stops = []
    for _ in range(4):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.id"))
    assert stops == ["drop", "conf", "api-key", "detect"], "every control is reachable in order by keyboard"
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no horizontal scrolling"
    page.close()


def test_errors_are_shown(server, browser, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.set_input_files("#file", str(bad))
    page.click("#detect")
    page.wait_for_selector("body[data-state=error]", timeout=60_000)
    assert "unsupported_media_type" in page.inner_text("#status")
    page.close()


def test_page_needs_nothing_from_outside(server):
    html = httpx.get(server.url + "/").text
    assert "http://" not in html.replace("http://127.0.0.1", "") and "https://" not in html
    assert "<script src" not in html and "<link" not in html


def detect_on_page(page, image: Path, conf: str = "0.25") -> None:
    page.set_input_files("#file", str(image))
    page.fill("#conf", conf)
    page.dispatch_event("#conf", "input")
    page.click("#detect")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)


def test_the_page_names_the_model_and_its_classes(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    assert "triangle, star" in page.inner_text("#model")
    page.close()


def test_the_slider_refilters_without_a_new_request(server, browser, tmp_path):
    image = sample(tmp_path)
    page = browser.new_page()
    page.goto(server.url + "/")
    detect_on_page(page, image, "0.05")
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    for conf in (0.5, 0.05):
        page.fill("#conf", str(conf))
        page.dispatch_event("#conf", "input")
        expected = httpx.post(server.url + "/detect", params={"conf": conf}, files={"file": image.read_bytes()})
        assert page.locator("#detections tbody tr").count() == len(expected.json()["detections"])
    assert requests == [], "filtering happens in the page"
    page.close()


def test_a_new_file_or_an_error_clears_the_old_results(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/")
    detect_on_page(page, sample(tmp_path))
    assert page.locator("#detections tbody tr").count() > 0
    other = tmp_path / "other.png"
    Image.new("RGB", (200, 100), (30, 60, 90)).save(other)
    page.set_input_files("#file", str(other))
    page.wait_for_function("document.getElementById('canvas').width === 200")
    assert page.locator("#detections tbody tr").count() == 0 and page.inner_text("#status") == ""
    assert page.eval_on_selector("#canvas", "c => JSON.parse(c.dataset.boxes)") == []
    detect_on_page(page, sample(tmp_path))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    page.set_input_files("#file", str(bad))
    page.click("#detect")
    page.wait_for_selector("body[data-state=error]", timeout=60_000)
    assert page.locator("#detections tbody tr").count() == 0 and page.locator("#timings dt").count() == 0
    page.close()


def test_try_a_sample_detects_the_bundled_models_shapes(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.click("#sample")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    classes = {cell.strip() for cell in page.locator("#detections tbody tr td:first-child").all_inner_texts()}
    assert classes == {"triangle", "star"}
    assert "finds two synthetic shapes" in page.inner_text("#model")
    page.close()


@pytest.mark.parametrize(
    ("path", "rendered"), [("/docs", ".swagger-ui .opblock"), ("/redoc", "h2:has-text('Detect objects')")]
)
def test_the_api_docs_render_with_every_outside_request_blocked(server, browser, path, rendered):
    page = browser.new_page()
    outside = []

    def only_loopback(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(server.url + path)
    page.wait_for_selector(rendered, timeout=30_000)
    assert "/detect/annotated" in page.inner_text("body")
    assert outside == [], f"the docs page asked for {outside}"
    page.close()


def test_favicon_and_sample_are_served(server):
    icon = httpx.get(server.url + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    sample_jpg = httpx.get(server.url + "/sample.jpg")
    assert sample_jpg.status_code == 200 and sample_jpg.content[:2] == b"\xff\xd8"
