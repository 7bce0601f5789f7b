"""The browser UI at / in a real headless Chromium (Selenium), against a real uvicorn process on loopback.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Without them the test
is skipped, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from app.processes import free_port, start_server, stop, wait_ready

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]


def require_browser() -> None:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"the UI test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def server(tiny_artifacts_session):
    require_browser()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Neither Redis nor the in-process LRU keeps a LoRA: an ETag's file is gone at once, and the page's
    # retrieval must still work (it sends the seeded request, which gives the same LoRA again).
    env = {**os.environ, "SGLORA_REDIS_URL": "", "SGLORA_LRU_BYTES": "0", "SGLORA_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    artifacts = ("--artifacts", str(tiny_artifacts_session))
    proc = start_server(port, env, *artifacts, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(base, proc)
        yield base
    finally:
        stop(proc, timeout=30)
        proc.communicate()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def shape_png(path: Path, draw) -> Path:
    img = Image.new("RGB", (64, 64), "black")
    draw(ImageDraw.Draw(img))
    img.save(path)
    return path


def test_describe_generate_download_and_compare_retrieval(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(f"{server}/")
    assert browser.title == "SG-LoRA"
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))

    # 1. describe, generate: the experts table
    browser.find_element(By.ID, "description").send_keys("a photo of a red circle")
    browser.find_element(By.ID, "generate").click()
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#experts-table tbody tr"))
    seed = int(browser.find_element(By.ID, "seed-out").text)
    shown = [
        (r.get_attribute("data-name"), float(r.get_attribute("data-weight")), r.find_element(By.CSS_SELECTOR, ".value").text)
        for r in rows
    ]
    # The weights shown are the API's for the same request.
    api = httpx.post(f"{server}/generate/preview", json={"description": "a photo of a red circle", "seed": seed}).json()
    assert [(e["name"], e["weight"], f"{e['weight']:.4f}") for e in api["experts"]] == shown
    assert browser.find_element(By.ID, "etag-out").text == api["etag"]
    assert len(shown) == api["top_k"] == 3

    # 2. download: the same bytes as the API's /generate for that seed
    browser.find_element(By.ID, "download-safetensors").click()
    end = time.monotonic() + 20
    while not [p for p in browser.downloads.glob("*.safetensors")]:
        assert time.monotonic() < end, "no download"
        time.sleep(0.1)
    time.sleep(0.3)  # let Chromium finish renaming the file
    downloaded = next(browser.downloads.glob("*.safetensors")).read_bytes()
    expected = httpx.post(f"{server}/generate", json={"description": "a photo of a red circle", "seed": seed}).content
    assert downloaded == expected

    # 3. upload images with captions: retrieval with and without the LoRA
    images = [
        (shape_png(tmp_path / "red_circle.png", lambda d: d.ellipse((12, 12, 52, 52), fill="red")), "a red circle"),
        (shape_png(tmp_path / "blue_square.png", lambda d: d.rectangle((12, 12, 52, 52), fill="blue")), "a blue square"),
        (
            shape_png(
                tmp_path / "green_cross.png",
                lambda d: (d.rectangle((28, 8, 36, 56), fill="green"), d.rectangle((8, 28, 56, 36), fill="green")),
            ),
            "a green cross",
        ),
    ]
    browser.find_element(By.ID, "images").send_keys("\n".join(str(p) for p, _ in images))
    inputs = wait.until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, ".caption-input")
            if len(d.find_elements(By.CSS_SELECTOR, ".caption-input")) == 3
            else None
        )
    )
    for field, (_, caption) in zip(inputs, images):
        field.clear()
        field.send_keys(caption)
    browser.find_element(By.ID, "retrieve").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#zs-table tbody tr")) == 3)
    assert browser.find_element(By.ID, "rankings").is_displayed()
    for table in ("lora-table", "zs-table"):
        body_rows = browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
        assert len(body_rows) == 3
        assert all(len(r.find_elements(By.CSS_SELECTOR, "td.num")) == 3 for r in body_rows)
        heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, f"#{table} thead th")][1:]
        assert [h.split(". ", 1)[1] for h in heads] == [c for _, c in images]
    assert "recall@1" in browser.find_element(By.ID, "lora-recall").text
    assert browser.find_element(By.ID, "error").is_displayed() is False
    assert not browser.find_element(By.ID, "retrieval-note").is_displayed()  # the previewed LoRA, generated again
    # The ETag alone (what the page sent before) is no longer in any cache here; the server makes its file
    # again from the request it remembers handing it out for.
    again = httpx.post(f"{server}/retrieve", data={"etag": api["etag"]}, files=[("images", images[0][0].read_bytes())])
    assert again.status_code == 200 and again.json()["adapter"]["etag"] == api["etag"], again.text

    # A screenshot of the whole page, to look at.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, max(1000, height + 200))
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "ui.png"))


def test_errors_are_shown_with_the_field(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    browser.find_element(By.ID, "description").send_keys("a circle")
    browser.find_element(By.ID, "top-k").send_keys("99")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 20).until(ec.visibility_of_element_located((By.ID, "error")))
    text = browser.find_element(By.ID, "error").text
    assert "422" in text and "top_k" in text and "number of experts" in text


def generate_in_page(browser, server, description="a photo of a red circle"):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
    browser.find_element(By.ID, "description").send_keys(description)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#experts-table tbody tr"))


def add_one_image(browser, tmp_path):
    """Adds a red circle to the page's retrieval images (one caption field)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = shape_png(tmp_path / "red_circle.png", lambda d: d.ellipse((12, 12, 52, 52), fill="red"))
    browser.find_element(By.ID, "images").send_keys(str(image))
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".caption-input")) == 1)


