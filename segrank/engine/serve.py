"""``segrank serve``: a local web page to try a model, on the standard library's HTTP server.

``GET /`` is the page (resources/serve.html): drop or choose an image, see the overlay, the legend of the classes
found and, for RankSeg, the image-level class ranking. ``POST /api/predict`` takes the image file as the request body
and answers JSON. Uploads are bounded in bytes and pixels; a bad upload is answered 400/413 with a message and the
server keeps serving. Requests are handled in threads; the model runs one image at a time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote

from PIL import Image

from segrank.checkpoints import describe
from segrank.engine.images import IMAGE_ERRORS, pil_to_rgb
from segrank.engine.prediction import Prediction
from segrank.engine.predictor import Predictor
from segrank.errors import SegrankError

MAX_PIXELS = 40_000_000  # an upload decoding to more pixels is refused before it is decoded
DISPLAY_SIDE = 1600  # the pictures sent back are at most this long a side (the labels are computed at full size)
RANKING_ROWS = 20
DRAIN_LIMIT = 2**28  # a refused upload up to this size is read to its end (see PredictionHandler.discard)


class UploadError(Exception):
    """An upload that cannot be segmented: answered with ``status`` and the message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class PredictionServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client cannot keep the process alive at shutdown

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_upload_bytes: int, title: str,
                 log: bool = True) -> None:
        super().__init__(address, PredictionHandler)
        self.predictor, self.max_upload_bytes, self.log = predictor, max_upload_bytes, log
        self.model_lock = threading.Lock()  # one image in the model at a time: memory stays that of one image
        page = resources.files("segrank").joinpath("resources", "serve.html").read_text()
        self.page = (page.replace("__TITLE__", html.escape(title))
                     .replace("__MODEL__", html.escape(describe(predictor.model)))
                     .replace("__MAX_MB__", f"{max_upload_bytes / 2**20:.3g}")
                     .replace("__MAX_BYTES__", str(max_upload_bytes))).encode()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class PredictionHandler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a silent connection is kept

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.path in ("/", "/index.html"):
            self.reply(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        else:
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: not found"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/predict":
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: not found"})
            return
        try:
            body = self.read_upload()
            name = unquote(self.headers.get("X-Filename", "")) or None
            prediction, seconds = self.segment(body, name)
        except UploadError as err:
            self.reply_json(err.status, {"error": str(err)})
            return
        except Exception as err:  # noqa: BLE001 - a failure on one image must not end the server
            self.reply_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})
            return
        self.reply_json(HTTPStatus.OK, result_json(prediction, seconds))

    def read_upload(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "the upload needs a Content-Length")
        size, limit = int(length), self.server.max_upload_bytes
        if size > limit:
            self.discard(size)
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"upload of {size / 2**20:.3g} MiB is larger than the limit of {limit / 2**20:.3g} MiB")
        if size == 0:
            raise UploadError(HTTPStatus.BAD_REQUEST, "empty upload: send an image file")
        return self.rfile.read(size)

    def discard(self, size: int) -> None:
        """Read and drop a refused body, so that the client, still sending, receives the answer rather than a reset
        connection; a body too large even for that is left unread and the connection closed."""
        if size > DRAIN_LIMIT:
            self.close_connection = True
            return
        while size > 0:
            chunk = self.rfile.read(min(size, 2**16))
            if not chunk:
                break
            size -= len(chunk)

    def segment(self, body: bytes, name: str | None) -> tuple[Prediction, float]:
        try:
            with Image.open(io.BytesIO(body)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UploadError(HTTPStatus.BAD_REQUEST, f"image of {img.width}x{img.height} pixels is larger "
                                                              f"than the limit of {MAX_PIXELS / 1e6:g} megapixels")
                rgb = pil_to_rgb(img)
        except IMAGE_ERRORS as err:
            what = name or "upload"
            raise UploadError(HTTPStatus.BAD_REQUEST, f"{what}: not a readable image ({err})") from None
        start = time.perf_counter()
        try:
            with self.server.model_lock:
                prediction = self.server.predictor.predict_rgb(rgb, name)
        except SegrankError as err:
            raise UploadError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return prediction, time.perf_counter() - start

    def reply_json(self, status: HTTPStatus, value: dict[str, Any]) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json")

    def reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            sys.stderr.write(f"segrank serve: {self.address_string()} {format % args}\n")


def result_json(prediction: Prediction, seconds: float) -> dict[str, Any]:
    """What the page shows: the image and its colour map (data URLs the page lays over each other), the legend and
    the top of the RankSeg ranking."""
    height, width = prediction.label.shape
    scale = min(1.0, DISPLAY_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    photo = Image.fromarray(prediction.image).resize(size, Image.Resampling.BILINEAR)
    color = prediction.colorize().resize(size, Image.Resampling.NEAREST)  # class borders stay sharp
    return {
        "name": prediction.source, "width": width, "height": height, "seconds": round(seconds, 3),
        "image": data_url(photo, "JPEG"), "color": data_url(color, "PNG"),
        "legend": prediction.legend(),
        "ranking": None if prediction.ranking is None else prediction.ranking[:RANKING_ROWS],
        "topk": prediction.topk,
    }


def data_url(image: Image.Image, format: str) -> str:  # noqa: A002 - Pillow's name for it
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": 90} if format == "JPEG" else {}))
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def serve(predictor: Predictor, host: str, port: int, max_upload_mb: float, title: str) -> None:
    """Serve until interrupted (Ctrl+C)."""
    try:
        server = PredictionServer((host, port), predictor, int(max_upload_mb * 2**20), title)
    except OSError as err:
        raise SegrankError(f"{host}:{port}: cannot listen ({err.strerror})") from None
    print(f"segrank serve: {title} on {server.url} (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("segrank serve: stopped", flush=True)
    finally:
        server.server_close()
