"""Images in chat rows: every `image_url` part becomes a checked `data:` URL before the
row leaves preprocess.

Why here, a CPU stage, and not in the engine replica: fetching waits on the network and
decoding costs CPU, and a replica's one event loop feeds every row of every job on its
GPUs; a slow URL there would stall them all, and a replica's failure budget would pay
for a user's bad link. Here a fetch holds up only its own batch's preparation, within
`fetch_timeout_seconds`, and a bad image is this row's error row before any engine
time is spent. The replica then gets bytes it can trust: vLLM's own chat path decodes
the data: URLs and builds the prompt with the model's template and processor, and never
fetches anything itself.

What a row may hold is bounded: `max_images_per_row` images of `max_image_bytes` each
(as fetched or decoded from base64); every image is decoded once with Pillow here, so an
undecodable one fails here (`invalid_image`), as does a decompression bomb (past
Pillow's pixel limit, `image_too_large`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from raybatch.exceptions import RowError
from raybatch.protocol import (
    DEFAULT_IMAGE_FETCH_TIMEOUT_SECONDS,
    DEFAULT_IMAGE_URL_SCHEMES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGES_PER_ROW,
    ChatCompletionBody,
    ErrorCode,
    ImagePart,
)

# Rows of one batch whose images are fetched at once: fetches wait on the network, not
# the CPU, so a batch of slow URLs takes about one timeout, not one per row.
FETCH_THREADS = 16
_CHUNK = 64 << 10
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


class ImageLimits(BaseModel):
    """The job's bounds on images (RunConfig's fields of the same names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_images_per_row: int = DEFAULT_MAX_IMAGES_PER_ROW
    fetch_timeout_seconds: float = DEFAULT_IMAGE_FETCH_TIMEOUT_SECONDS
    url_schemes: tuple[str, ...] = Field(DEFAULT_IMAGE_URL_SCHEMES)


def count_images(body: Any) -> int:
    if not isinstance(body, ChatCompletionBody):
        return 0
    return sum(len(message.image_urls()) for message in body.messages)


