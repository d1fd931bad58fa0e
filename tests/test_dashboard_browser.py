"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/setup.sh when missing) driven by Selenium loads the index and one atom page from disk and the test
asserts on the rendered DOM; screenshots are saved under the test's tmp dir.

Skipped, with the reason shown, only where no Chromium / chromedriver is installed (setup.sh installs both with
apt-get where it can)."""

from __future__ import annotations

import shutil
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium / chromedriver on PATH (scripts/setup.sh installs the Debian "
                                       "packages chromium and chromium-driver with apt-get)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1600"]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A dashboard of the shipped L4.H0 write SAE on 6 held-out contexts (pages for two atoms)."""
    from sae_lens import SAE

    from writesae_plugin.dashboard import DashboardConfig, compute_dashboard, write_dashboard
    from writesae_plugin.demo.run import demo_release_dir, held_out_contexts, load_demo_model
    from writesae_plugin.registry import register_local_release

    model = load_demo_model()
    register_local_release("writesae-demo", demo_release_dir())
    sae = SAE.from_pretrained("writesae-demo", "L4.H0.write")
    tokens = held_out_contexts(model.tokenizer, 6, 64)
    data = compute_dashboard(model, sae, tokens, DashboardConfig(max_pages=2, effect_firings=2, value_firings=2),
                             progress=False)
    out = tmp_path_factory.mktemp("dash")
    write_dashboard(data, out, model.tokenizer, title="L4.H0.write", progress=False)
    return out, data, model.tokenizer


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + ["--user-data-dir=" + tempfile.mkdtemp(prefix="writesae-chromium-")]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_index_and_atom_page_render(dashboard, browser, tmp_path):
    from selenium.webdriver.common.by import By

    out, data, tokenizer = dashboard
    browser.get((out / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#atoms tbody tr")
    assert len(rows) == data.stats.n  # one row per atom
    # sorting by density puts the densest atom first
    browser.find_elements(By.CSS_SELECTOR, "#atoms th")[1].click()
    first = browser.find_element(By.CSS_SELECTOR, "#atoms tbody tr td").text
    assert int(first) == int(data.stats.fires.argmax())
    # the search box filters rows
    box = browser.find_element(By.ID, "search")
    box.send_keys("dead")
    visible = [r for r in browser.find_elements(By.CSS_SELECTOR, "#atoms tbody tr") if r.is_displayed()]
    assert len(visible) == int((data.stats.fires == 0).sum())
    browser.save_screenshot(str(tmp_path / "index.png"))
    assert _console_errors(browser) == []

    atom = int(data.atoms[0])  # the most frequent atom on these contexts (it has a page and top contexts)
    browser.get((out / "atoms" / f"{atom}.html").as_uri())
    top = data.stats.top(atom)[0]
    spans = browser.find_elements(By.CSS_SELECTOR, "#top .ctx")[0].find_elements(By.CSS_SELECTOR, "span.tok")
    fired = [s for s in spans if "fire" in s.get_attribute("class")]
    assert len(fired) == 1 and float(fired[0].get_attribute("data-act")) == pytest.approx(top["act"], rel=1e-3)
    assert fired[0].text.strip() == tokenizer.decode([int(data.tokens[top["ctx"], top["pos"]])]).strip()
    img = browser.find_element(By.ID, "fig")
    w, h = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    assert w > 100 and h > 100
    assert img.size["width"] > 100 and img.size["height"] > 100
    browser.save_screenshot(str(tmp_path / f"atom{atom}.png"))
    assert _console_errors(browser) == []

