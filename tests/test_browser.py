"""`globscope serve` in a real browser: Debian's Chromium driven by Selenium (its chromedriver, nothing downloaded).

One server for the module, on a free local port, with a small real study (2D and 3D landscapes and merge trees).
The page must draw the 2D landscape like the stored reference (tests/data/serve-landscape-2d.png, with a
tolerance: the image comes from ParaView's software renderer), a pick must report the model that `globscope
decode` decodes there, and bad input must be a message in the page while the server keeps answering.
Regenerate the reference with GLOBSCOPE_UPDATE_REFERENCES=1 after a deliberate change of the views.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import default_signals, make_ready_study, one_line_error, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "data", "serve-landscape-2d.png")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.paraview, pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver: run `bash setup.sh --with-browser`"),
    pytest.mark.skipif(shutil.which("pvpython") is None, reason="no ParaView: run `bash setup.sh`"),
]
WINDOW = (1400, 900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from globscope_core.reducers import fit_reducer
    from globscope_core.stages.landscape import compute_landscape
    from globscope_core.stages.topology import study_topology
    from globscope_core.storage.study import Study

    d, _ = make_ready_study(tmp_path_factory.mktemp("serve") / "study")
    s = Study.open(d)
    fit_reducer(s, "pca", 3)
    compute_landscape(s, "pca-3d", 7, eval_samples=64, progress=False)
    study_topology(d, 3, verbose=False)
    return d


@pytest.fixture(scope="module")
def other(study, tmp_path_factory):
    """A second study for the same server: a copy of ``study`` with its 2D views only."""
    d = str(tmp_path_factory.mktemp("other") / "other")
    shutil.copytree(study, d, ignore=shutil.ignore_patterns("*-3d*"))
    return d


@pytest.fixture(scope="module")
def server(study, other, tmp_path_factory):
    """`globscope serve STUDY OTHER --port 0`: (process, url, tunnel line); stopped with SIGINT at the end, which
    must end it and its app."""
    out = tmp_path_factory.mktemp("decoded")
    exe = os.path.join(os.path.dirname(sys.executable), "globscope")
    proc = subprocess.Popen([exe, "serve", study, other, "--port", "0", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_signals)
    first = proc.stdout.readline()  # "serving STUDY at http://127.0.0.1:PORT/ (started in ...)"
    m = re.search(r"at (http://127\.0\.0\.1:\d+/)", first)
    assert m, (first, proc.stderr.read() if proc.poll() is not None else "")
    tunnel = proc.stdout.readline()
    yield proc, m.group(1), tunnel
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130, proc.stderr.read()
    with pytest.raises(OSError):  # the app and its X server were stopped with the command
        urllib.request.urlopen(m.group(1), timeout=5)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
              f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _by(driver, css, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.find_element("css selector", css))


def _wait(driver, what, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: what(d))


def _view_image(driver) -> np.ndarray:
    """The remote view as the page shows it: an element screenshot of #view, RGB float [h, w, 3]."""
    from PIL import Image

    png = driver.find_element("css selector", "#view").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64)


def _drawn(driver) -> bool:
    """The view's image has arrived and is not blank (a white page has no colour)."""
    img = _view_image(driver)
    return img.std() > 20 and (img.max(2) - img.min(2) > 60).mean() > 0.02


def _small(img: np.ndarray, size=(96, 64)) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img.astype(np.uint8)).resize(size, Image.BILINEAR), np.float64)


def _shown(driver) -> str:
    """The text of the result card or of the message, whichever is shown ('' when neither)."""
    res, msg = driver.find_element("css selector", "#result"), driver.find_element("css selector", "#message")
    return (res.is_displayed() and res.text.strip()) or (msg.is_displayed() and msg.text.strip()) or ""


def _result(driver, action, timeout=120) -> str:
    """Do ``action()`` and wait for the answer it brings (the server keeps the last one, across page loads)."""
    before = _shown(driver)
    action()
    return _wait(driver, lambda d: (lambda now: now if now and now != before else None)(_shown(d)), timeout)


def _cli_decode(study, *args) -> dict:
    rc, out, err = run_cli("decode", study, *args, "--json", "--out", os.path.join(study, "..", "cli.safetensors"))
    assert rc == 0, err
    return json.loads(out)


