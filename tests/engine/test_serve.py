"""``segrank serve``: concurrent uploads on loopback (good, broken and oversized ones) all answered correctly while the
server keeps serving; and the page end to end in a real headless Chromium: a bad file shows its error, an image shows
its overlay, legend and class ranking, and the screenshot holds the legend's colours."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segrank
from segrank.engine.serve import PredictionServer
from tests.engine.devtools import Chromium, find_chromium
from tests.engine.test_predictor import photo, tiny  # noqa: F401 - photo is a fixture
from tests.reliability.common import run_cli, segrank_process, voc_photo

LIMIT = 1_000_000  # bytes


@pytest.fixture
def server():
    model = tiny()
    model.inference.palette = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                               [145, 30, 180], [70, 240, 240]]
    server = PredictionServer(("127.0.0.1", 0), segrank.Predictor(model), LIMIT, "tiny test model", log=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def request(server: PredictionServer, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | str]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        connection.request(method, path, body=body, headers={"X-Filename": "upload.png"} if body else {})
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()
    finally:
        connection.close()


def test_concurrent_uploads_good_and_bad(server, photo):  # noqa: F811 - the fixture
    crops = [np.ascontiguousarray(photo[i * 5:i * 5 + 40, i * 7:i * 7 + 60]) for i in range(4)]
    expected = [server.predictor.predict_rgb(c) for c in crops]
    jobs = [("good", i) for i in range(4)] * 3 + [("garbage", 0)] * 3 + [("large", 0)] * 2 + [("page", 0), ("404", 0)]
    bodies = {"garbage": b"this is not an image", "large": b"\x89PNG" + bytes(LIMIT + 10)}

    def run(job):
        kind, i = job
        if kind == "good":
            return job, request(server, "POST", "/api/predict", png(crops[i]))
        if kind in bodies:
            return job, request(server, "POST", "/api/predict", bodies[kind])
        return job, request(server, "GET", "/" if kind == "page" else "/nothing")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    for (kind, i), (status, reply) in results:
        if kind == "good":
            assert status == 200 and reply["legend"] == expected[i].legend() and reply["width"] == 60
            assert reply["image"].startswith("data:image/jpeg;base64,") and len(reply["ranking"]) == 7
            color = Image.open(io.BytesIO(base64.b64decode(reply["color"].split(",", 1)[1])))
            assert np.array_equal(np.array(color), np.array(expected[i].colorize()))
        elif kind == "garbage":
            assert status == 400 and reply["error"].startswith("upload.png: not a readable image")
        elif kind == "large":
            assert status == 413 and "larger than the limit of 0.954 MiB" in reply["error"]
        elif kind == "page":
            assert status == 200 and "tiny test model" in reply and "ViT 32d x 1" in reply
        else:
            assert status == 404
    assert request(server, "POST", "/api/predict", b"")[0] == 400
    status, reply = request(server, "POST", "/api/predict", png(crops[0]))
    assert status == 200 and reply["legend"] == expected[0].legend()  # still serving after every bad request


def test_serve_refuses_a_port_in_use(server, tmp_path, capsys):
    checkpoint = segrank.save_model(tiny(), tmp_path / "m.safetensors")
    code, _, err = run_cli(["serve", checkpoint, "--port", server.server_address[1]], capsys)
    assert code == 2 and "cannot listen" in err and err.count("\n") == 1


def test_serve_command_starts_answers_and_stops_on_ctrl_c(tmp_path):
    checkpoint = segrank.save_model(tiny(), tmp_path / "m.safetensors")
    process = segrank_process(["serve", checkpoint, "--port", "0"])
    try:
        line = process.stdout.readline()
        assert line.startswith("segrank serve: m.safetensors on http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" on ")[1].split()[0]
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.status == 200 and b"m.safetensors" in response.read()
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "segrank serve: stopped" in out, err


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install -y chromium)")
def test_page_in_a_headless_browser(server, photo, tmp_path):  # noqa: F811 - the fixture
    Image.fromarray(voc_photo()[0]).save(tmp_path / "street.jpg", quality=90)  # 375 x 500
    (tmp_path / "notes.png").write_text("not a picture\n")
    expected = server.predictor(tmp_path / "street.jpg").legend()
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        page = browser.page()
        page.call("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=server.url)
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        assert page.evaluate("document.querySelector('header h1').textContent") == "tiny test model"

        def choose(path: Path) -> None:
            root = page.call("DOM.getDocument")["root"]["nodeId"]
            node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            page.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

        choose(tmp_path / "notes.png")
        page.wait_for("document.body.dataset.state === 'error'")
        status = page.evaluate("document.getElementById('status').textContent")
        assert status.startswith("Error 400: notes.png: not a readable image"), status
        choose(tmp_path / "street.jpg")
        page.wait_for("document.body.dataset.state === 'done' && [...document.querySelectorAll('#stack img')]"
                      ".every(img => img.complete && img.naturalWidth === 500)")
        legend = page.evaluate("[...document.querySelectorAll('#legend li')].map(li => [li.querySelector('.name')"
                               ".textContent, getComputedStyle(li.querySelector('.swatch')).backgroundColor])")
        assert [name for name, _ in legend] == [c["name"] for c in expected]
        colors = [tuple(int(c["color"][i:i + 2], 16) for i in (1, 3, 5)) for c in expected]
        assert [swatch for _, swatch in legend] == [f"rgb({r}, {g}, {b})" for r, g, b in colors]
        ranked = page.evaluate("[...document.querySelectorAll('#ranking tr td.name')].map(td => td.textContent)")
        assert sorted(ranked) == sorted(server.predictor.settings.class_names)
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        page.close()
    finally:
        browser.close()
    (tmp_path / "serve.png").write_bytes(shot)
    if os.environ.get("SEGRANK_SCREENSHOT"):  # keep it to look at
        shutil.copy(tmp_path / "serve.png", os.environ["SEGRANK_SCREENSHOT"])
    pixels = np.array(Image.open(tmp_path / "serve.png").convert("RGB"))
    assert pixels.shape == (900, 1200, 3)
    flat = pixels.reshape(-1, 3).astype(int)
    for color in colors:  # every legend swatch (22 x 16 pixels) is drawn in its class colour
        assert np.all(np.abs(flat - color) <= 2, axis=1).sum() >= 200, color
    assert len(np.unique(flat, axis=0)) > 1000  # the photo overlay, not a blank page
