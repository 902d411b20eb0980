"""`sd4match serve`: the API in-process, and the page end to end in headless Chromium.

The browser test needs Debian's chromium and chromedriver (`.ci/run` installs them). Where
they are absent it skips, unless SD4MATCH_REQUIRE_BROWSER=1 (set by `.ci/run`) makes that a failure.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sd4match.cli import main
from sd4match.testing import tiny_sd

pytest.importorskip("fastapi")
MODEL_ARGS = ["--resolution", "64", "--ensemble", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture
def willow_pair(willow_root):
    d = willow_root / "PF-dataset" / "car(G)"
    return d / "Cars_006a.png", d / "Cars_007a.png"


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    from fastapi.testclient import TestClient

    from sd4match.features import load_featurizer
    from sd4match.serve import create_app
    from sd4match.usermatch import Matcher

    examples = tmp_path_factory.mktemp("examples")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(examples / "green.png")
    (examples / "sub").mkdir()
    Image.new("RGB", (30, 40), (200, 10, 30)).save(examples / "sub" / "red.png")
    matcher = Matcher(load_featurizer(str(tiny), resolution=64, ensemble=1))
    app = create_app(matcher, images=examples, max_upload_bytes=300_000, max_pixels=1_000_000)
    with TestClient(app) as c:
        c.matcher = matcher
        yield c


def _upload(client, path, name=None):
    with open(path, "rb") as fh:
        return client.post("/api/images", files={"file": (name or path.name, fh)})


def test_api_match_equals_the_library(client, willow_pair):
    from sd4match.usermatch import open_image

    a, b = (_upload(client, p).json() for p in willow_pair)
    assert a["size"] == [300, 200] and b["size"] == [300, 225]
    assert client.post("/api/prepare", json={"a": a["id"], "b": b["id"]}).json()["cached"] is False
    assert client.post("/api/prepare", json={"a": a["id"], "b": b["id"]}).json()["cached"] is True
    r = client.post("/api/match", json={"a": a["id"], "b": b["id"], "x": 100.004, "y": 50.5}).json()
    assert r["source"] == [100.0, 50.5]  # the click is rounded to 0.01 px, as matches.json reports points
    want = client.matcher.match_points(open_image(willow_pair[0]), open_image(willow_pair[1]), [("click", (100.0, 50.5))])[0]
    assert r["target"] == want["target"] and r["score"] == want["score"]
    assert r["heatmap"].startswith("data:image/png;base64,") and r["similarity_range"][1] == pytest.approx(r["score"], abs=1e-3)
    png = client.get(f"/api/images/{b['id']}")
    assert png.headers["content-type"] == "image/png"
    import io

    assert Image.open(io.BytesIO(png.content)).size == (300, 225)


def test_api_rejects_bad_uploads(client, tmp_path, willow_pair):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = _upload(client, bad)
    assert r.status_code == 400 and r.json() == {"error": "notes.txt: not a readable image (unknown or corrupt format)"}
    one = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(one)
    assert "1x1 pixels, too small" in _upload(client, one).json()["error"]
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000)).save(big)  # 2 megapixels, small file
    r = _upload(client, big)
    assert r.status_code == 400 and r.json()["error"] == "big.png: image is 2000x1000 = 2.0 megapixels, over the 1 megapixel limit"
    heavy = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(heavy)  # ~480 kB
    r = _upload(client, heavy)
    assert r.status_code == 413 and "over the 0.3 MB limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(100):
            yield b"x" * 10_000

    r = client.post("/api/images", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.request.headers.get("content-length") is None
    assert r.status_code == 413 and "over the 0.3 MB limit" in r.json()["error"]
    a = _upload(client, willow_pair[0]).json()
    r = client.post("/api/match", json={"a": a["id"], "b": a["id"], "x": 301, "y": 5})
    assert r.status_code == 400 and r.json()["error"] == "point click (301, 5) lies outside Cars_006a.png (300x200 pixels)"
    assert client.post("/api/match", json={"a": "nope", "b": a["id"], "x": 1, "y": 1}).status_code == 404


def test_api_examples(client):
    cfg = client.get("/api/config").json()
    assert cfg["examples"] == ["green.png", "sub/red.png"] and cfg["rule"] == "kernel-softargmax"
    r = client.post("/api/examples/sub/red.png").json()
    assert r["size"] == [30, 40] and r["name"] == "red.png"
    assert client.post("/api/examples/../secret").status_code == 404
    assert "<canvas id=\"canvas-a\"" in client.get("/").text


# -- the page in a real browser ----------------------------------------------------------------


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not (chromium and driver):
        why = "headless Chromium test needs chromium, chromedriver and selenium (.ci/run installs them)"
        if os.environ.get("SD4MATCH_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tiny, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sd4match", "serve", "--model", str(tiny), *MODEL_ARGS, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "api/config", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.close()
            pytest.fail("sd4match serve did not start:\n" + (tmp_path / "serve.log").read_text()[-3000:])
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(chromedriver), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_page_in_headless_chromium_shows_the_cli_match(server, browser, willow_pair, tiny, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert "tiny" in browser.find_element(By.ID, "settings").text or str(tiny) in browser.find_element(By.ID, "settings").text

    # a non-image is refused with its message on the page
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    browser.find_element(By.ID, "file-a").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert "notes.txt: not a readable image" in browser.find_element(By.ID, "status").text

    a, b = willow_pair
    browser.find_element(By.ID, "file-a").send_keys(str(a))
    wait.until(lambda d: d.find_element(By.ID, "canvas-a").get_attribute("data-image-id"))
    browser.find_element(By.ID, "file-b").send_keys(str(b))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    assert browser.find_element(By.ID, "status").text.startswith("Ready (features extracted in")

    canvas = browser.find_element(By.ID, "canvas-a")
    assert (canvas.size["width"], canvas.size["height"]) == (600, 400)  # 300 x 200 shown at twice the size
    ActionChains(browser).move_to_element_with_offset(canvas, -173, -61).click().perform()
    wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-target"))
    res = browser.find_element(By.ID, "result")
    sx, sy = map(float, res.get_attribute("data-source").split(","))
    # the click landed where it was aimed: 127 px right of the left edge, 139 px below the top, at scale 2
    assert abs(sx - 63.5) <= 1.0 and abs(sy - 69.5) <= 1.0
    shown = res.get_attribute("data-target")
    assert res.text.startswith(f"A → B: ({sx:.2f}, {sy:.2f}) → ({shown.replace(',', ', ')})")

    out = tmp_path / "cli"
    assert main(["match", str(a), str(b), "--points", f"{sx:.2f},{sy:.2f}", "--model", str(tiny), *MODEL_ARGS, "--out", str(out)]) == 0
    cli = json.loads((out / "matches.json").read_text())["matches"][0]
    assert shown == f"{cli['target'][0]:.2f},{cli['target'][1]:.2f}"
    assert res.get_attribute("data-score") == f"{cli['score']:.4f}" and res.get_attribute("data-cycle") == f"{cli['cycle']:.3f}"

    # the heat map is drawn over image B: its canvas is no longer the plain picture
    png = browser.find_element(By.ID, "canvas-b").screenshot_as_png
    assert len(png) > 1000


def test_page_opens_with_two_pictures_and_shows_a_colour_bar(tiny, tmp_path, willow_pair, browser):
    """serve --images DIR: the first screen shows two of its pictures (not two empty boxes); a
    click draws the heat map over the other picture with its colour bar and cosine range."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pics = tmp_path / "pics"
    pics.mkdir()
    for p in willow_pair:
        (pics / p.name).write_bytes(p.read_bytes())
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sd4match", "serve", "--model", str(tiny), *MODEL_ARGS, "--port", str(port), "--images", str(pics)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "api/config", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.3)
        wait = WebDriverWait(browser, 120)
        browser.get(url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        assert browser.find_element(By.ID, "canvas-a").get_attribute("data-image-id")
        assert browser.find_element(By.ID, "canvas-b").get_attribute("data-image-id")
        assert not browser.find_element(By.ID, "colorbar-b").is_displayed()
        ActionChains(browser).move_to_element(browser.find_element(By.ID, "canvas-a")).click().perform()
        wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-target"))
        bar = browser.find_element(By.ID, "colorbar-b")
        assert bar.is_displayed() and not browser.find_element(By.ID, "colorbar-a").is_displayed()
        lo, hi = (float(bar.find_element(By.CLASS_NAME, c).text) for c in ("lo", "hi"))
        assert -1 <= lo < hi <= 1
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_a_taken_port_or_a_foreign_host_is_one_line_before_the_model_loads(tmp_path, capsys):
    """The page's address is checked before any model loads: a port another program listens
    on, a host that is not this machine's, a port out of range."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        missing = ["--model", str(tmp_path / "no-such-model")]  # reached only after the address is checked
        assert main(["serve", *missing, "--port", str(port)]) == 2
        assert capsys.readouterr().err.strip() == (f"sd4match: error: 127.0.0.1:{port}: cannot listen there (Address already in use); "
                                                   "choose another --port")
    assert main(["serve", *missing, "--host", "192.0.2.1", "--port", str(port)]) == 2  # TEST-NET-1: no machine's own address
    assert capsys.readouterr().err.strip() == (f"sd4match: error: 192.0.2.1:{port}: cannot listen there (Cannot assign requested address); "
                                               "check --host and --port")
    with pytest.raises(SystemExit):
        main(["serve", *missing, "--port", "70000"])
    assert "argument --port: 70000 must be at most 65535" in capsys.readouterr().err


def test_an_images_folder_without_pictures_is_named_before_the_model_loads(tmp_path, capsys):
    """--images naming a folder with no pictures (a typo'd subfolder) is refused at once;
    before, the model loaded and the page opened with nothing to show."""
    from sd4match.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--images", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == (f"sd4match: error: --images {tmp_path / 'empty'}: no images found "
                                               "(looked for .jpg, .jpeg, .png, .bmp, .webp, .tif)")