def _input(driver, css):
    """The <input> of a Vuetify field (the id lands on the input itself or on its wrapper)."""
    el = _by(driver, css)
    return el if el.tag_name == "input" else el.find_element("css selector", "input")


def _choose(driver, css, text):
    """Open the Vuetify select ``css`` (a click on its field, as a user does) and click the item ``text`` starts."""
    field = _input(driver, css).find_element("xpath", "./ancestor::div[contains(@class, 'v-field')][1]")
    field.click()
    items = _wait(driver, lambda d: [e for e in d.find_elements("css selector", ".v-overlay .v-list-item")
                                     if e.is_displayed() and e.text.startswith(text)])
    items[0].click()


def _decode_coords(driver, text):
    from selenium.webdriver.common.keys import Keys

    field = _input(driver, "#coords")
    field.send_keys(Keys.CONTROL, "a")  # replace what is there
    field.send_keys(Keys.DELETE)
    field.send_keys(text)
    return _result(driver, driver.find_element("css selector", "#decode-coords").click)


def test_page_draws_the_2d_landscape_like_the_reference(server, browser, tmp_path):
    _, url, tunnel = server
    assert "ssh -N -L" in tunnel and url.rstrip("/").rsplit(":", 1)[1] in tunnel  # the SSH-tunnel line
    browser.get(url)
    _wait(browser, _drawn)
    time.sleep(2)  # the still render after the first interactive-quality image
    img = _view_image(browser)
    if os.environ.get("GLOBSCOPE_UPDATE_REFERENCES"):
        from PIL import Image

        os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(REFERENCE)
    from PIL import Image

    ref = np.asarray(Image.open(REFERENCE).convert("RGB"), np.float64)
    assert img.shape == ref.shape, (img.shape, ref.shape)
    a, b = _small(img), _small(ref)
    # same picture up to renderer noise: mean difference below 4% of the range, few pixels far off
    assert np.abs(a - b).mean() < 10, np.abs(a - b).mean()
    assert (np.abs(a - b).max(2) > 80).mean() < 0.03
    # the viridis surface is there: blue-green and yellow pixels, not only the white page and grey fading
    viridis = (img[..., 1] > img[..., 0] + 30) & (img[..., 1] > 80)
    assert viridis.mean() > 0.01, viridis.mean()
    assert "Runs" in browser.find_element("css selector", "body").text


def test_basin_pick_reports_the_decoded_models_loss_and_offers_it(server, browser, study):
    from safetensors.torch import load_file

    from globscope_core.networks.models import build_model
    from globscope_core.storage.study import Study

    _, url, _ = server
    browser.get(url)
    _wait(browser, _drawn)
    basins = json.loads(run_cli("decode", study, "--basins", "--json")[1])
    _choose(browser, "#basin", f"{basins[0]['node']}:")
    text = _result(browser, browser.find_element("css selector", "#decode-basin").click)
    want = _cli_decode(study, "--basin", str(basins[0]["node"]))
    assert f"the minimum of basin {basins[0]['node']}" in text, text
    shown = float(browser.find_element("css selector", "#loss").text)
    assert shown == pytest.approx(want["loss"], rel=1e-5)  # six significant digits on the page
    assert float(browser.find_element("css selector", "#landscape-loss").text) == pytest.approx(
        want["landscape_loss"], rel=1e-5)
    href = browser.find_element("css selector", "#download").get_attribute("href")
    with urllib.request.urlopen(href, timeout=30) as resp:
        data = resp.read()
    path = os.path.join(study, "..", "downloaded.safetensors")
    with open(path, "wb") as fh:
        fh.write(data)
    model = build_model(Study.open(study).model_spec)
    model.load_state_dict(load_file(path))  # strict: the whole state_dict
    cli = load_file(os.path.join(study, "..", "cli.safetensors"))
    got = load_file(path)
    assert all(np.array_equal(got[k].numpy(), cli[k].numpy()) for k in cli)


def test_a_click_on_the_view_decodes_the_point_under_it(server, browser, study):
    from selenium.webdriver import ActionChains

    _, url, _ = server
    browser.get(url)
    _wait(browser, _drawn)
    view = browser.find_element("css selector", "#view")
    text = _result(browser, ActionChains(browser).move_to_element(view).click().perform)  # mid-surface
    m = re.search(r"at \(([-\d.e+]+), ([-\d.e+]+)\)", text)
    assert m, text
    want = _cli_decode(study, f"--at={m.group(1)},{m.group(2)}")
    assert float(browser.find_element("css selector", "#loss").text) == pytest.approx(want["loss"], rel=1e-4)


