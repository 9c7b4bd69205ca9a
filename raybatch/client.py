"""A small HTTP client for the raybatch API: datasets and batch inference jobs.

Settings default from the environment: RAYBATCH_BASE_URL (default
http://127.0.0.1:8000), RAYBATCH_API_KEY, RAYBATCH_ACCOUNT. Every method returns the
server's JSON as a dict (camelCase names, as on the wire) and raises
`ApiRequestError` when the server refuses.

Signed URLs (upload and download) are fetched with a separate client that never
carries the API key: on S3 they point at another host, and a credential sent there
would leak.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote

import httpx

from raybatch.exceptions import ApiRequestError, ConfigError
from raybatch.resources import TERMINAL_STATES as _TERMINAL

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset(state.value for state in _TERMINAL)
_CHUNK = 1 << 20


def resource_id(reference: str) -> str:
    """A bare ID or a full name `accounts/{a}/{collection}/{id}` → the ID."""
    return reference.rstrip("/").rsplit("/", 1)[-1]


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()  # a streamed response has no body yet
    status = response.reason_phrase.upper().replace(" ", "_") or "UNKNOWN"
    message = response.text[:500]
    try:
        error = response.json()["error"]
        status = str(error.get("status") or status)
        message = str(error.get("message", message))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # not our JSON (a proxy's page, S3's XML): keep the text
    raise ApiRequestError(response.status_code, status, message)


def _check_filename(name: str) -> str:
    # The server never sends such names; refusing them anyway keeps every write inside
    # the destination folder, whatever answers at the other end.
    if not name or name in (".", "..") or "/" in name or "\\" in name or ".." in name:
        raise ValueError(f"refusing unsafe file name {name!r} from the server")
    return name


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _without_none(fields: dict) -> dict:
    return {key: value for key, value in fields.items() if value is not None}


class RaybatchClient:
    """One account's view of a raybatch service. Use as a context manager, or close()."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        account: Optional[str] = None,
        timeout: float = 60.0,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        base_url = base_url or os.environ.get("RAYBATCH_BASE_URL") or DEFAULT_BASE_URL
        api_key = api_key or os.environ.get("RAYBATCH_API_KEY")
        account = account or os.environ.get("RAYBATCH_ACCOUNT")
        if not api_key:
            raise ConfigError("no API key: pass --api-key or set RAYBATCH_API_KEY")
        if not account:
            raise ConfigError("no account: pass --account or set RAYBATCH_ACCOUNT")
        self.base_url = base_url.rstrip("/")
        self.account = account
        self._prefix = f"/v1/accounts/{quote(account, safe='')}/"
        self._api = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )
        self._plain = httpx.Client(timeout=timeout, transport=transport)  # signed URLs: no key

    def close(self) -> None:
        self._api.close()
        self._plain.close()

    def __enter__(self) -> "RaybatchClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> dict:
        """A call under this account's routes (`path` relative to them), or, for a path
        from the root ("/v1/admin/..."), that route as it is."""
        response = self._api.request(method, path if path.startswith("/") else self._prefix + path, **kwargs)
        _raise_for_error(response)
        return response.json() if response.content else {}

    @staticmethod
    def _path(collection: str, reference: str, verb: str = "") -> str:
        path = f"{collection}/{quote(resource_id(reference), safe='')}"
        return f"{path}:{verb}" if verb else path

    def _pages(self, list_page: Callable[..., dict], field: str, **query) -> Iterator[dict]:
        token, seen = None, set()
        while True:
            page = list_page(page_token=token, **query)
            yield from page.get(field) or []
            token = page.get("nextPageToken")
            if not token or token in seen:  # a repeated token would loop for ever
                return
            seen.add(token)

    # ----------------------------------------------------------------- datasets

    def create_dataset(self, dataset_id: str, display_name: Optional[str] = None,
                       external_url: Optional[str] = None, format: Optional[str] = None) -> dict:
        """A new dataset: empty (upload into it next), or read in place from
        `external_url` (validated at once; READY when listed and measured)."""
        dataset = _without_none({"displayName": display_name, "externalUrl": external_url, "format": format,
                                 "userUploaded": None if external_url else {}})
        return self._request("POST", "datasets", json={"datasetId": dataset_id, "dataset": dataset})

    def upload_dataset(self, dataset_id: str, path: str | os.PathLike) -> dict:
        """Upload one file through the API (multipart, streamed from disk)."""
        path = Path(path)
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/octet-stream")}
            return self._request("POST", self._path("datasets", dataset_id, "upload"), files=files)

    def upload_dataset_signed(self, dataset_id: str, paths: list[str | os.PathLike]) -> dict:
        """Upload files by PUTting each to a signed URL, then validate; for large files."""
        files = {Path(p).name: Path(p) for p in paths}
        if len(files) != len(paths):
            raise ConfigError("two files share a name; a dataset holds each name once")
        sizes = {name: str(path.stat().st_size) for name, path in files.items()}
        answer = self._request(
            "POST", self._path("datasets", dataset_id, "getUploadEndpoint"), json={"filenameToSize": sizes}
        )
        urls = answer.get("filenameToSignedUrls") or {}
        missing = sorted(set(files) - set(urls))
        if missing:
            raise ApiRequestError(200, "INTERNAL", f"no upload URL for {', '.join(missing)}")
        for name, path in files.items():
            with path.open("rb") as handle:  # a file object: streamed, with Content-Length
                response = self._plain.put(
                    urls[name], content=handle, headers={"Content-Type": "application/octet-stream"}
                )
            _raise_for_error(response)
        self._request("POST", self._path("datasets", dataset_id, "validateUpload"), json={})
        return self.wait_dataset_validated(dataset_id)

    def get_dataset(self, dataset_id: str) -> dict:
        return self._request("GET", self._path("datasets", dataset_id))

    def wait_dataset_validated(self, dataset_id: str, timeout: float = 900.0, poll: float = 1.0) -> dict:
        """The dataset once its validation has ended: READY, or ApiRequestError with the
        status the validation left (a large dataset goes on validating after
        `:validateUpload` or `:upload` answered; `status.message` shows its progress)."""
        deadline = time.monotonic() + timeout
        while True:
            dataset = self.get_dataset(dataset_id)
            status = dataset.get("status") or {}
            if dataset.get("state") == "READY":
                return dataset
            if status.get("code") not in (None, "", "OK"):
                raise ApiRequestError(400, status["code"], status.get("message", ""))
            if time.monotonic() > deadline:
                raise ApiRequestError(504, "DEADLINE_EXCEEDED", f"dataset {dataset_id} is still validating "
                                      f"after {timeout:.0f}s: {status.get('message', '')}")
            time.sleep(poll)

    def _list(
        self,
        collection: str,
        page_size: Optional[int] = None,
        page_token: Optional[str] = None,
        order_by: Optional[str] = None,
        filter: Optional[str] = None,
    ) -> dict:
        params = _without_none({"pageSize": page_size, "pageToken": page_token, "orderBy": order_by, "filter": filter})
        return self._request("GET", collection, params=params)

    def list_datasets(self, **query: Optional[str | int]) -> dict:
        """One page: page_size, page_token, order_by, filter."""
        return self._list("datasets", **query)

    def iter_datasets(
        self, page_size: Optional[int] = None, order_by: Optional[str] = None, filter: Optional[str] = None
    ) -> Iterator[dict]:
        return self._pages(self.list_datasets, "datasets", page_size=page_size, order_by=order_by, filter=filter)

    def delete_dataset(self, dataset_id: str) -> dict:
        return self._request("DELETE", self._path("datasets", dataset_id))

    def download_dataset(
        self, dataset_id: str, dest_dir: str | os.PathLike, lineage: bool = False
    ) -> list[Path]:
        """Download every file of the dataset (and, with lineage, of its sources) into
        dest_dir. Each file appears whole or not at all."""
        params = {"downloadLineage": "true"} if lineage else {}
        answer = self._request("GET", self._path("datasets", dataset_id, "getDownloadEndpoint"), params=params)
        urls = answer.get("filenameToSignedUrls") or {}
        for name in urls:  # every name checked before anything is written
            _check_filename(name)
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return [self._download(url, dest, name) for name, url in sorted(urls.items())]

    def _download(self, url: str, dest: Path, name: str) -> Path:
        target = dest / name
        handle = tempfile.NamedTemporaryFile(dir=dest, prefix=f".{name}.", suffix=".part", delete=False)
        try:
            with handle, self._plain.stream("GET", url) as response:
                _raise_for_error(response)
                for chunk in response.iter_bytes(_CHUNK):
                    handle.write(chunk)
            os.replace(handle.name, target)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
        return target

    # ---------------------------------------------------------------------- jobs

    def create_job(
        self,
        model: Optional[str] = None,
        input_dataset_id: Optional[str] = None,
        job_id: Optional[str] = None,
        output_dataset_id: Optional[str] = None,
        display_name: Optional[str] = None,
        inference_parameters: Optional[dict[str, Any]] = None,
        precision: Optional[str] = None,
        continued_from_job_name: Optional[str] = None,
        dry_run: bool = False,
    ) -> dict:
        """Start a job. inference_parameters may use snake_case or camelCase keys;
        an `extra_body` dict is sent as the JSON string the API expects. `dry_run`:
        start nothing; validate the input against the model and return the report
        (`batchInferenceJobs:validate`)."""
        parameters = {_camel(k): v for k, v in (inference_parameters or {}).items() if v is not None}
        if isinstance(parameters.get("extraBody"), dict):
            parameters["extraBody"] = json.dumps(parameters["extraBody"])
        body = _without_none(
            {
                "model": model,
                "inputDatasetId": input_dataset_id,
                "outputDatasetId": output_dataset_id,
                "displayName": display_name,
                "inferenceParameters": parameters or None,
                "precision": precision,
                "continuedFromJobName": continued_from_job_name,
            }
        )
        params = {"batchInferenceJobId": job_id} if job_id else {}
        return self._request("POST", "batchInferenceJobs:validate" if dry_run else "batchInferenceJobs",
                             params=params, json=body)

    def get_job(self, job_id: str) -> dict:
        return self._request("GET", self._path("batchInferenceJobs", job_id))

    def list_jobs(self, **query: Optional[str | int]) -> dict:
        """One page: page_size, page_token, order_by, filter."""
        return self._list("batchInferenceJobs", **query)

    def iter_jobs(
        self, page_size: Optional[int] = None, order_by: Optional[str] = None, filter: Optional[str] = None
    ) -> Iterator[dict]:
        return self._pages(self.list_jobs, "batchInferenceJobs", page_size=page_size, order_by=order_by, filter=filter)

    def cancel_job(self, job_id: str) -> dict:
        return self._request("POST", self._path("batchInferenceJobs", job_id, "cancel"), json={})

    def delete_job(self, job_id: str) -> dict:
        return self._request("DELETE", self._path("batchInferenceJobs", job_id))

    def list_engines(self) -> dict:
        """The engine pool's replicas (an admin account's key only)."""
        return self._request("GET", "/v1/admin/engines")

    def wait_job(
        self,
        job_id: str,
        poll_seconds: float = 2.0,
        on_update: Optional[Callable[[dict], None]] = None,
        timeout: Optional[float] = None,
    ) -> dict:
        """Poll until the job reaches a terminal state; return it. Raises TimeoutError
        when `timeout` seconds pass first (the job goes on running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job.get("state") in TERMINAL_STATES:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {resource_id(job_id)} still {job.get('state')} after {timeout} s")
            time.sleep(poll_seconds if left is None else min(poll_seconds, left))
