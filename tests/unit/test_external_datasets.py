"""Issue 12: datasets read in place from an externalUrl, their token estimate, and a
job's dry run (no cluster). The URL checks (what a tenant may not point the service's
credentials at), an https file served by a local http server, validated in place to
READY without a byte copied, and the dry run's report against the pipeline's own
validation and the tiny model's tokenizer."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest

from raybatch.api.auth import create_key
from raybatch.api.datasets import DatasetService
from raybatch.api.external_urls import check_external_url
from raybatch.config import ServiceConfig
from raybatch.exceptions import FailedPrecondition, InvalidArgument
from raybatch.jobs.dry_run import dry_run
from raybatch.resources import CreateJobRequest, DatasetFields, DatasetState, NewDatasetFields
from raybatch.store import Store


def _refusal(url: str, **settings) -> str:
    with pytest.raises(InvalidArgument) as refused:
        check_external_url(url, ServiceConfig(storage="s3://svc/root", **settings))
    return refused.value.message


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "etc/in.jsonl", "~/in.jsonl",
                                 "ftp://host/in.jsonl", "http://example.com/in.jsonl", "FILE:///etc/passwd"])
def test_local_files_and_other_schemes_are_refused(url):
    assert _refusal(url) == (f"externalUrl {url!r} is not read: use s3://, gs://, https:// "
                             "(local files and other schemes are refused)")


@pytest.mark.parametrize("url", ["s3://svc/root", "s3://svc/root/", "s3://svc/root/accounts/other/datasets/x/files",
                                 "s3://svc", "s3://svc/", "s3://svc/ro", "s3://SVC/root/keys"])
def test_the_services_own_storage_is_refused(url):
    assert _refusal(url) == f"externalUrl {url!r} points into the service's own storage"
    # The same bucket under s3fs's other name, where an operator allows it.
    assert _refusal("s3a://svc/root/keys", external_url_schemes=["s3a"]) == (
        "externalUrl 's3a://svc/root/keys' points into the service's own storage")


@pytest.mark.parametrize("url,address", [
    ("https://127.0.0.1/in.jsonl", "127.0.0.1"), ("https://localhost/in.jsonl", "127.0.0.1"),
    ("https://169.254.169.254/latest/meta-data/x.jsonl", "169.254.169.254"), ("https://10.1.2.3/in.jsonl", "10.1.2.3"),
    ("https://192.168.0.1/in.jsonl", "192.168.0.1"), ("https://[::1]/in.jsonl", "::1"),
    ("https://[::ffff:127.0.0.1]/in.jsonl", "127.0.0.1"), ("https://0.0.0.0/in.jsonl", "0.0.0.0"),
])
def test_https_to_the_services_own_network_is_refused(url, address):
    message = _refusal(url)
    assert message.startswith("externalUrl host ") and f"resolves to {address}, a non-public address" in message


def test_credentials_dot_segments_and_prefixes():
    assert _refusal("https://me:secret@93.184.216.34/in.jsonl") == (
        "externalUrl must not carry credentials: the service reads with its own")
    assert _refusal("s3://corpora/a/../../svc/root") == "externalUrl 's3://corpora/a/../../svc/root' holds a '.' or '..' segment"
    assert _refusal("s3:///in.jsonl") == "externalUrl 's3:///in.jsonl' names no bucket"
    assert _refusal("s3://corpora-private/x", external_url_prefixes=["s3://corpora"]) == (
        "externalUrl 's3://corpora-private/x' is outside the prefixes this service reads: s3://corpora")


@pytest.mark.parametrize("url", ["s3://corpora/shards/", "s3://svc/other-root/x.jsonl", "s3://svc-2/root",
                                 "gs://corpora/in.jsonl.gz", "https://93.184.216.34/data/in.jsonl?sig=abc"])
def test_object_stores_and_public_https_are_accepted(url):
    config = ServiceConfig(storage="s3://svc/root")
    assert check_external_url(url, config) == url
    assert check_external_url("s3://corpora/shards/a", ServiceConfig(storage="s3://svc/root",
                              external_url_prefixes=["s3://corpora/shards"])) == "s3://corpora/shards/a"


# ------------------------------------------------------------ an https file, in place


LINES = [
    {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hello there"}]}},
    {"custom_id": "b", "body": {"messages": [{"role": "user", "content": "general kenobi"}]}},
    {"custom_id": "c", "body": {"prompt": "once upon"}, "url": "/v1/completions"},
]


@pytest.fixture
def served(tmp_path):
    """A folder served over http on loopback (the https path, without a certificate)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _world(tmp_path, **settings):
    store = Store(str(tmp_path / "storage"))
    config = ServiceConfig(storage=store.root_url, external_url_schemes=["s3", "gs", "https", "http"],
                           external_url_private_hosts=True, **settings)
    _, record = create_key(store, "acme")
    return store, config, DatasetService(store, config), record.key_id


