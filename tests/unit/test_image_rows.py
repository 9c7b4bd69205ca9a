"""Images in chat rows, in preprocess (pipeline/images.py): what each kind of image URL
becomes, and every bad image as its own error code. Fetches go to a local HTTP server
and to moto's S3."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from raybatch.pipeline.images import ImageLimits
from raybatch.pipeline.preprocess import prepare_requests
from raybatch.pipeline.rows import RAW_SCHEMA, EngineRequest
from tests.image_helpers import ImageServer, data_url, image_chat, png

LIMITS = ImageLimits(max_image_bytes=2048, max_images_per_row=2, fetch_timeout_seconds=1.0,
                     url_schemes=("http", "https", "s3"))


def prepare(bodies: list[dict], limits: ImageLimits = LIMITS) -> list[dict]:
    """Each body as one line through preprocess: {"request": EngineRequest} or {"error": (code, message)}."""
    raws = [json.dumps({"custom_id": f"r{i}", "body": body}).encode() for i, body in enumerate(bodies)]
    table = pa.Table.from_pydict(
        {"shard": ["in.jsonl"] * len(raws), "line": list(range(1, len(raws) + 1)), "raw": raws}, schema=RAW_SCHEMA
    )
    out = prepare_requests(table, max_line_bytes=1 << 20, max_n=4, job_defaults={}, duplicates=frozenset(),
                           images=limits).to_pylist()
    return [
        {"request": EngineRequest.model_validate_json(row["request"])} if row["request"]
        else {"error": (row["error_code"], row["error_message"])}
        for row in out
    ]


def image_urls(request: EngineRequest) -> list[str]:
    return [part["image_url"]["url"] for m in request.messages if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image_url"]


@pytest.fixture(scope="module")
def server():
    with ImageServer(big=4096, slow=3.0) as running:
        yield running


def test_data_url_passes_checked_with_its_parts_in_order():
    red = png()
    [row] = prepare([{"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": data_url(red), "detail": "low"}},
                                     {"type": "text", "text": "b"}]},
    ]}])
    request = row["request"]
    assert request.images == 1
    assert request.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": data_url(red)}},
                                     {"type": "text", "text": "b"}]},
    ]


def test_text_rows_are_unchanged():
    [row] = prepare([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}])
    assert row["request"].messages == [{"role": "user", "content": "hi"}]
    assert row["request"].images is None


def test_http_and_s3_urls_become_data_urls(server, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="pictures")
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket="pictures", Key="red.png", Body=png())
    [row] = prepare([image_chat(f"{server.url}/blue.jpg?sig=secret", "s3://pictures/red.png")])
    jpeg, red = image_urls(row["request"])
    assert jpeg == data_url(server.files["/blue.jpg"], "image/jpeg")
    assert red == data_url(png())


@pytest.mark.parametrize(
    "url, code, message",
    [
        ("{server}/missing", "image_fetch_failed", "image 1: fetching http://127.0.0.1{path}/missing answered HTTP 404"),
        ("{server}/slow.png", "image_fetch_failed", "image 1: fetching http://127.0.0.1{path}/slow.png took longer than 1s"),
        ("http://127.0.0.1:1/red.png", "image_fetch_failed", "image 1: fetching http://127.0.0.1:1/red.png failed: ConnectError"),
        ("{server}/big.png", "image_too_large", "image 1: image is 4100 bytes, over this job's limit of 2048"),
        ("{server}/text.png", "invalid_image", "image 1: image cannot be decoded: cannot identify image file"),
        ("s3://pictures/nowhere.png", "image_fetch_failed", "image 1: fetching s3://pictures/nowhere.png failed: no such object"),
        ("file:///etc/passwd", "image_url_unsupported", "image 1: image URL scheme file:// is not fetched; "
         "use a data: URL (base64) or http://, https://, s3://"),
        ("ftp://example.com/a.png", "image_url_unsupported", "image 1: image URL scheme ftp:// is not fetched; "
         "use a data: URL (base64) or http://, https://, s3://"),
        ("red.png", "image_url_unsupported", "image 1: image URL scheme 'red.png' is not fetched; "
         "use a data: URL (base64) or http://, https://, s3://"),
        ("data:image/png;base64,%%%", "invalid_image", "image 1: the data: URL's data is not valid base64"),
        ("data:image/png,rawbytes", "invalid_image", "image 1: a data: URL must be data:image/<format>;base64,<data>"),
        (data_url(b"GIF89a broken"), "invalid_image", "image 1: image cannot be decoded: cannot identify image file"),
        (data_url(b"\0" * 3000), "image_too_large", "image 1: image is 3000 bytes, over this job's limit of 2048"),
    ],
)
def test_each_bad_image_is_its_own_error(server, s3_endpoint, url, code, message):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="pictures")
    port = server.url.rsplit(":", 1)[1]
    [row] = prepare([image_chat(url.format(server=server.url))])
    got_code, got_message = row["error"]
    assert got_code == code
    assert got_message.startswith(message.format(path=f":{port}" if "{server}" in url else "")), got_message


def test_too_many_images_and_the_default_schemes(server):
    red = data_url(png())
    rows = prepare([image_chat(red, red, red), image_chat(red, red)])
    assert rows[0]["error"] == ("too_many_images", "this request has 3 images; this job's limit is 2")
    assert rows[1]["request"].images == 2
    [row] = prepare([image_chat(f"{server.url}/red.png")], ImageLimits())
    assert row["error"] == ("image_url_unsupported", "image 1: image URL scheme http:// is not fetched; "
                            "use a data: URL (base64) or https://, s3://")


def test_a_bad_image_names_its_number_and_spoils_only_its_row(server):
    red = data_url(png())
    rows = prepare([image_chat(red, f"{server.url}/missing"), image_chat(red)])
    assert rows[0]["error"][0] == "image_fetch_failed" and rows[0]["error"][1].startswith("image 2: ")
    assert "request" in rows[1]


def test_slow_urls_of_one_batch_are_fetched_at_once(server):
    import time

    started = time.monotonic()
    rows = prepare([image_chat(f"{server.url}/slow.png")] * 6)
    assert all(row["error"][0] == "image_fetch_failed" for row in rows)
    assert time.monotonic() - started < 4.0  # about one timeout (1 s), not six


def test_a_presigned_urls_query_is_never_echoed(server):
    [row] = prepare([image_chat(f"{server.url}/missing?X-Amz-Signature=secret")])
    assert "secret" not in row["error"][1]
