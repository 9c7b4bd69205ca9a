"""Images in chat rows end to end: `raybatch run` on a tiny random vision-language model
(raybatch/tiny_vision_model.py) on the real vLLM CPU engine, with images as data: URLs,
from a local HTTP server and from S3 (moto), and every kind of bad image as its exact
error row; every line accounted for exactly once. Then a text-only model given an image."""

from __future__ import annotations

import boto3
import pytest

from raybatch.config import EngineConfig, RunConfig
from raybatch.engines.pool_handle import pool_name
from raybatch.protocol import InferenceParameters
from raybatch.runner import run_job
from tests.helpers import ENGINE, InputBuilder, chat, check_run, read_jsonl
from raybatch.tiny_vision_model import IMAGE_PROMPT_TOKENS
from tests.image_helpers import ImageServer, data_url, image_chat, png

pytestmark = pytest.mark.engine

RED, BLUE = png(50, 40, (255, 0, 0)), png(20, 60, (0, 0, 255))


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory) -> str:
    from raybatch.tiny_vision_model import build_tiny_vision_model

    return str(build_tiny_vision_model(tmp_path_factory.mktemp("tiny-vision-model")))


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory, ray_cluster, vision_model, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="vision-pictures")
    s3.put_object(Bucket="vision-pictures", Key="red.png", Body=RED)
    root = tmp_path_factory.mktemp("vision")
    with ImageServer(big=5000, slow=4.0) as server:
        built = InputBuilder()
        good = {
            "data": image_chat(data_url(RED)),
            "http": image_chat(f"{server.url}/blue.jpg"),
            "s3": image_chat("s3://vision-pictures/red.png"),
            "two": image_chat(data_url(RED), data_url(BLUE)),
            "text": chat("no picture here"),
        }
        for name, body in good.items():
            built.ok("in.jsonl", name, {**body, "max_tokens": 4})
        bad = {
            "http-404": (image_chat(f"{server.url}/missing"), "image_fetch_failed"),
            "http-slow": (image_chat(f"{server.url}/slow.png"), "image_fetch_failed"),
            "http-big": (image_chat(f"{server.url}/big.png"), "image_too_large"),
            "http-not-image": (image_chat(f"{server.url}/text.png"), "invalid_image"),
            "s3-missing": (image_chat("s3://vision-pictures/nowhere.png"), "image_fetch_failed"),
            "file": (image_chat("file:///etc/hostname"), "image_url_unsupported"),
            "ftp": (image_chat("ftp://127.0.0.1/red.png"), "image_url_unsupported"),
            "data-base64": (image_chat("data:image/png;base64,@@@"), "invalid_image"),
            "data-not-image": (image_chat(data_url(b"GIF89a nothing")), "invalid_image"),
            "data-big": (image_chat(data_url(b"\0" * 5000)), "image_too_large"),
            "three": (image_chat(*[data_url(RED)] * 3), "too_many_images"),
            "long": (image_chat(data_url(RED), text="hello world " * 300), "context_length_exceeded"),
            "part-kind": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "invalid_request"),
        }
        for name, (body, code) in bad.items():
            built.add("in.jsonl", {"custom_id": name, "body": body}, name, code)
        built.write(str(root / "in"))
        config = RunConfig(
            input=str(root / "in"),
            output=str(root / "out"),
            model=vision_model,
            inference_parameters=InferenceParameters(temperature=0),
            max_line_bytes=1 << 16,
            max_image_bytes=4096,
            max_images_per_row=2,
            image_fetch_timeout_seconds=1.5,
            image_url_schemes=["http", "https", "s3"],
            engine=ENGINE,
        )
        summary = run_job(config)
    return built, root, summary, good


def test_every_image_line_accounted_for_exactly_once(vision_run):
    built, root, summary, _ = vision_run
    by_id = check_run(str(root / "out"), built.expected)  # progress's inputTokens = the rows' usage too
    assert summary.state == "completed"
    assert set(by_id) == {"data", "http", "s3", "two", "text"}
    for row in by_id.values():
        choice = row["response"]["body"]["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert row["response"]["body"]["usage"]["completion_tokens"] >= 1


def test_error_messages_say_what_was_wrong(vision_run):
    root = vision_run[1]
    messages = {row["custom_id"]: row["error"]["message"] for row in read_jsonl(f"{root}/out/errors.jsonl")}
    assert messages["http-404"].endswith("/missing answered HTTP 404")
    assert messages["http-slow"].endswith("/slow.png took longer than 1.5s")
    assert messages["file"] == ("image 1: image URL scheme file:// is not fetched; "
                                "use a data: URL (base64) or http://, https://, s3://")
    assert messages["three"] == "this request has 3 images; this job's limit is 2"
    assert messages["data-big"] == "image 1: image is 5000 bytes, over this job's limit of 4096"


def test_prompt_tokens_count_the_image_tokens_as_the_models_processor_does(vision_run, vision_model):
    """The oracle: transformers' own processor for the model, given the same messages
    and images, apart from vLLM."""
    from PIL import Image
    from transformers import AutoProcessor
    import io

    built, root, _, good = vision_run
    processor = AutoProcessor.from_pretrained(vision_model)
    usage = {row["custom_id"]: row["response"]["body"]["usage"] for row in read_jsonl(f"{root}/out/results.jsonl")}
    blue_jpeg = ImageServer().files["/blue.jpg"]
    pictures = {"data": [RED], "http": [blue_jpeg], "s3": [RED], "two": [RED, BLUE], "text": []}
    for name, images in pictures.items():
        content = good[name]["messages"][0]["content"]
        messages = [{"role": "user", "content": content if isinstance(content, str) else [
            {"type": "image"} if part["type"] == "image_url" else part for part in content
        ]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        loaded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        expected = len(processor(text=text, images=loaded or None)["input_ids"][0])
        assert usage[name]["prompt_tokens"] == expected, name
        assert usage[name]["total_tokens"] == expected + usage[name]["completion_tokens"]
    # The same text with one more image: that image's tokens more.
    assert usage["two"]["prompt_tokens"] == usage["data"]["prompt_tokens"] + IMAGE_PROMPT_TOKENS


def test_a_text_only_model_given_an_image_is_an_error_row(tmp_path, service, tiny_model):
    """On the service's warm text-only replica: the image row fails alone, with its code."""
    built = InputBuilder()
    built.add("in.jsonl", {"custom_id": "picture", "body": image_chat(data_url(RED), max_tokens=4)},
              "picture", "images_not_supported")
    built.ok("in.jsonl", "words", chat("hello", max_tokens=4))
    built.write(str(tmp_path / "in"))
    summary = run_job(RunConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model,
        engine_pool=pool_name(service.storage), engine=EngineConfig(engine_args={"enforce_eager": True}),
    ))
    assert summary.state == "completed"
    check_run(str(tmp_path / "out"), built.expected)
    [row] = read_jsonl(f"{tmp_path}/out/errors.jsonl")
    assert row["error"]["message"].startswith("this request has 1 image(s), but the model ")
    assert row["error"]["message"].endswith(" takes text only")
