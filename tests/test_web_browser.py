"""The web viewer in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against the real server on the default models: the models page with rendered cards, an
explanation by every fast method with the target picker and the opacity slider, a RELAX job watched
live to its end, an ablation-path job opened in the path viewer whose slider and film change the slice
shown, a cancelled job, and the denoiser. Screenshots go to a pytest temporary directory (printed);
with XAISERVE_SCREENSHOTS=1 the final ones are also copied to docs/screenshots/ for the README."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_STORE
from tests.serverutil import ROOT, running_server

pytestmark = pytest.mark.slow

# Without the background-networking flags Chromium's own connections (updates, sync, QUIC probes)
# are refused on a closed network and slow every start.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1100",
)


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: bash scripts/setup.sh installs them "
            "(apt-get install chromium chromium-driver)"
        )
    return chromium, driver


FOR_DOCS = ("explain", "jobs", "path")  # the screenshots docs/screenshots/ keeps for the README


@pytest.fixture(scope="module")
def zoo():
    with running_server(DEFAULT_STORE, job_workers=1) as srv:
        srv.base = srv.metrics_url.rsplit("/", 1)[0]
        yield srv


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("screenshots")
    yield d
    print(f"\nweb viewer screenshots: {d}")
    if os.environ.get("XAISERVE_SCREENSHOTS"):
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        for name in FOR_DOCS:
            shutil.copy(d / f"{name}.png", out / f"{name}.png")
        print(f"{', '.join(FOR_DOCS)} copied to {out}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_binaries()
    opts = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(driver))
    d.set_page_load_timeout(30)
    try:
        yield d
        severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, f"the page logged errors: {severe}"
    finally:
        d.quit()


def wait(d, cond, timeout: float = 60, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.1).until(lambda drv: cond(drv), message=what)


def by_css(d, sel):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, sel)


def all_css(d, sel):
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, sel)


def select(d, sel, value):
    from selenium.webdriver.support.ui import Select

    Select(by_css(d, sel)).select_by_value(value)


def open_tab(d, base, tab):
    if not d.current_url.startswith(base):
        d.get(base + "/#" + tab)
        wait(
            d,
            lambda drv: by_css(drv, "body").get_attribute("data-ready") == "1",
            30,
            "the page did not load its models",
        )
    else:
        d.execute_script("location.hash = arguments[0]", "#" + tab)
    wait(d, lambda drv: by_css(drv, "body").get_attribute("data-tab") == tab, 10)


def pixels(d, sel) -> str:
    return d.execute_script("return document.querySelector(arguments[0]).toDataURL()", sel)


def shot(d, shots: Path, name: str) -> None:
    d.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.2)
    d.save_screenshot(str(shots / f"{name}.png"))


def api_models(base) -> dict:
    import json
    import urllib.request

    return {m["name"]: m for m in json.loads(urllib.request.urlopen(base + "/api/models", timeout=30).read())["models"]}


# ------------------------------------------------------------------------------------------ tests
def test_models_page_lists_every_model_with_its_methods_and_card(zoo, browser, shots):
    d = browser
    open_tab(d, zoo.base, "models")
    models = api_models(zoo.base)
    cards = all_css(d, "article.model")
    assert len(cards) == len(models)
    nemt = by_css(d, "article.model[data-model='lesions-nemt:1']")
    chips = [c.text for c in nemt.find_elements("css selector", ".chip")]
    assert chips == models["lesions-nemt"]["methods"]
    nemt.find_element("css selector", "summary").click()
    heading = wait(d, lambda drv: nemt.find_element("css selector", ".markdown h1"), 5)
    assert heading.text.startswith("lesions-nemt:1")
    assert nemt.find_elements("css selector", ".markdown table"), "the card's tables are rendered"
    shot(d, shots, "models")
    buttons = {b.text: b for b in nemt.find_elements("css selector", ".actions button")}
    assert {"Explain", "ablation_path job"} <= set(buttons), list(buttons)
    buttons["ablation_path job"].click()
    wait(d, lambda drv: by_css(drv, "body").get_attribute("data-tab") == "jobs", 5)
    assert by_css(d, "#job-method").get_attribute("value") == "ablation_path"
    assert by_css(d, "#job-model").get_attribute("value") == "lesions-nemt:1"


def test_explain_runs_every_fast_method_with_target_and_opacity(zoo, browser, shots):
    d = browser
    open_tab(d, zoo.base, "explain")
    select(d, "#explain-model", "lesions-nemt:1")
    by_css(d, "#tab-explain [data-sample='lesion-1.png']").click()
    wait(d, lambda drv: "64 × 64" in by_css(drv, "#explain-input-caption").text, 20, "no preview of the image")
    by_css(d, "#explain-run").click()
    done = lambda drv: (
        (figs := all_css(drv, "figure.result")) and all(f.get_attribute("data-state") != "running" for f in figs)
    )
    wait(d, done, 90, "the explanations did not finish")
    fast = [
        m
        for m in api_models(zoo.base)["lesions-nemt"]["methods"]
        if m not in ("ablation_path",) and not m.startswith("sift")
    ]
    figs = all_css(d, "figure.result")
    assert [f.get_attribute("data-method") for f in figs] == fast
    assert all(f.get_attribute("data-state") == "done" for f in figs), [f.text for f in figs]
    assert all("fidelity" in f.text and " ms" in f.text for f in figs)
    assert "label 3: vascular" in figs[0].text, figs[0].text
    before = pixels(d, "figure.result[data-method=nemt] canvas")
    d.execute_script(
        "const s = document.getElementById('explain-opacity'); s.value = 1; s.dispatchEvent(new Event('input'))"
    )
    assert pixels(d, "figure.result[data-method=nemt] canvas") != before, "the opacity slider redraws the overlays"
    d.execute_script(
        "const s = document.getElementById('explain-opacity'); s.value = 0.5; s.dispatchEvent(new Event('input'))"
    )
    shot(d, shots, "explain")
    select(d, "#explain-target", "1")  # a new target label explains again
    wait(d, lambda drv: "label 1: melanoma" in by_css(drv, "figure.result[data-method=nemt]").text, 60)
    wait(d, done, 90)
    assert all("label 1: melanoma" in f.text for f in all_css(d, "figure.result"))
    select(d, "#explain-model", "scenes-nemu:1")
    assert not by_css(d, "#explain-target-box").is_displayed(), "NEM-U explains no label"


def test_a_dicom_file_is_shown_as_the_server_reads_it_and_explained(zoo, browser, shots):
    from pydicom.data import get_testdata_file

    d = browser
    open_tab(d, zoo.base, "explain")
    select(d, "#explain-model", "scenes-nemu:1")
    by_css(d, "#tab-explain [data-image-input] input[type=file]").send_keys(get_testdata_file("CT_small.dcm"))
    wait(d, lambda drv: "CT_small.dcm: 128 × 128" in by_css(drv, "#explain-input-caption").text, 20, "no DICOM preview")
    by_css(d, "#explain-run").click()
    wait(
        d,
        lambda drv: (
            (figs := all_css(drv, "figure.result")) and all(f.get_attribute("data-state") == "done" for f in figs)
        ),
        90,
        "the DICOM image was not explained by every method",
    )
    assert d.execute_script("return document.querySelector('figure.result canvas').width") == 128, (
        "masks at the input's resolution"
    )
    shot(d, shots, "explain-dicom")


def _submit(d, method, model, sample, params):
    select(d, "#job-method", method)
    select(d, "#job-model", model)
    by_css(d, f"#tab-jobs [data-sample='{sample}']").click()
    wait(d, lambda drv: sample in by_css(drv, "#tab-jobs [data-filename]").text, 10)
    for name, value in params.items():
        field = by_css(d, f"#job-param-{name}")
        field.clear()
        field.send_keys(str(value))
    before = by_css(d, "#job-id").text
    by_css(d, "#job-submit").click()
    wait(d, lambda drv: by_css(drv, "#job-id").text not in (before, "(none)"), 20, "the job was not submitted")
    return by_css(d, "#job-id").text


def test_relax_job_shows_live_progress_and_its_three_maps(zoo, browser, shots):
    d = browser
    open_tab(d, zoo.base, "jobs")
    select(d, "#job-method", "relax")
    assert by_css(d, "#job-param-num_masks").get_attribute("placeholder") == "3000", "the default is shown"
    job_id = _submit(d, "relax", "scenes-simclr:1", "scene-1.png", {"num_masks": 1500, "batch_size": 50})
    seen_live = wait(
        d,
        lambda drv: all_css(drv, "#live-heat") or by_css(drv, "#job-panel").get_attribute("data-state") == "SUCCEEDED",
        60,
    )
    assert seen_live
    live = bool(all_css(d, "#live-heat"))
    widths: list[float] = []

    def finished(drv) -> bool:
        widths.append(
            float(drv.execute_script("return parseFloat(document.getElementById('job-progress').style.width) || 0"))
        )
        return by_css(drv, "#job-panel").get_attribute("data-state") == "SUCCEEDED"

    wait(d, finished, 90, "the RELAX job did not finish")
    assert live, "the partial heatmap shows while the job runs"
    assert any(0 < w < 100 for w in widths), f"the progress bar moves: {widths}"
    maps = [c.get_attribute("data-map") for c in all_css(d, "#job-result canvas")]
    assert maps == ["importance", "uncertainty", "u_relax"]
    assert "1500 masks" in by_css(d, "#job-result").text
    row = by_css(d, f"#jobs-table tr[data-job='{job_id}']")
    assert row.get_attribute("data-state") == "SUCCEEDED"
    shot(d, shots, "jobs")


def test_ablation_path_viewer_slider_and_film(zoo, browser, shots):
    from selenium.webdriver.common.keys import Keys

    d = browser
    open_tab(d, zoo.base, "jobs")
    select(d, "#job-method", "ablation_path")
    assert by_css(d, "#job-param-return_images").is_selected(), "the viewer asks for the intervened images"
    _submit(d, "ablation_path", "lesions-classifier:1", "lesion-1.png", {"max_iterations": 10})
    wait(
        d,
        lambda drv: by_css(drv, "#job-panel").get_attribute("data-state") == "SUCCEEDED",
        90,
        "the path job did not finish",
    )
    by_css(d, "#job-open-path").click()
    wait(
        d,
        lambda drv: (
            by_css(drv, "body").get_attribute("data-tab") == "path" and by_css(drv, "#path-view").is_displayed()
        ),
        10,
    )
    slider = by_css(d, "#path-slider")
    assert slider.get_attribute("max") == "15", "14 interior slices and both ends"
    phi0, img0, t0 = pixels(d, "#path-phi"), pixels(d, "#path-image"), by_css(d, "#path-t").text
    cx0 = by_css(d, "#path-marker").get_attribute("cx")
    for _ in range(7):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert slider.get_attribute("value") == "7"
    assert by_css(d, "#path-phi").get_attribute("data-slice") == "7"
    assert pixels(d, "#path-phi") != phi0 and pixels(d, "#path-image") != img0, "the slice shown changes with t"
    assert by_css(d, "#path-t").text != t0 and "slice 7 of 15" in by_css(d, "#path-t").text
    assert by_css(d, "#path-marker").get_attribute("cx") != cx0, "the marker on F(t) moves with t"
    for _ in range(6):
        slider.send_keys(Keys.ARROW_RIGHT)
    plain = pixels(d, "#path-phi")
    by_css(d, "#path-stretch").click()  # the late slices differ from the affine path by a few per cent
    assert pixels(d, "#path-phi") != plain and "(stretched)" in by_css(d, "#path-phi-caption").text
    shot(d, shots, "path")
    by_css(d, "#path-play").click()
    wait(d, lambda drv: slider.get_attribute("value") != "13", 5, "play does not advance t")
    by_css(d, "#path-play").click()
    assert by_css(d, "#path-play").text == "Play"


def test_a_straddling_path_loaded_by_id_shows_both_paths(zoo, browser):
    import base64
    import json
    import urllib.request

    from selenium.webdriver.common.keys import Keys

    body = {
        "method": "ablation_path",
        "model": "lesions-classifier",
        "ablation": {"score": "straddling", "max_iterations": 4},
        "image": {
            "encoded": base64.b64encode(
                (ROOT / "xaiserve/service/web/static/samples/lesion-2.png").read_bytes()
            ).decode()
        },
    }
    req = urllib.request.Request(
        zoo.base + "/api/jobs", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    job_id = json.loads(urllib.request.urlopen(req, timeout=60).read())["id"]  # submitted elsewhere, e.g. by curl
    d = browser
    open_tab(d, zoo.base, "path")
    by_css(d, "#path-job-id").send_keys(job_id)
    by_css(d, "#path-load").click()  # still running: the page follows its events and shows it at the end
    wait(
        d,
        lambda drv: by_css(drv, "#path-view").is_displayed() and by_css(drv, "#path-status").text.startswith(job_id),
        90,
        "the straddling path was not shown",
    )
    assert by_css(d, "#path-down-figure").is_displayed(), "a straddling result has a second path"
    down0 = pixels(d, "#path-phi-down")
    for _ in range(5):
        by_css(d, "#path-slider").send_keys(Keys.ARROW_RIGHT)
    assert pixels(d, "#path-phi-down") != down0
    assert "return_images" in by_css(d, "#path-image-caption").text, "without images the page says how to get them"
    assert not by_css(d, "#notice").is_displayed(), by_css(d, "#notice").text


def test_a_running_job_is_cancelled_from_the_page(zoo, browser):
    d = browser
    open_tab(d, zoo.base, "jobs")
    select(d, "#job-method", "ablation_path")
    _submit(d, "ablation_path", "lesions-classifier:1", "lesion-1.png", {"max_iterations": 5000})
    wait(d, lambda drv: by_css(drv, "#job-panel").get_attribute("data-state") == "RUNNING", 60)
    by_css(d, "#job-cancel").click()
    wait(
        d,
        lambda drv: by_css(drv, "#job-panel").get_attribute("data-state") == "CANCELLED",
        30,
        "the job was not cancelled",
    )
    assert not by_css(d, "#job-cancel").is_enabled()


def test_the_page_s_jobs_survive_a_reload(zoo, browser):
    d = browser
    open_tab(d, zoo.base, "jobs")
    before = {r.get_attribute("data-job"): r.get_attribute("data-state") for r in all_css(d, "#jobs-table tbody tr")}
    d.refresh()
    wait(d, lambda drv: by_css(drv, "body").get_attribute("data-ready") == "1", 30)
    after = {r.get_attribute("data-job"): r.get_attribute("data-state") for r in all_css(d, "#jobs-table tbody tr")}
    assert after == before and len(after) >= 3 and "CANCELLED" in after.values(), (before, after)
    relax = next(r for r in all_css(d, "#jobs-table tbody tr") if r.find_elements("xpath", "./td[2][text()='relax']"))
    relax.find_element("css selector", "button").click()  # its result is fetched again
    wait(d, lambda drv: len(all_css(drv, "#job-result canvas")) == 3, 20, "the restored RELAX job shows no maps")


def test_a_server_with_tokens_asks_for_one(tiny_store, tmp_path, browser):
    token = "t0ken-for-the-browser-test-0123456789"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - {{name: viewer, token: {token}}}\n")
    with running_server(tiny_store, tokens_file=str(tokens), job_workers=0) as srv:
        base = srv.metrics_url.rsplit("/", 1)[0]
        d = browser
        d.get(base + "/#models")
        wait(d, lambda drv: by_css(drv, "#notice").is_displayed(), 20, "no notice that a token is needed")
        assert "authentication required" in by_css(d, "#notice").text
        assert "wanted" in by_css(d, "#auth").get_attribute("class")
        by_css(d, "#token").send_keys(token)
        by_css(d, "#auth button").click()
        wait(d, lambda drv: len(all_css(drv, "article.model")) == 5, 20, "the models did not load with the token")
        d.execute_script("sessionStorage.clear()")
    # the 401 answers are logged by Chromium as failed resources: they are expected here
    d.get_log("browser")


def test_denoise_shows_noisy_and_denoised_particles_side_by_side(zoo, browser, shots):
    d = browser
    open_tab(d, zoo.base, "denoise")
    select(d, "#denoise-model", "cryoem-cartesian:1")
    by_css(d, "#denoise-sample").click()
    wait(d, lambda drv: "loaded" in by_css(drv, "#denoise-status").text, 10)
    by_css(d, "#denoise-run").click()
    wait(d, lambda drv: len(all_css(drv, ".pair")) == 8, 60, "no particles shown")
    assert "8 particles of 64 × 64 through cryoem-cartesian:1" in by_css(d, "#denoise-status").text
    assert not by_css(d, "#denoise-pager").is_displayed()
    noisy = pixels(d, "canvas[data-particle='0'][data-which=noisy]")
    clean = pixels(d, "canvas[data-particle='0'][data-which=denoised]")
    assert noisy != clean
    shot(d, shots, "denoise")