# Wraps the page's fetch: the statement (%s) runs once /retrieve has answered, before the page reads the answer.
ON_RETRIEVE_ANSWER = """
const real = window.fetch;
window.fetch = async (u, options) => {
  const r = await real(u, options);
  if (u === "/retrieve") { %s }
  return r;
};
"""


# Replaces the page's fetch: answers `url` with the next of `answers` ("network": a failed fetch; a status:
# that status with Retry-After: 1; "pass": the service), and counts the calls in window.calls.
SCRIPTED_FETCH = """
const [url, answers] = arguments;
const real = window.fetch;
window.calls = 0;
window.fetch = (u, options) => {
  if (u !== url) return real(u, options);
  const answer = answers[Math.min(window.calls++, answers.length - 1)];
  if (answer === "network") return Promise.reject(new TypeError("Failed to fetch"));
  if (answer === "pass") return real(u, options);
  const html = {status: 200, headers: {"Content-Type": "text/html"}};
  if (answer === "html") return Promise.resolve(new Response("<html>sign in</html>", html));
  const body = JSON.stringify({detail: {field: null, reason: "model is overloaded: the request queue is full, retry later"}});
  return Promise.resolve(new Response(body, {status: answer, headers: {"Retry-After": "1", "Content-Type": "application/json"}}));
};
"""


def test_a_failed_download_and_a_full_queue_are_shown(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    generate_in_page(browser, server)
    browser.execute_script(SCRIPTED_FETCH, "/generate", ["network"])
    browser.find_element(By.ID, "download-zip").click()
    # Said beside the download buttons (the form's error box may be scrolled out of sight by then).
    wait.until(ec.visibility_of_element_located((By.ID, "download-error")))
    assert "network error" in browser.find_element(By.ID, "download-error").text
    assert browser.find_element(By.ID, "download-zip").is_enabled() and not browser.find_element(By.ID, "error").is_displayed()

    # A 429 is retried after its Retry-After; shown once the retries are spent.
    browser.execute_script(SCRIPTED_FETCH, "/generate/preview", [429, "pass"])
    browser.find_element(By.ID, "generate").click()
    # The wait is said while it lasts, and the busy text restored after it.
    wait.until(lambda d: "queue full (429), retrying in 1 s" in d.find_element(By.ID, "generate-busy").text)
    wait.until(lambda d: d.execute_script("return window.calls") == 2 and d.find_element(By.ID, "generate").is_enabled())
    assert browser.execute_script("return document.getElementById('generate-busy').textContent") == "generating…"
    assert not browser.find_element(By.ID, "error").is_displayed()
    browser.execute_script(SCRIPTED_FETCH, "/generate/preview", [429])
    browser.find_element(By.ID, "generate").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert browser.find_element(By.ID, "error").text.startswith("429: model is overloaded")
    assert browser.execute_script("return window.calls") == 3


def test_a_refused_image_is_named_by_its_file(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    generate_in_page(browser, server)
    good = shape_png(tmp_path / "red_circle.png", lambda d: d.ellipse((12, 12, 52, 52), fill="red"))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    browser.find_element(By.ID, "images").send_keys(f"{good}\n{bad}")
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".caption-input")) == 2)
    browser.find_element(By.ID, "retrieve").click()
    WebDriverWait(browser, 20).until(ec.visibility_of_element_located((By.ID, "retrieval-error")))
    assert browser.find_element(By.ID, "retrieval-error").text.startswith("422 · images[1] (notes.txt): ")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_documentation_renders_without_internet(server, browser, page):
    """Swagger UI and ReDoc load their scripts from the service (the browser here has no internet: FastAPI's
    own pages, which fetch them from cdn.jsdelivr.net, stayed blank)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}{page}")
    sources = browser.execute_script(
        "return Array.from(document.querySelectorAll('script[src], link[href]'), e => e.src || e.href)"
    )
    assert sources and all(s.startswith(server) for s in sources), sources
    body = WebDriverWait(browser, 30).until(lambda d: "Generate a LoRA" in (t := d.find_element(By.TAG_NAME, "body").text) and t)
    assert "/generate/batch" in body and "/retrieve" in body


def test_retrieval_says_when_the_request_gives_another_lora_than_the_preview(server, browser, tmp_path):
    """After an expert change the seeded request gives another LoRA than the one previewed: the scores are
    that LoRA's, and the page says so (here the preview's ETag is replaced to stand for such a change)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    generate_in_page(browser, server)
    previewed = browser.execute_script("const e = current.info.etag; current.info.etag = 'an-earlier-lora'; return e;")
    add_one_image(browser, tmp_path)
    browser.find_element(By.ID, "retrieve").click()
    note = WebDriverWait(browser, 30).until(ec.visibility_of_element_located((By.ID, "retrieval-note")))
    assert "expert repository changed" in note.text and previewed in note.text