def test_bad_input_is_a_message_in_the_page_and_the_server_goes_on(server, browser, study):
    _, url, _ = server
    browser.get(url)
    _wait(browser, _drawn)
    assert "outside the landscape's grid" in _decode_coords(browser, "1000, 0")
    assert "is not 2 numbers" in _decode_coords(browser, "abc")
    assert "2 numbers are needed" in _decode_coords(browser, "1, 2, 3")
    f = _cli_decode(study, "--basin", "0")["at"]
    text = _decode_coords(browser, f"{f[0]!r}, {f[1]!r}")  # a good point after the bad ones
    assert float(browser.find_element("css selector", "#loss").text) > 0, text
    assert server[0].poll() is None


def test_3d_view_and_its_basins(server, browser, study):
    _, url, _ = server
    browser.get(url)
    _wait(browser, _drawn)
    before = _view_image(browser)
    _choose(browser, "#view-select", "3D landscape")
    # the 3D view is mostly white (a translucent volume, thin tubes): it is drawn when the picture has changed
    _wait(browser, lambda d: np.abs(_small(_view_image(d)) - _small(before)).mean() > 3)
    basins = json.loads(run_cli("decode", study, "--dim", "3", "--basins", "--json")[1])
    at = basins[0]["at"]
    _decode_coords(browser, ", ".join(repr(v) for v in at))
    want = _cli_decode(study, "--at=" + ",".join(repr(v) for v in at))
    assert want["dim"] == 3
    assert float(browser.find_element("css selector", "#loss").text) == pytest.approx(want["loss"], rel=1e-5)


def test_an_unknown_study_is_a_message_and_the_other_study_is_offered(server, browser, other):
    from selenium.webdriver.common.keys import Keys

    _, url, _ = server
    browser.get(url)
    _wait(browser, lambda d: _view_image(d).std() > 5)  # whichever view the session shows now (3D: mostly white)
    field = _input(browser, "#study-select")
    browser.execute_script("arguments[0].select()", field)
    text = _result(browser, lambda: field.send_keys("nosuch", Keys.ENTER))
    assert "unknown study" in text and "nosuch" in text and "other" in text, text
    assert server[0].poll() is None
    _choose(browser, "#study-select", "other")
    _wait(browser, lambda d: _input(d, "#study-select").get_attribute("value") == "other")

    def view_items(d):  # the view menu's entries (the server sends the new study's views a moment later)
        _input(d, "#view-select").find_element("xpath", "./ancestor::div[contains(@class, 'v-field')][1]").click()
        items = _wait(d, lambda d: [e.text for e in d.find_elements("css selector", ".v-overlay .v-list-item")
                                    if e.is_displayed()])
        d.find_element("css selector", "body").send_keys(Keys.ESCAPE)
        time.sleep(0.5)
        return items if "3D landscape" not in items else None
    views = _wait(browser, view_items, 60)
    assert "2D landscape" in views, views
    at = _cli_decode(other, "--basin", "1")["at"]
    _decode_coords(browser, f"{at[0]!r}, {at[1]!r}")
    assert float(browser.find_element("css selector", "#loss").text) == pytest.approx(
        _cli_decode(other, f"--at={at[0]!r},{at[1]!r}")["loss"], rel=1e-5)


def test_serve_refuses_bad_studies_in_one_line(tmp_path, study):
    rc, _, err = run_cli("serve", tmp_path / "nowhere")
    one_line_error(rc, err, "does not exist")
    empty = tmp_path / "empty"
    shutil.copytree(study, empty, ignore=shutil.ignore_patterns("landscape-*", "topology-*", "trajectories-*"))
    rc, _, err = run_cli("serve", empty)
    one_line_error(rc, err, "no landscape")
    rc, _, err = run_cli("serve", study, "--port", "70000")
    one_line_error(rc, err, "--port", "0 to 65535")
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, err = run_cli("serve", study, "--port", "0", "--out", blocker / "decoded")  # a folder under a file
    one_line_error(rc, err, "not writable", "serve not started")