def _where(url: str) -> str:
    """A URL as an error message may show it: no query (a presigned URL's signature is
    in it) and no userinfo."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"[:200]


def _too_large(size: str, limits: ImageLimits) -> RowError:
    return RowError(
        ErrorCode.IMAGE_TOO_LARGE, f"image is {size} bytes, over this job's limit of {limits.max_image_bytes}"
    )


def _from_data_url(url: str, limits: ImageLimits) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None or "base64" not in match["params"].split(";"):
        raise RowError(ErrorCode.INVALID_IMAGE, "a data: URL must be data:image/<format>;base64,<data>")
    # Base64 holds 3 bytes per 4 characters, less its padding: refuse before decoding
    # what cannot fit.
    encoded = match["data"]
    size = len(encoded) * 3 // 4 - encoded.endswith("=") - encoded.endswith("==")
    if size > limits.max_image_bytes:
        raise _too_large(str(size), limits)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RowError(ErrorCode.INVALID_IMAGE, "the data: URL's data is not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(str(len(data)), limits)
    return data


_client = None
_client_lock = threading.Lock()


def _http_client():
    """One client per process, shared by the fetch threads: a client builds its TLS
    context (the CA bundle) once, and keeps connections to a host open across batches."""
    global _client
    import httpx

    with _client_lock:
        if _client is None:
            _client = httpx.Client(follow_redirects=True, max_redirects=5)
        return _client


def _fetch_http(url: str, limits: ImageLimits) -> bytes:
    import httpx

    deadline = time.monotonic() + limits.fetch_timeout_seconds
    try:
        with _http_client().stream("GET", url, timeout=limits.fetch_timeout_seconds) as response:
            if response.status_code != 200:
                raise RowError(
                    ErrorCode.IMAGE_FETCH_FAILED, f"fetching {_where(url)} answered HTTP {response.status_code}"
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise _too_large(declared, limits)
            data = bytearray()
            for chunk in response.iter_bytes(_CHUNK):
                data += chunk
                if len(data) > limits.max_image_bytes:
                    raise _too_large(f"more than {limits.max_image_bytes}", limits)
                if time.monotonic() > deadline:  # httpx's timeout is per read, this is the whole fetch
                    raise httpx.TimeoutException("the whole fetch")
            return bytes(data)
    except httpx.TimeoutException:
        raise RowError(
            ErrorCode.IMAGE_FETCH_FAILED,
            f"fetching {_where(url)} took longer than {limits.fetch_timeout_seconds:g}s",
        ) from None
    except httpx.HTTPError as exc:
        raise RowError(ErrorCode.IMAGE_FETCH_FAILED, f"fetching {_where(url)} failed: {type(exc).__name__}") from None


def _fetch_s3(url: str, limits: ImageLimits) -> bytes:
    import fsspec

    timeout = limits.fetch_timeout_seconds
    try:
        # The cluster's own credentials, as for its storage: the operator decides what
        # they reach. No retries beyond botocore's one attempt, so the timeout holds.
        fs, path = fsspec.core.url_to_fs(
            url,
            config_kwargs={"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}},
            skip_instance_cache=True,
        )
        size = fs.size(path)
        if size is not None and size > limits.max_image_bytes:
            raise _too_large(str(size), limits)
        return fs.cat_file(path)
    except RowError:
        raise
    except FileNotFoundError:
        raise RowError(ErrorCode.IMAGE_FETCH_FAILED, f"fetching {_where(url)} failed: no such object") from None
    except Exception as exc:  # botocore's and s3fs's errors share no base worth naming
        raise RowError(ErrorCode.IMAGE_FETCH_FAILED, f"fetching {_where(url)} failed: {type(exc).__name__}") from None


def _fetch(url: str, limits: ImageLimits) -> bytes:
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if url.startswith("data:"):
        return _from_data_url(url, limits)
    if scheme not in limits.url_schemes:
        allowed = ", ".join(f"{s}://" for s in limits.url_schemes)
        raise RowError(
            ErrorCode.IMAGE_URL_UNSUPPORTED,
            f"image URL scheme {scheme + '://' if scheme else repr(url[:20])} is not fetched; "
            f"use a data: URL (base64) or {allowed}",
        )
    data = _fetch_s3(url, limits) if scheme == "s3" else _fetch_http(url, limits)
    if len(data) > limits.max_image_bytes:
        raise _too_large(str(len(data)), limits)
    return data


def _as_data_url(data: bytes) -> str:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                kind = (image.format or "png").lower()
    except Image.DecompressionBombError as exc:
        raise RowError(ErrorCode.IMAGE_TOO_LARGE, f"image has too many pixels: {exc}") from None
    except Exception as exc:  # Pillow raises many kinds for bytes it cannot read
        raise RowError(ErrorCode.INVALID_IMAGE, f"image cannot be decoded: {exc}") from None
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def resolve_messages(body: ChatCompletionBody, limits: ImageLimits) -> list[dict[str, Any]]:
    """The row's messages in OpenAI form, every image a checked data: URL. Raises
    RowError: too many images, or the first bad image's error (its part number said)."""
    images = count_images(body)
    if images > limits.max_images_per_row:
        raise RowError(
            ErrorCode.TOO_MANY_IMAGES,
            f"this request has {images} images; this job's limit is {limits.max_images_per_row}",
        )
    messages, number = [], 0
    for message in body.messages:
        if not isinstance(message.content, list):
            messages.append(message.template_fields())
            continue
        parts = []
        for part in message.content:
            if isinstance(part, ImagePart):
                number += 1
                try:
                    url = _as_data_url(_fetch(part.image_url.url, limits))
                except RowError as error:
                    error.message = f"image {number}: {error.message}"
                    raise
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({**message.template_fields(), "content": parts})
    return messages


def resolve_all(bodies: list[Optional[ChatCompletionBody]], limits: ImageLimits) -> list[Any]:
    """`resolve_messages` for every body with images, at once; None where a body has
    none. Each entry is the messages or the row's RowError."""

    def one(body):
        try:
            return resolve_messages(body, limits)
        except RowError as error:
            return error

    wanted = [i for i, body in enumerate(bodies) if body is not None and count_images(body)]
    out: list[Any] = [None] * len(bodies)
    if not wanted:
        return out
    with ThreadPoolExecutor(min(FETCH_THREADS, len(wanted))) as pool:
        for i, result in zip(wanted, pool.map(one, [bodies[i] for i in wanted])):
            out[i] = result
    return out