def test_a_new_preview_during_retrieval_is_not_taken_for_an_expert_change(server, browser, tmp_path):
    """The note compares the LoRA scored with the preview the retrieval was sent for: another description
    previewed while the images are scored is no change to the expert repository."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    generate_in_page(browser, server)
    add_one_image(browser, tmp_path)
    # The answer to /retrieve arrives after another preview (here: its answer put in place of the first).
    browser.execute_script(ON_RETRIEVE_ANSWER % 'current = { ...current, info: { ...current.info, etag: "a-later-preview" } };')
    browser.find_element(By.ID, "retrieve").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "rankings").is_displayed())
    assert not browser.find_element(By.ID, "retrieval-note").is_displayed()


def test_a_download_after_an_expert_change_says_it_is_another_lora(server, browser):
    """After an expert change the seeded request gives another LoRA than the one the page shows: the file is
    that LoRA, and the page says so (here the preview's ETag is replaced to stand for such a change)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    generate_in_page(browser, server)
    browser.find_element(By.ID, "download-safetensors").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "download-safetensors").is_enabled())
    assert not browser.find_element(By.ID, "download-changed").is_displayed()  # the LoRA shown
    previewed = browser.execute_script("const e = current.info.etag; current.info.etag = 'an-earlier-lora'; return e;")
    browser.find_element(By.ID, "download-safetensors").click()
    note = WebDriverWait(browser, 20).until(ec.visibility_of_element_located((By.ID, "download-changed")))
    assert "expert repository changed" in note.text and previewed in note.text and "an-earlier-lora" in note.text


def test_a_seed_beyond_two_to_the_53_is_sent_as_typed(server, browser):
    """Seeds go up to 2^63 - 1; a JavaScript number holds integers exactly only up to 2^53 (Number() rounded
    1152921504606846977 to ...847000: another LoRA). The page sends, shows and reuses the digits typed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    seed = 2**60 + 1
    browser.get(f"{server}/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
    browser.find_element(By.ID, "description").send_keys("a photo of a red circle")
    browser.find_element(By.ID, "seed").send_keys(str(seed))
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#experts-table tbody tr"))
    assert browser.find_element(By.ID, "seed-out").text == str(seed)
    api = httpx.post(f"{server}/generate/preview", json={"description": "a photo of a red circle", "seed": seed}).json()
    assert browser.find_element(By.ID, "etag-out").text == api["etag"]
    assert browser.execute_script("return requestJson(seededRequest())").endswith(f'"seed":{seed}}}')


def test_a_seed_typed_with_leading_zeros_is_that_number(server, browser):
    """The page sends a seed's digits as typed (above); "007", which the form's pattern allows, is no JSON
    number: the preview answered 422 "body: not valid JSON"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
    browser.find_element(By.ID, "description").send_keys("a photo of a red circle")
    browser.find_element(By.ID, "seed").send_keys("007")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#experts-table tbody tr"))
    assert browser.find_element(By.ID, "seed-out").text == "7"
    api = httpx.post(f"{server}/generate/preview", json={"description": "a photo of a red circle", "seed": 7}).json()
    assert browser.find_element(By.ID, "etag-out").text == api["etag"]


