"""``segrank serve``: a local web page to try a model, on the standard library's HTTP server.

``GET /`` is the page (resources/serve.html): drop or choose an image, see the overlay, the legend of the classes
found and, for RankSeg, the image-level class ranking. ``POST /api/predict`` takes the image file as the request body
(or a multipart form's file field, uploads.py) and answers JSON. Uploads are bounded in bytes, pixels and formats; a
bad upload is answered 400/413 with a message and the server keeps serving.

Limits that keep it answering under load: connections wait in a listen backlog of ``BACKLOG``; at most ``workers``
uploads are decoded and segmented at once (the memory of that many images) and at most ``queue`` more wait for a
turn; beyond that an upload is answered 503 with ``Retry-After``, never a reset connection. The model input is made
from the full image (as ``segrank predict`` makes it), but the labels at the size the page shows (at most
``DISPLAY_SIDE`` a side), so that a 40-megapixel upload costs about what a small one does; and as the model is only
read while it segments (its modules hold no state), the uploads that have a turn run side by side: a small one is not
kept waiting behind a large one. Ctrl+C lets the predictions in flight finish and answer, then stops (a second Ctrl+C
stops at once); a client that leaves early costs one log line.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote

import numpy as np
from PIL import Image

from segrank.checkpoints import describe
from segrank.deploy.uploads import FORMAT_NAMES, MAX_PIXELS, UploadError, decode_upload, upload_file
from segrank.errors import SegrankError
from segrank.inference.prediction import Prediction
from segrank.inference.predictor import Predictor

DISPLAY_SIDE = 1600  # the pictures sent back, and the labels behind them, are at most this long a side
RANKING_ROWS = 20
DRAIN_LIMIT = 2**28  # a refused upload up to this size is read to its end (see PredictionHandler.discard)
BACKLOG = 128  # connections the system holds for accept (socketserver's default of 5 resets a burst of uploads)
WORKERS, QUEUE = 2, 16  # uploads segmented at once, and more that may wait for a turn, before 503
RETRY_AFTER_S = 2
STOP_GRACE_S = 10  # after the predictions in flight, seconds a stopping server waits for their answers to be sent


class PredictionServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client cannot keep the process alive at shutdown
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_upload_bytes: int, title: str,
                 log: bool = True, *, workers: int = WORKERS, queue: int = QUEUE) -> None:
        super().__init__(address, PredictionHandler)
        self.predictor, self.max_upload_bytes, self.log = predictor, max_upload_bytes, log
        self.admitted = threading.BoundedSemaphore(workers + queue)  # uploads being handled, segmented or waiting
        self.turns = threading.BoundedSemaphore(workers)  # uploads decoded and segmented at once
        self.workers, self.queue = workers, queue
        self.stopping = threading.Event()  # set on Ctrl+C: waiting uploads are answered 503, running ones finish
        self.connections: dict[threading.Thread, socket.socket] = {}  # open connections, by their handler thread
        self.connections_lock = threading.Lock()
        page = resources.files("segrank").joinpath("resources", "serve.html").read_text()
        self.page = (page.replace("__TITLE__", html.escape(title))
                     .replace("__MODEL__", html.escape(describe(predictor.model)))
                     .replace("__FORMATS__", FORMAT_NAMES)
                     .replace("__MAX_MP__", f"{MAX_PIXELS / 1e6:g}")
                     .replace("__MAX_MB__", f"{max_upload_bytes / 2**20:.3g}")
                     .replace("__MAX_BYTES__", str(max_upload_bytes))).encode()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Wait for one of the ``workers`` turns; an upload still waiting when the server stops is answered 503."""
        while not self.turns.acquire(timeout=0.1):
            if self.stopping.is_set():
                raise UploadError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping")
        try:
            if self.stopping.is_set():
                raise UploadError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping")
            yield
        finally:
            self.turns.release()

    def finish_in_flight(self, grace_s: float = STOP_GRACE_S) -> None:
        """After ``stopping`` is set: wait until no upload is being segmented (then hold every turn, so that none
        starts), then up to ``grace_s`` for the answers in flight (and the 503s of the waiting) to be written; then
        close the connections still open (idle keep-alive ones) and wait, within the same ``grace_s``, for their
        threads to end. No handler thread is then alive when the interpreter shuts down: one that wakes up during
        the shutdown is ended by Python 3.11-3.13 with pthread_exit, which aborts the process ("terminate called
        without an active exception") when it unwinds through PyTorch's C++ frames."""
        for _ in range(self.workers):
            self.turns.acquire()
        deadline = time.monotonic() + grace_s
        for _ in range(self.workers + self.queue):
            if not self.admitted.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        with self.connections_lock:
            connections = dict(self.connections)
        for connection in connections.values():
            with suppress(OSError):  # already closed by its client
                connection.shutdown(socket.SHUT_RDWR)  # a handler waiting for the next request reads the end
        for thread in connections:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def opened(self, connection: socket.socket) -> None:
        with self.connections_lock:
            self.connections[threading.current_thread()] = connection

    def closed(self) -> None:
        with self.connections_lock:
            self.connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closed its connection early costs one log line; anything else too, without a traceback
        (each upload's own failures are answered 500 with their message before they get here)."""
        err = sys.exc_info()[1]
        if self.log:
            what = "closed the connection early" if isinstance(err, ConnectionError | TimeoutError) else \
                f"{type(err).__name__}: {err}"
            sys.stderr.write(f"segrank serve: {client_address[0]}: {what}\n")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class PredictionHandler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a silent connection is kept

    def setup(self) -> None:
        super().setup()
        self.server.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        if self.path in ("/", "/index.html"):
            self.reply(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        else:
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: not found"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/predict":
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: not found"})
            return
        if self.server.stopping.is_set() or not self.server.admitted.acquire(blocking=False):
            self.refuse_busy()
            return
        try:
            self.reply_json(*self.predict_upload())
        finally:
            self.server.admitted.release()  # after the answer is written: a stopping server waits for it

    def predict_upload(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """The answer to an admitted upload: 200 and the page's JSON, or an error status and its message."""
        try:
            body = self.read_upload()
            data, name = upload_file(body, self.headers.get("Content-Type"),
                                     unquote(self.headers.get("X-Filename", "")) or None)
            with self.server.turn():
                prediction, size, seconds = self.segment(data, name)
            return HTTPStatus.OK, result_json(prediction, size, seconds)
        except UploadError as err:
            return err.status, {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - a failure on one image must not end the server
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"}

    def refuse_busy(self) -> None:
        """503 with Retry-After, the upload read to its end first so that the client gets the answer."""
        length = self.headers.get("Content-Length", "")
        self.discard(int(length) if length.isdigit() else DRAIN_LIMIT + 1)
        what = "is stopping" if self.server.stopping.is_set() else "is busy with other uploads"
        self.reply_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"the server {what}; try again shortly"},
                        {"Retry-After": str(RETRY_AFTER_S)})

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

    def segment(self, data: bytes, name: str | None) -> tuple[Prediction, tuple[int, int], float]:
        """The prediction at the shown size (see the module docstring), the image's own (H, W) and the seconds it
        took."""
        rgb = decode_upload(data, name)
        shown = display_size(rgb.shape[0], rgb.shape[1])
        predictor = self.server.predictor
        start = time.perf_counter()
        try:
            result = predictor.forward(predictor.preprocess(rgb), shown)
            prediction = predictor.postprocess(result, shown_image(rgb, shown), name)
        except SegrankError as err:
            raise UploadError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return prediction, (rgb.shape[0], rgb.shape[1]), time.perf_counter() - start

    def reply_json(self, status: HTTPStatus, value: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json", headers)

    def reply(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.log:
            sys.stderr.write(f"segrank serve: {self.address_string()} {format % args}\n")


def display_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of an image shown at most ``DISPLAY_SIDE`` a side."""
    scale = min(1.0, DISPLAY_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def shown_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[0], rgb.shape[1]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def result_json(prediction: Prediction, size: tuple[int, int], seconds: float) -> dict[str, Any]:
    """What the page shows: the image and its colour map at the shown size (data URLs the page lays over each
    other), the legend and the top of the RankSeg ranking; ``size`` is the uploaded image's own (H, W)."""
    return {
        "name": prediction.source, "width": size[1], "height": size[0], "seconds": round(seconds, 3),
        "shown_width": prediction.label.shape[1], "shown_height": prediction.label.shape[0],
        "image": data_url(Image.fromarray(prediction.image), "JPEG"), "color": data_url(prediction.colorize(), "PNG"),
        "legend": prediction.legend(),
        "ranking": None if prediction.ranking is None else prediction.ranking[:RANKING_ROWS],
        "topk": prediction.topk,
    }


def data_url(image: Image.Image, format: str) -> str:  # noqa: A002 - Pillow's name for it
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": 90} if format == "JPEG" else {}))
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def serve(predictor: Predictor, host: str, port: int, max_upload_mb: float, title: str,
          notes: Sequence[str] = ()) -> None:
    """Serve until interrupted (Ctrl+C), then let the predictions in flight finish (a second Ctrl+C: at once).
    Prints the address on the first line, then ``notes``."""
    try:
        server = PredictionServer((host, port), predictor, int(max_upload_mb * 2**20), title)
    except OSError as err:
        raise SegrankError(f"{host}:{port}: cannot listen ({err.strerror})") from None
    print(f"segrank serve: {title} on {server.url} (Ctrl+C to stop)", *notes, sep="\n", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stopping.set()
        server.server_close()  # no new connections; the handlers of open ones still answer
        try:
            server.finish_in_flight()  # no thread is inside the model when the interpreter exits
        except KeyboardInterrupt:
            print("segrank serve: stopped without waiting for the predictions in flight", flush=True)
            sys.stderr.flush()
            os._exit(130)  # not the interpreter's exit: it would tear down PyTorch's threads under a running model
        print("segrank serve: stopped", flush=True)
    finally:
        server.server_close()