def test_an_http_file_is_validated_in_place_and_never_copied(tmp_path, served):
    folder, base = served
    data = b"".join(json.dumps(line).encode() + b"\n" for line in LINES) + b"\n   \n"
    (folder / "in.jsonl").write_bytes(data)
    store, _, datasets, key_id = _world(tmp_path)
    url = f"{base}/in.jsonl"
    datasets.create("acme", "ext", NewDatasetFields(external_url=url, format="CHAT"), key_id)
    dataset = datasets.validate("acme", "ext")
    assert dataset.state == DatasetState.READY and dataset.external_url == url and dataset.format.value == "CHAT"
    assert dataset.example_count == "3" and dataset.size_bytes == str(len(data))
    example_bytes = sum(len(json.dumps(line).encode()) for line in LINES)
    assert dataset.estimated_token_count == str(-(-example_bytes // 4))
    assert store.location.list("accounts/acme/datasets/ext") == ["dataset.json"]  # nothing copied
    with pytest.raises(FailedPrecondition, match="read in place from its externalUrl"):
        datasets.download_files("acme", "ext", lineage=False)


def test_an_external_dataset_takes_no_uploads_and_a_missing_file_is_its_status(tmp_path, served):
    _, base = served
    store, _, datasets, key_id = _world(tmp_path)
    datasets.create("acme", "gone", NewDatasetFields(external_url=f"{base}/nothing.jsonl"), key_id)
    with pytest.raises(FailedPrecondition) as missing:
        datasets.validate("acme", "gone")
    assert missing.value.message == f"externalUrl: input not found: {base}/nothing.jsonl"
    with pytest.raises(FailedPrecondition, match="takes no uploads"):
        datasets.upload_plan("acme", "gone", {"in.jsonl": 10}, key_id)
    with pytest.raises(FailedPrecondition) as listing:
        datasets.create("acme", "dir", NewDatasetFields(external_url=f"{base}/"), key_id)
        datasets.validate("acme", "dir")
    assert listing.value.message in (f"externalUrl: no .jsonl files under {base}/",
                                     f"externalUrl {base}/: an http(s) URL names one .jsonl file, not a listing")


def test_source_dataset_id_is_kept_and_must_exist(tmp_path):
    from raybatch.exceptions import NotFound

    store, _, datasets, key_id = _world(tmp_path)
    datasets.create("acme", "first", DatasetFields(), key_id)
    derived = datasets.create("acme", "second", DatasetFields(), key_id, source_dataset_id="first")
    assert datasets.get("acme", "second").source_dataset_id == "first" == derived.source_dataset_id
    with pytest.raises(NotFound):
        datasets.create("acme", "third", DatasetFields(), key_id, source_dataset_id="nope")


# --------------------------------------------------------------------------- dry run


def test_a_dry_run_counts_lines_bad_lines_by_code_and_tokens(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    store, config, datasets, key_id = _world(tmp_path, models={"tiny": {"source": tiny_model},
                                                               "scripted": {"source": "scripted"}})
    lines = [json.dumps(line).encode() for line in LINES] + [
        b"{not json", json.dumps({"body": {"messages": []}}).encode(),
        json.dumps(LINES[0]).encode(),  # a's second time
        json.dumps({"custom_id": "big", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 10**6}}).encode(), b""]
    datasets.create("acme", "in", DatasetFields(), key_id)
    datasets.upload("acme", "in", "in.jsonl", __import__("io").BytesIO(b"\n".join(lines) + b"\n"))
    report = dry_run(store, config, "acme", CreateJobRequest(model="tiny", input_dataset_id="in"))
    assert report.model_dump(by_alias=True, exclude={"input_tokens"}) == {
        "model": "tiny", "inputDatasetId": "accounts/acme/datasets/in", "shards": 1, "totalLines": 7,
        "blankLines": 1, "validLines": 3,
        "badLines": {"duplicate_custom_id": 1, "invalid_json": 1, "max_tokens_too_large": 1, "missing_custom_id": 1},
        "inputTokensMethod": "tokenizer"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = sum(len(tokenizer.apply_chat_template(line["body"]["messages"], tokenize=True,
                                                     add_generation_prompt=True, return_dict=False))
                   for line in LINES[:2]) + len(tokenizer.encode("once upon"))
    assert report.input_tokens == expected
    # No tokenizer at hand (the scripted engine): the documented estimate, bytes / 4.
    estimated = dry_run(store, config, "acme", CreateJobRequest(model="scripted", input_dataset_id="in"))
    assert estimated.input_tokens_method == "estimate" and estimated.valid_lines == 3
    assert estimated.input_tokens == sum(-(-len(json.dumps(line["body"].get("messages") or line["body"]["prompt"])
                                                .encode()) // 4) if "messages" in line["body"]
                                         else -(-len(b"once upon") // 4) for line in LINES)
    # Nothing was written: no job, no output dataset.
    assert store.list_jobs("acme") == [] and [d.name for d in store.list_datasets("acme")] == ["accounts/acme/datasets/in"]
    with pytest.raises(InvalidArgument, match="not served here"):
        dry_run(store, config, "acme", CreateJobRequest(model="nope", input_dataset_id="in"))