def test_a_retrieval_answered_after_another_preview_is_dropped(server, browser, tmp_path):
    """Scores that arrive after another description was previewed belong to the earlier LoRA: not shown under
    the new experts; and a run's earlier scores are hidden while it runs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    generate_in_page(browser, server)
    add_one_image(browser, tmp_path)
    before = browser.execute_script("return previews")
    browser.execute_script(ON_RETRIEVE_ANSWER % "previews++;")  # another preview made while the images were scored
    browser.find_element(By.ID, "retrieve").click()
    WebDriverWait(browser, 30).until(lambda d: not d.find_element(By.ID, "retrieve-busy").is_displayed())
    assert browser.execute_script("return previews") == before + 1  # the answer came (the wrapper ran)
    assert not browser.find_element(By.ID, "retrieval-error").is_displayed()  # dropped, not failed
    assert not browser.find_element(By.ID, "rankings").is_displayed()
    assert browser.find_element(By.ID, "retrieve").is_enabled()


def test_an_image_removed_during_retrieval_keeps_its_thumbnail_in_the_scores(server, browser, tmp_path):
    """The scores show the images sent, with the picker's object URLs: removing an image from the picker while
    it is scored must not revoke the URL its row in the scores still shows (it showed 0 px wide)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    generate_in_page(browser, server)
    add_one_image(browser, tmp_path)
    browser.execute_script(ON_RETRIEVE_ANSWER % "document.querySelector('#uploads .remove').click();")
    browser.find_element(By.ID, "retrieve").click()
    WebDriverWait(browser, 30).until(lambda d: not d.find_element(By.ID, "retrieve-busy").is_displayed())
    assert not browser.find_elements(By.CSS_SELECTOR, ".caption-input")  # removed from the picker
    assert browser.find_element(By.ID, "rankings").is_displayed()
    thumb = browser.find_element(By.CSS_SELECTOR, "#lora-table td.thumb img")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return arguments[0].complete", thumb))
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 64


def test_the_page_works_under_a_root_path_and_is_revalidated(make_settings):
    """Behind a proxy's path prefix (uvicorn --root-path) the page's script, style, links and API calls carry
    it; the page and its assets are revalidated on every load (an upgraded service ran an old cached script)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    # The paths as uvicorn --root-path passes them on: the prefix kept in the path, and named in root_path.
    with TestClient(create_app(make_settings()), root_path="/sglora") as c:
        page = c.get("/sglora/")
        assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
        text = page.text
        assert '<meta name="sglora-root" content="/sglora">' in text
        for url in ("/sglora/static/style.css", "/sglora/static/app.js", "/sglora/docs", "/sglora/metrics"):
            assert f'="{url}"' in text, url
        assert 'href="/static' not in text and 'src="/static' not in text
        script = c.get("/sglora/static/app.js")
        assert script.status_code == 200 and script.headers["cache-control"] == "no-cache"
        assert 'fetch("/' not in script.text and 'send("/' not in script.text  # every call goes through ROOT
    with TestClient(create_app(make_settings())) as c:
        assert '<meta name="sglora-root" content="">' in c.get("/").text and 'src="/static/app.js"' in c.get("/").text


def test_serve_takes_a_root_path_that_starts_with_a_slash(capsys):
    from app.serve import build_parser

    assert build_parser().parse_args(["--root-path", "/sglora/"]).root_path == "/sglora"
    assert build_parser().parse_args([]).root_path == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--root-path", "sglora"])
    assert "must start with '/' (e.g. /sglora)" in capsys.readouterr().err


def test_an_answer_that_is_not_the_services_json_is_named_and_the_soups_show_no_temperature(server, browser):
    """A proxy's HTML page answered 200 (a login page) was shown as a network error; and the soups, which use
    no softmax, showed the request's temperature (model-soup also a top-K, though it takes every expert)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    generate_in_page(browser, server)
    browser.execute_script(SCRIPTED_FETCH, "/generate/preview", ["html"])
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 20).until(ec.visibility_of_element_located((By.ID, "error")))
    assert browser.find_element(By.ID, "error").text.startswith("unexpected answer (200, text/html)")
    generate_in_page(browser, server)  # a fresh page: the service's own fetch again
    for method, shown in (("model-soup", "all / —"), ("adapter-soup", " / —")):
        Select(browser.find_element(By.ID, "method")).select_by_value(method)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 20).until(lambda d, m=method: d.find_element(By.ID, "method-out").text == m)
        assert shown in browser.find_element(By.ID, "prior-out").text
