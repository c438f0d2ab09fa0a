"""The dashboard in a real headless Chromium while real Cockpits train, plus its security edges.

Two training processes (``_train_for_dashboard.py``: a real Cockpit, economy preset plus
``grad_hist_2d``) log to a temporary root; the app is served on a free loopback port in a
thread; Chromium loads the page. The checks read the DOM and the plotted trace data
(``el.data`` of each ``.js-plotly-plot``), and every test fails on any SEVERE browser console
entry. A screenshot of the page is saved to ``docs/screenshot.png``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cockpit.logwriter import LogWriter
from tests.app.conftest import REPO, Server, Trainer, metadata, wait_for, write_steps

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

REFRESH_S = 0.5
SCREENSHOT = REPO / "docs" / "screenshot.png"
#: Panels the economy preset plus grad_hist_2d fills (layer panels: the first tensor).
WITH_DATA = (
    "alpha",
    "distance",
    "update_size",
    "grad_norm",
    "gradient_tests",
    "tests_history",
    "batch_size",
    "grad_hist_1d",
    "grad_hist_2d",
    "hyperparameters",
    "performance",
    "grad_hist_time",
    "layer_grid",
    "layer_grad_norm",
    "layer_hist_1d",
    "layer_hist_2d",
    "layer_hist_time",
)
NOT_TRACKED = (
    "mean_gsnr",
    "early_stopping",
    "cabs",
    "hess_max_ev",
    "hess_trace",
    "tic_diag",
    "tic_trace",
)

PANELS_JS = """
const out = {};
const len = v => (v === null || v === undefined || v.length === undefined) ? 0 : v.length;
document.querySelectorAll('.js-plotly-plot').forEach(gd => {
  const host = gd.closest('[id^="{"]');
  if (!host) { return; }
  const name = JSON.parse(host.id).name;
  const layout = gd.layout || {};
  out[name] = {
    traces: (gd.data || []).map(t => ({
      name: t.name || '', n: t.z ? len(t.z) : len(t.x),
      opacity: t.opacity === undefined ? 1 : t.opacity,
      color: t.line && t.line.color ? t.line.color : null,
      lastx: len(t.x) ? t.x[t.x.length - 1] : null,
      y: t.z ? null : Array.from(t.y || []).slice(-50),
    })),
    notes: (layout.annotations || []).map(a => a.text),
    title: layout.title && layout.title.text ? layout.title.text : '',
    ytype: layout.yaxis ? layout.yaxis.type : null,
    card: host.closest('.cp-card') ? host.closest('.cp-card').className : '',
  };
});
return out;
"""


def points(info):
    return sum(t["n"] for t in info["traces"])


@pytest.fixture(scope="module")
def live_root(tmp_path_factory):
    """Two training runs with a real Cockpit, a finished short run, and a run outside."""
    root = tmp_path_factory.mktemp("logs")
    outside = tmp_path_factory.mktemp("outside") / "secret"
    with LogWriter(outside, metadata()) as w:
        write_steps(w, range(20))
    (root / "escape").symlink_to(outside, target_is_directory=True)
    trainers = [
        Trainer(root, "sgd", "--optimizer", "sgd", "--lr", "0.05", "--sleep", "0.05"),
        Trainer(
            root, "adam", "--optimizer", "adam", "--lr", "0.01", "--seed", "1", "--sleep", "0.05"
        ),
    ]
    with LogWriter(root / "done", metadata()) as w:  # a finished run
        write_steps(w, range(30))
    try:
        yield root, outside, trainers
    finally:
        for t in trainers:
            t.stop()


@pytest.fixture(scope="module")
def server(live_root, browser):
    """The dashboard, once both runs have logged some steps (Chromium starts meanwhile)."""
    from app import create_app

    root, _, trainers = live_root

    def logging(trainer, run):
        if trainer.proc.poll() is not None:
            pytest.fail(f"training {run} exited:\n{trainer.output()}")
        return len(list((root / run / "histograms").glob("part-*"))) >= 2

    for trainer, run in zip(trainers, ("sgd", "adam"), strict=True):
        wait_for(lambda t=trainer, r=run: logging(t, r), 120, f"run {run} to log steps")
    srv = Server(create_app(root, refresh_s=REFRESH_S))
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def no_console_errors(request):
    """Every browser test ends with an empty list of SEVERE console entries."""
    yield
    if "browser" in request.fixturenames:
        driver = request.getfixturevalue("browser")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, f"browser console errors: {severe}"


def text(driver, element_id):
    """The text of an element, ``""`` while it is not in the page yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return driver.find_element("id", element_id).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def panels(driver):
    return driver.execute_script(PANELS_JS)


def open_page(driver, url, runs=("sgd",)):
    query = "&".join(f"run={r}" for r in runs)
    driver.get(f"{url}/?{query}" if query else f"{url}/")
    wait_for(lambda: len(panels(driver)) >= len(WITH_DATA), 60, "the panels to render")


def wait_panels(driver, check, timeout, what):
    return wait_for(lambda: (lambda p: p if check(p) else None)(panels(driver)), timeout, what)


