"""What ``segrank serve`` accepts as an upload: the image file as the request body (what its page sends) or as a field
of a ``multipart/form-data`` form (``curl -F file=@photo.jpg``), in one of the formats the page names, within a pixel
limit; anything else is an ``UploadError`` whose message says what to send.

Only these formats are ever decoded: a server must not hand an upload to whichever of Pillow's readers claims it
(EPS, for one, runs Ghostscript where it is installed).
"""

from __future__ import annotations

import io
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus

import numpy as np
from PIL import Image

from segrank.errors import SegrankError
from segrank.inference.images import IMAGE_ERRORS, pil_to_rgb

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")  # Pillow's names; the page lists the same
FORMAT_NAMES = "PNG, JPEG, WebP, BMP or TIFF"
MAX_PIXELS = 40_000_000  # an upload decoding to more pixels is refused before it is decoded
SEND = f"send a {FORMAT_NAMES} file as the request body, or as a form field (curl -F file=@photo.jpg)"


class UploadError(Exception):
    """An upload that cannot be segmented: answered with ``status`` and the message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def form_file(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """The file of a ``multipart/form-data`` body (its first part that is a file, else its only part) and its name."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    parts: list[Message] = list(message.iter_parts()) if message.is_multipart() else []
    named = [part for part in parts if part.get_filename()]
    chosen = named[0] if named else parts[0] if len(parts) == 1 else None
    if chosen is None:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"a form without a file: {SEND}")
    payload = chosen.get_payload(decode=True)
    if not isinstance(payload, bytes) or not payload:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"the form's file is empty: {SEND}")
    return payload, chosen.get_filename()


def upload_file(body: bytes, content_type: str | None, name: str | None) -> tuple[bytes, str | None]:
    """(the image file's bytes, its name) of a request body: itself, or the file of a multipart form."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        data, form_name = form_file(body, content_type or "")
        return data, name or form_name
    if kind == "application/x-www-form-urlencoded":  # curl -d @photo.jpg: the bytes arrive, but mangled as text
        raise UploadError(HTTPStatus.BAD_REQUEST, f"a URL-encoded form cannot carry an image: {SEND} "
                                                  "(curl --data-binary @photo.jpg)")
    return body, name


def decode_upload(data: bytes, name: str | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an uploaded image file, as ``segrank predict`` reads a file."""
    what = name or "upload"
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise UploadError(HTTPStatus.BAD_REQUEST, f"{what}: image of {img.width}x{img.height} pixels is "
                                                          f"larger than the limit of {MAX_PIXELS / 1e6:g} megapixels")
            return pil_to_rgb(img, what)
    except Image.UnidentifiedImageError:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"{what}: not a readable image ({SEND})") from None
    except IMAGE_ERRORS as err:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"{what}: not a readable image ({err})") from None
    except SegrankError as err:
        raise UploadError(HTTPStatus.BAD_REQUEST, str(err)) from None
