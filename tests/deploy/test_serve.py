"""``segrank serve``: concurrent uploads on loopback (good, broken and oversized ones) all answered correctly while the
server keeps serving; and the page end to end in a real headless Chromium: a bad file shows its error, an image shows
its overlay, legend and class ranking, and the screenshot holds the legend's colours."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segrank
from segrank.deploy.serve import PredictionServer
from tests.deploy.devtools import Chromium, find_chromium
from tests.inference.test_predictor import photo, tiny  # noqa: F401 - photo is a fixture
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
    jobs += [("truncated", 0)] * 2
    whole = png(crops[0])
    bodies = {"garbage": b"this is not an image", "large": b"\x89PNG" + bytes(LIMIT + 10),
              "truncated": whole[:len(whole) // 2]}

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
        elif kind == "truncated":  # a PNG header, then the data stops: Pillow fails while decoding
            assert status == 400 and reply["error"].startswith("upload.png: not a readable image (")
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
        line = process.stdout.readline()  # the address first, whatever notes follow it
        assert line.startswith("segrank serve: m.safetensors on http://127.0.0.1:"), line
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


# --- limits under load, hostile uploads, stopping ------------------------------------------------------------------


@contextlib.contextmanager
def running(server: PredictionServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def slow_predictor(seconds: float) -> segrank.Predictor:
    """The tiny model, each forward pass held ``seconds`` longer (a stand-in for a large model)."""
    predictor = segrank.Predictor(tiny())
    forward = predictor.forward

    def slow(image, size):
        time.sleep(seconds)
        return forward(image, size)

    predictor.forward = slow
    return predictor


def post(server: PredictionServer, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict, http.client.HTTPResponse]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        connection.request("POST", "/api/predict", body=body, headers=headers or {"X-Filename": "upload.png"})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response
    finally:
        connection.close()


def test_fifty_concurrent_uploads_are_answered_200_or_503(photo):  # noqa: F811 - the fixture
    """A listen backlog and a bounded queue: a burst of 50 uploads gets answers, never a reset connection; those
    beyond the 2 running and 4 waiting get 503 with Retry-After."""
    server = PredictionServer(("127.0.0.1", 0), slow_predictor(0.3), LIMIT, "busy", log=False, workers=2, queue=4)
    body = png(photo)
    start = threading.Barrier(50)

    def upload(_):
        start.wait()
        status, reply, response = post(server, body)
        return status, reply, response.getheader("Retry-After")

    with running(server), ThreadPoolExecutor(50) as pool:
        results = list(pool.map(upload, range(50)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 503}, statuses
    assert 6 <= statuses.count(200) < 50
    for status, reply, retry_after in results:
        if status == 503:
            assert retry_after == "2" and reply["error"] == "the server is busy with other uploads; try again shortly"
        else:
            assert reply["width"] == 100 and reply["legend"]


def test_a_large_upload_is_segmented_at_the_size_shown(photo):  # noqa: F811 - the fixture
    """The labels of a 3000 x 2000 upload are made at 1600 x 1067 (what the page shows), from the model input of the
    full image: its cost stays that of a small upload and other uploads do not wait long behind it."""
    from segrank.inference import windows

    large = np.asarray(Image.fromarray(photo).resize((3000, 2000), Image.Resampling.BILINEAR))
    server = PredictionServer(("127.0.0.1", 0), segrank.Predictor(tiny()), 40 * 2**20, "large", log=False)
    sizes = []
    predict_image = windows.predict_image
    with running(server), pytest.MonkeyPatch.context() as patch:
        patch.setattr("segrank.inference.predictor.predict_image",
                      lambda model, image, size, *args, **kw: sizes.append(size) or predict_image(model, image, size,
                                                                                                  *args, **kw))
        status, reply, _ = post(server, png(large))
    assert status == 200 and (reply["width"], reply["height"]) == (3000, 2000)
    assert (reply["shown_width"], reply["shown_height"]) == (1600, 1067) and sizes == [(1067, 1600)]
    color = Image.open(io.BytesIO(base64.b64decode(reply["color"].split(",", 1)[1])))
    assert color.size == (1600, 1067)
    expected = server.predictor.postprocess(
        server.predictor.forward(server.predictor.preprocess(large), (1067, 1600)),
        np.asarray(Image.fromarray(large).resize((1600, 1067), Image.Resampling.BILINEAR)))
    assert np.array_equal(np.array(color), np.array(expected.colorize()))


def multipart(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "segrank-test-boundary"
    body = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_multipart_upload_is_accepted_and_other_formats_refused(server, photo):  # noqa: F811 - the fixture
    """curl -F file=@photo.png works; a GIF or an EPS file (Pillow reads both; EPS runs Ghostscript) is refused with
    what to send instead."""
    expected = server.predictor.predict_rgb(photo).legend()
    body, kind = multipart([("note", None, b"hello"), ("file", "photo.png", png(photo))])
    status, reply, _ = post(server, body, {"Content-Type": kind})
    assert status == 200 and reply["name"] == "photo.png" and reply["legend"] == expected
    gif = io.BytesIO()
    Image.fromarray(photo).save(gif, format="GIF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    for data, name in ((gif.getvalue(), "photo.gif"), (eps, "drawing.eps")):
        status, reply, _ = post(server, data, {"X-Filename": name})
        assert status == 400 and reply["error"] == (
            f"{name}: not a readable image (send a PNG, JPEG, WebP, BMP or TIFF file as the request body, or as a "
            "form field (curl -F file=@photo.jpg))")
    body, kind = multipart([("note", None, b"hello"), ("other", None, b"there")])
    status, reply, _ = post(server, body, {"Content-Type": kind})
    assert status == 400 and reply["error"].startswith("a form without a file: send a PNG")


def test_damaged_exif_upload_is_read_without_orientation(server, photo):  # noqa: F811 - the fixture
    from tests.reliability.bad_images_and_models import damaged_exif_jpeg

    with pytest.warns(UserWarning, match="upload.png: damaged EXIF metadata"):
        status, reply, _ = post(server, damaged_exif_jpeg(photo))
    assert status == 200 and (reply["width"], reply["height"]) == (100, 70)  # as stored, not turned


def test_a_client_leaving_early_costs_one_log_line(photo, capsys):  # noqa: F811 - the fixture
    server = PredictionServer(("127.0.0.1", 0), slow_predictor(0.5), LIMIT, "leaving", log=True)
    body = png(photo)
    with running(server):
        capsys.readouterr()
        client = socket.create_connection(server.server_address[:2], timeout=30)
        client.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                       + b"\r\n\r\n" + body)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset before the answer: the server's write fails
        deadline = time.monotonic() + 30
        while "closed the connection early" not in capsys.readouterr().err and time.monotonic() < deadline:
            time.sleep(0.1)
        status, _, _ = post(server, body)  # still serving
        err = capsys.readouterr().err
    assert status == 200 and "Traceback" not in err, err


def test_stopping_closes_idle_keep_alive_connections_and_ends_their_threads():
    """A client that keeps its HTTP/1.1 connection open after its answer must not leave a handler thread alive
    (waiting for the next request) when a stopped server's process shuts down."""
    server = PredictionServer(("127.0.0.1", 0), segrank.Predictor(tiny()), LIMIT, "idle", log=False)
    with running(server):
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.request("GET", "/")
        assert connection.getresponse().read()  # answered; the connection stays open
        handlers = list(server.connections)
        assert len(handlers) == 1 and handlers[0].is_alive()
        server.stopping.set()
        start = time.monotonic()
        server.finish_in_flight(grace_s=20)
        assert time.monotonic() - start < 10  # the idle connection was closed, not waited out
        assert not handlers[0].is_alive() and not server.connections
        connection.close()