def toggle_run(driver, run):
    """Tick or untick a run in the run selector (a Dash 4 dropdown)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.ID, "runs").click()
    selector = f'.dash-dropdown-option input[value="{run}"]'
    option = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, selector), 10, run)[0]
    option.find_element(By.XPATH, "./ancestor::label").click()
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)


def save_screenshot(driver):
    """The whole page (not just the window) as docs/screenshot.png."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1600, "height": height, "scale": 1},
        },
    )
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def set_smoothing(driver, key):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#smoothing [role=slider]").send_keys(key)


# --------------------------------------------------------------------------------------------
# The live page
# --------------------------------------------------------------------------------------------
def test_page_loads_and_every_tracked_panel_shows_data(live_root, browser, server):
    started = time.monotonic()
    open_page(browser, server.url)
    shown = wait_panels(
        browser,
        lambda p: all(points(p.get(n, {"traces": []})) > 0 for n in WITH_DATA),
        60,
        "every tracked panel to show data",
    )
    loaded = time.monotonic() - started
    for name in NOT_TRACKED:
        assert "not tracked" in shown[name]["notes"], name
        assert "cp-compact" in shown[name]["card"], name
    for name in WITH_DATA:
        assert "not tracked" not in shown[name]["notes"] and "cp-compact" not in shown[name]["card"]
    perf = shown["performance"]
    assert {t["name"] for t in perf["traces"]} >= {"sgd · loss", "sgd · accuracy"}
    assert shown["layer_grad_norm"]["title"].endswith("· 0.weight")
    assert any("Gradient histogram (step" in shown[n]["title"] for n in ("grad_hist_1d",))
    status = text(browser, "status")
    assert "sgd" in status and "live" in status and "step" in status
    assert text(browser, "hints").strip()
    assert loaded < 60


def test_new_steps_arrive_by_extension_not_redraw(browser, server):
    before = browser.execute_script(
        "const gd = document.querySelector('[id*=\"performance\"] .js-plotly-plot');"
        "gd.__trace0 = gd.data[0]; gd.__n0 = gd.data[0].x.length;"
        "return gd.data[0].x[gd.data[0].x.length - 1];"
    )
    wait_for(
        lambda: panels(browser)["performance"]["traces"][0]["lastx"] > before,
        8 * REFRESH_S + 10,
        "new steps in the loss panel",
    )
    same, grown = browser.execute_script(
        "const gd = document.querySelector('[id*=\"performance\"] .js-plotly-plot');"
        "return [gd.data[0] === gd.__trace0, gd.data[0].x.length - gd.__n0];"
    )
    assert same, "the loss figure was redrawn instead of extended"
    assert grown > 0
    # The step-by-bin heatmap grows by rows.
    rows = panels(browser)["grad_hist_time"]["traces"][0]["n"]
    wait_for(lambda: panels(browser)["grad_hist_time"]["traces"][0]["n"] > rows, 15, "new rows")


def test_zoom_survives_refreshes(browser, server):
    browser.execute_script(
        'const gd = document.querySelector(\'[id*="grad_norm"][id*="panel"] .js-plotly-plot\');'
        "Plotly.relayout(gd, {'xaxis.range': [2, 7]});"
    )
    n = points(panels(browser)["grad_norm"])
    wait_for(lambda: points(panels(browser)["grad_norm"]) > n, 15, "grad_norm to grow")
    xrange = browser.execute_script(
        'return document.querySelector(\'[id*="grad_norm"][id*="panel"] .js-plotly-plot\')'
        ".layout.xaxis.range;"
    )
    assert xrange == [2, 7]


def test_log_toggle_flips_the_axis_and_keeps_the_points(browser, server):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.CSS_SELECTOR, '[id*="grad_norm"][id*="log"] input')
    assert panels(browser)["grad_norm"]["ytype"] == "log"
    before = points(panels(browser)["grad_norm"])
    box.find_element(By.XPATH, "./ancestor::label").click()
    after = wait_panels(browser, lambda p: p["grad_norm"]["ytype"] == "linear", 10, "linear")
    assert points(after["grad_norm"]) >= before  # the Patch kept the extended points
    box.find_element(By.XPATH, "./ancestor::label").click()
    wait_panels(browser, lambda p: p["grad_norm"]["ytype"] == "log", 10, "log again")


def test_overlay_and_switch_runs(browser, server):
    from selenium.webdriver.common.by import By

    toggle_run(browser, "adam")
    both = wait_panels(
        browser,
        lambda p: (
            {t["name"].split(" · ")[0] for t in p["performance"]["traces"]} == {"sgd", "adam"}
            and all(t["n"] for t in p["performance"]["traces"])
        ),
        20,
        "both runs overlaid",
    )
    colors = {t["name"].split(" · ")[0]: t["color"] for t in both["performance"]["traces"]}
    assert colors["sgd"] != colors["adam"]
    assert both["alpha"]["title"].endswith("— sgd")  # gauges show the focus run
    focus = browser.find_element(By.CSS_SELECTOR, '#focus input[value="adam"]')
    focus.find_element(By.XPATH, "./ancestor::label").click()
    wait_panels(browser, lambda p: p["alpha"]["title"].endswith("— adam"), 15, "focus on adam")
    status = text(browser, "status")
    assert "sgd" in status and "adam" in status
    save_screenshot(browser)
    # Switch: only adam.
    toggle_run(browser, "sgd")
    wait_panels(
        browser,
        lambda p: {t["name"].split(" · ")[0] for t in p["performance"]["traces"]} == {"adam"},
        15,
        "only adam",
    )


