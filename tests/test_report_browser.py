"""The report in a real headless browser (Chromium through Selenium): the page loads offline,
every figure decodes, a header click sorts its table, and nothing is requested from outside.

Needs ``chromium`` and ``chromedriver`` on PATH (CI installs them: ``.ci/run``) and the
``selenium`` test extra; skipped, saying which is missing, where they are not."""

from __future__ import annotations

import shutil

import pytest

from calibrate.io import report
from calibrate.io.report.synthetic import write_sweep

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER),
                                reason="no chromium/chromedriver on PATH (apt install chromium "
                                       "chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory, browser):
    sweep = write_sweep(tmp_path_factory.mktemp("sweep") / "multirun", 8, failed=1)
    assert report.main([str(sweep), "--metric", "ece", "--dpi", "30"]) == 0
    browser.get((sweep / "report" / "report.html").as_uri())
    return browser


def test_page_loads_with_its_sections_in_order(page):
    assert page.title == "calibrate report"
    sections = page.execute_script(
        "return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert sections[0] == "Runs at a glance" and sections[-1] == "Jobs"
    assert sections.index("Steering") < sections.index("Ablations and the null space")
    # within the steering section its figure comes before its tables
    order = page.execute_script("""
        const h = Array.from(document.querySelectorAll('h2')).find(e => e.textContent == 'Steering');
        const out = []; let e = h.nextElementSibling;
        while (e && e.tagName != 'H2') { out.push(e.tagName); e = e.nextElementSibling; }
        return out;""")
    assert order[0] == "FIGURE" and "H3" in order and order.index("FIGURE") < order.index("H3")


def test_every_figure_decodes(page):
    sizes = page.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) >= 4  # layers, eta, ablation and null-space figures
    assert all(done and width > 0 for done, width in sizes)


def test_header_click_sorts_numerically_both_ways(page):
    from selenium.webdriver.common.by import By

    table = page.find_elements(By.CSS_SELECTOR, "table.sortable")[0]  # the headline
    headers = [th.text for th in table.find_elements(By.TAG_NAME, "th")]
    column = headers.index("ECE")

    def values() -> list[float]:
        return page.execute_script(
            "return Array.from(arguments[0].tBodies[0].rows).map("
            "r => parseFloat(r.cells[arguments[1]].dataset.v))", table, column)

    header = table.find_elements(By.TAG_NAME, "th")[column]
    header.click()
    up = values()
    assert up == sorted(up) and len(up) == 8
    header.click()
    assert values() == sorted(up, reverse=True)


def test_nothing_is_requested_from_outside(page):
    fetched = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in fetched if not u.startswith(("data:", "file:"))] == []
    screenshot = page.get_screenshot_as_png()
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(screenshot) > 10_000