def test_ctrl_c_with_a_prediction_in_flight_answers_it_and_exits_cleanly(tmp_path):
    """SIGINT while a slow request is in the model: the request is answered, then the server exits 0 with one line
    (no 'terminate called without an active exception', no SIGABRT)."""
    model = tiny()
    checkpoint = segrank.save_model(model, tmp_path / "m.safetensors")
    # An 800 x 800 test scale of 32-pixel windows: several seconds in the model
    process = segrank_process(["serve", checkpoint, "--port", "0", "--img-scale", "800", "800"])
    answer: dict = {}
    try:
        line = process.stdout.readline()
        assert " on http://127.0.0.1:" in line, line  # the address first, whatever notes follow it
        host, port = line.split(" on http://")[1].split("/")[0].split(":")
        body = png(voc_photo()[0][:200, :200])

        def upload():
            connection = http.client.HTTPConnection(host, int(port), timeout=300)
            connection.request("POST", "/api/predict", body=body, headers={"X-Filename": "slow.png"})
            response = connection.getresponse()
            answer["status"], answer["reply"] = response.status, json.loads(response.read())

        thread = threading.Thread(target=upload)
        thread.start()
        time.sleep(1.5)  # the upload (40 kB) is read and decoded; the model is running
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
        thread.join(60)
    finally:
        if process.poll() is None:
            process.kill()
    assert answer.get("status") == 200 and answer["reply"]["name"] == "slow.png", (answer, err)
    assert process.returncode == 0, (process.returncode, err)
    assert out.strip().splitlines()[-1] == "segrank serve: stopped", out
    assert "terminate called" not in err and "Traceback" not in err, err