def test_csv_download_is_what_the_panel_shows(browser, server):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "live").find_element(By.TAG_NAME, "label").click()  # pause
    time.sleep(3 * REFRESH_S)
    shown = panels(browser)["performance"]
    time.sleep(4 * REFRESH_S)  # the runs keep training, the paused page does not move
    assert panels(browser)["performance"]["traces"][0]["lastx"] == shown["traces"][0]["lastx"]
    browser.find_element(By.CSS_SELECTOR, '[id*="performance"][id*="csv"]').click()
    files = wait_for(lambda: list(browser.downloads.glob("performance-*.csv")), 15, "the CSV")
    rows = list(csv.DictReader(io.StringIO(files[0].read_text())))
    assert rows and set(rows[0]) == {"trace", "x", "y", "z"}
    assert len(rows) == points(shown)
    assert {r["trace"] for r in rows} == {t["name"] for t in shown["traces"]}
    browser.find_element(By.ID, "live").find_element(By.TAG_NAME, "label").click()  # resume


def test_smoothing_slider_changes_the_plotted_data(browser, server):
    from selenium.webdriver.common.keys import Keys

    smooth = panels(browser)["performance"]  # the page starts at smoothing 0.6
    assert len(smooth["traces"]) == 4  # loss and accuracy: a faint raw line, then the EMA
    raw, ema = smooth["traces"][:2]
    assert raw["opacity"] < 1 and ema["opacity"] == 1
    assert max(ema["y"]) - min(ema["y"]) < max(raw["y"]) - min(raw["y"])
    set_smoothing(browser, Keys.HOME)  # 0: one plain line per series
    plain = wait_panels(
        browser, lambda p: len(p["performance"]["traces"]) == 2, 20, "unsmoothed lines"
    )
    assert [t["opacity"] for t in plain["performance"]["traces"]] == [1, 1]
    slider = browser.find_element("css selector", "#smoothing [role=slider]")
    assert slider.get_attribute("aria-valuenow") == "0"


def test_a_run_deleted_while_shown(browser, server, live_root):
    root = live_root[0]
    open_page(browser, server.url, runs=("done",))
    wait_panels(browser, lambda p: points(p["performance"]) > 0, 30, "the finished run")
    shutil.rmtree(root / "done")
    notice = wait_for(
        lambda: "was deleted" in text(browser, "notice") and text(browser, "notice"),
        20,
        "the deletion notice",
    )
    assert "'done'" in notice
    wait_panels(browser, lambda p: points(p["performance"]) == 0, 15, "the run to go away")
    assert "done" not in text(browser, "status")


def test_traversal_in_the_url_is_refused(browser, server, live_root):
    outside = live_root[1]
    open_page(browser, server.url, runs=("..", str(outside), "escape", "..%2Fsgd"))
    notice = wait_for(lambda: text(browser, "notice"), 20, "a notice")
    assert "Refused" in notice and "escape" in notice
    shown = panels(browser)
    assert points(shown["performance"]) == 0 and points(shown["grad_hist_1d"]) == 0
    for path in ("..", "escape", str(outside).lstrip("/"), "..%2Fsgd", "%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server.url}/api/runs/{path}", timeout=10)
        assert err.value.code == 404, path
    ok = json.load(urllib.request.urlopen(f"{server.url}/api/runs/sgd", timeout=10))
    assert ok["status"] == "live"


def test_empty_root_shows_a_clear_empty_state(browser, tmp_path):
    from app import create_app

    srv = Server(create_app(tmp_path, refresh_s=REFRESH_S))
    try:
        browser.get(srv.url + "/")
        notice = wait_for(lambda: text(browser, "notice"), 30, "a notice")
        assert "No runs under" in notice
        shown = wait_panels(
            browser,
            lambda p: "no data yet" in p.get("performance", {}).get("notes", []),
            30,
            "the empty state of the panels",
        )
        assert "no data yet" in shown["alpha"]["notes"]
        with LogWriter(tmp_path / "first", metadata()) as w:  # a run appears while watching
            write_steps(w, range(3))
        wait_for(lambda: _options_contain(browser, "first"), 15, "the new run in the list")
    finally:
        browser.get("about:blank")
        srv.close()


def _options_contain(driver, run):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    try:
        driver.find_element(By.ID, "runs").click()
    except WebDriverException:
        return False
    selector = f'.dash-dropdown-option input[value="{run}"]'
    found = bool(driver.find_elements(By.CSS_SELECTOR, selector))
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    return found


def test_nonexistent_root_is_a_clear_error(tmp_path):
    missing = tmp_path / "missing"
    proc = subprocess.run(
        [sys.executable, "-m", "app", str(missing), "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and str(missing) in proc.stderr
    assert not Path(missing).exists()
