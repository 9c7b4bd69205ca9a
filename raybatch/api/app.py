"""The Serve app: Fireworks' datasets and batchInferenceJobs REST API.

Storage is never touched on the event loop: sync routes run in Starlette's thread
pool, and async routes (those that read a body themselves or await the scheduler) hand
each storage call to it (`run_in_threadpool`), so a slow disk or an S3 retry's sleep
holds one pool thread, not every other request of the replica. Validating an upload
(seconds for 500 MB) goes on in the background after a short wait (`validation`).

Every request: path IDs checked (400 before any storage call) → API key checked (401)
→ the key's request rate (429 with Retry-After) → the key's account must be the path's
account (else 404: another account's resources do not exist for you) → the operation.
Bodies over the limit get 413 before they are read (`body_limit.py`). Errors are
`{"error": {"code", "message", "status"}}` (`errors.py`).

Query parameters are read by `query.py` (camelCase or snake_case; an unknown one is a
400), `readMask` applied by `field_mask.py`.

This module holds the routes; what they share is beside it: `bodies.py` (JSON in and
out, streamed bodies to storage), `listing.py` (paging, filter, order), `auth.py`,
`rate_limit.py`, `signing.py`, and `datasets.py` (the dataset operations).

`build_app(args)` is the application builder for `serve run`/`serve deploy`/KubeRay:
`import_path: raybatch.api.app:build_app`, `args` = ServiceConfig fields.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from ray import serve

from raybatch.api.auth import authenticate
from raybatch.api.bodies import read_body, to_json, writer_off_loop
from raybatch.api.body_limit import BodyLimit
from raybatch.api.datasets import DatasetService, upload_filename
from raybatch.api.errors import install_error_handlers
from raybatch.api.field_mask import apply_mask, mask_paths
from raybatch.api.listing import DATASET_FIELDS, JOB_FIELDS, listed, page_of
from raybatch.api.query import query_params
from raybatch.api.rate_limit import RateLimiter
from raybatch.api.request_metrics import RequestMetrics
from raybatch.api.signing import SIGNED_PREFIX, UrlSigner
from raybatch.api.validation import BackgroundValidations
from raybatch.config import ServiceConfig
from raybatch.exceptions import ApiError, FailedPrecondition, InvalidArgument, NotFound, PayloadTooLarge, PermissionDenied
from raybatch.resources import (
    BatchInferenceJob,
    CreateDatasetRequest,
    Dataset,
    CreateJobRequest,
    DatasetFields,
    FileUrls,
    ListDatasetsResponse,
    ListJobsResponse,
    check_id,
)
from raybatch.store import Store

logger = logging.getLogger("raybatch.api")

# No unauthenticated schema or docs pages: `/openapi.json` is a route below that asks
# for a valid key like every other; the interactive docs pages are off.
api = FastAPI(title="raybatch", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)
# Added at import time because Serve imports this module afresh in each replica process.
api.add_middleware(BodyLimit)
api.add_middleware(RequestMetrics)  # added last: outermost


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class RaybatchApi:
    def __init__(self, config: ServiceConfig):
        from raybatch.engines.pool_handle import pool_handle, pool_name
        from raybatch.jobs.scheduler import scheduler_handle

        import ray

        # Through the module: Serve ships this class by value, globals and all, while
        # BodyLimit reads the module's own `SETTINGS`.
        from raybatch.api import body_limit

        self.config = body_limit.SETTINGS["config"] = config
        self.store = Store(config.storage)
        self.scheduler = scheduler_handle(config)
        self.engine_pool = pool_handle(pool_name(config.storage), config.account_weights)
        ray.get(self.scheduler.ready.remote())  # it makes the signing key first
        self.datasets = DatasetService(self.store, config)
        self.validations = BackgroundValidations(self.store, self.datasets, config)
        self.signer = UrlSigner(self.store, config.signed_url_seconds)
        self.rate_limiter = RateLimiter(config)

    def _authenticate(self, request: Request):
        """The request's key (401 without a valid one), counted against its rate (429)."""
        key = authenticate(self.store, request.headers.get("authorization"))
        self.rate_limiter.check(key.key_id, key.account)
        return key

    def _caller(self, request: Request, account: str, *ids: str):
        """IDs first (no storage call for a bad one), then the key, then the account."""
        check_id(account, "account ID")
        for resource_id in ids:
            check_id(resource_id)
        key = self._authenticate(request)
        if key.account != account:
            raise NotFound(f"account {account} not found")
        return key

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self, request: Request) -> dict:
        """The API's schema, for any valid key (it lists routes, not data)."""
        authenticate(self.store, request.headers.get("authorization"))
        from fastapi.openapi.utils import get_openapi

        return get_openapi(title=api.title, version=api.version, routes=api.routes)

    # ----------------------------------------------------------------- datasets

    @api.post("/v1/accounts/{account}/datasets")
    async def create_dataset(self, account: str, request: Request):
        query_params(request)
        body: CreateDatasetRequest = await read_body(request, CreateDatasetRequest)
        key = await run_in_threadpool(self._caller, request, account, body.dataset_id)
        dataset = await run_in_threadpool(self.datasets.create, account, body.dataset_id, body.dataset, key.key_id,
                                          body.source_dataset_id)
        if dataset.external_url:
            # Listed and measured where it is, like :validateUpload (in the background if
            # large). A failure is the dataset's status, not the create's: it exists, and
            # :validateUpload tries again once the files are there.
            try:
                dataset = await run_in_threadpool(self.validations.validate, account, body.dataset_id)
            except ApiError:
                dataset = await run_in_threadpool(self.datasets.get, account, body.dataset_id)
        return to_json(dataset)

    @api.get("/v1/accounts/{account}/datasets")
    def list_datasets(self, account: str, request: Request):
        query = query_params(request, pageSize=int, pageToken=str, filter=str, orderBy=str, readMask=str)
        mask = mask_paths(query["readMask"], Dataset)
        self._caller(request, account)
        found = listed(self.store.list_datasets(account), query["filter"], query["orderBy"], DATASET_FIELDS)
        page, token = page_of(found, query["pageSize"], query["pageToken"])
        page = [self.validations.view(dataset) for dataset in page]
        answer = to_json(ListDatasetsResponse(datasets=page, next_page_token=token, total_size=len(found)))
        answer["datasets"] = [apply_mask(dataset, mask) for dataset in answer["datasets"]]
        return answer

    @api.get("/v1/accounts/{account}/datasets/{reference}")
    def get_dataset(self, account: str, reference: str, request: Request):
        dataset_id, _, verb = reference.partition(":")
        if verb == "getDownloadEndpoint":
            query = query_params(request, downloadLineage=bool, readMask=str)
            mask = mask_paths(query["readMask"], FileUrls)
            key = self._caller(request, account, dataset_id)
            files, partial = self.datasets.download_files(account, dataset_id, bool(query["downloadLineage"]))
            base = str(request.base_url)
            urls = {name: self.signer.download_url(base, key.key_id, path) for name, path in files.items()}
            # `partial` only while a job writes the dataset: the parts committed so far.
            return apply_mask(to_json(FileUrls(filename_to_signed_urls=urls, partial=partial or None)), mask)
        query = query_params(request, readMask=str)
        mask = mask_paths(query["readMask"], Dataset)
        self._caller(request, account, dataset_id)
        if verb:
            raise NotFound(f"no method {verb!r} on datasets")
        return apply_mask(to_json(self.validations.view(self.datasets.get(account, dataset_id))), mask)

    @api.patch("/v1/accounts/{account}/datasets/{dataset_id}")
    async def update_dataset(self, account: str, dataset_id: str, request: Request):
        query_params(request)
        fields = await read_body(request, DatasetFields)
        await run_in_threadpool(self._caller, request, account, dataset_id)
        return to_json(await run_in_threadpool(self.datasets.update, account, dataset_id, fields))

    @api.delete("/v1/accounts/{account}/datasets/{dataset_id}")
    def delete_dataset(self, account: str, dataset_id: str, request: Request):
        query_params(request)
        self._caller(request, account, dataset_id)
        self.datasets.delete(account, dataset_id)
        return {}

    @api.post("/v1/accounts/{account}/datasets/{reference}")
    async def dataset_method(self, account: str, reference: str, request: Request):
        dataset_id, _, verb = reference.partition(":")
        query_params(request)
        key = await run_in_threadpool(self._caller, request, account, dataset_id)
        if verb == "upload":
            # The multipart parser spools the file to disk in the thread pool itself.
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidArgument("multipart field 'file' is missing")
            try:
                stored = await run_in_threadpool(
                    self.datasets.store_upload, account, dataset_id, upload_filename(upload.filename or ""), upload.file
                )
            finally:
                await form.close()
            # Validated like :validateUpload (in the background if large); if it fails,
            # the file is removed: a failed upload leaves nothing behind.
            await run_in_threadpool(self.validations.validate, account, dataset_id, [stored["filename"]])
            return stored
        if verb == "getUploadEndpoint":
            body: FileUrls = await read_body(request, FileUrls)
            mask = mask_paths(body.read_mask, FileUrls)

            def register() -> dict[str, str]:
                nonce, plan = self.datasets.upload_plan(account, dataset_id, body.filename_to_size or {}, key.key_id)
                base = str(request.base_url)
                return {name: self.signer.upload_url(base, key.key_id, account, dataset_id, nonce, name, size)
                        for name, size in plan.items()}

            return apply_mask(to_json(FileUrls(filename_to_signed_urls=await run_in_threadpool(register))), mask)
        if verb == "validateUpload":
            # Seconds for a large dataset (every file expanded and its lines counted): it
            # goes on in the background after validation_wait_seconds (validation.py).
            return to_json(await run_in_threadpool(self.validations.validate, account, dataset_id))
        raise NotFound(f"no method {verb!r} on datasets")

    # ---------------------------------------------- local signed upload/download

    @api.put(SIGNED_PREFIX + "{token}")
    async def signed_put(self, token: str, request: Request):
        """Local storage only (on S3 the signer serves no URL: 404). The URL's key must
        not be revoked, its dataset UPLOADING and its registration the current one; the
        body is exactly the registered size. It lands in the registration's upload
        area, which :validateUpload alone reads."""
        note = await run_in_threadpool(self._open_upload_url, token)
        written = 0
        # Streamed, exactly the registered size, and published only when complete.
        async with writer_off_loop(self.store.location, note["path"]) as write:
            async for chunk in request.stream():
                written += len(chunk)
                if written > note["size"]:
                    raise PayloadTooLarge(f"more bytes than the {note['size']} registered for this file")
                await write(chunk)
            if written != note["size"]:
                raise InvalidArgument(f"{written} bytes sent, {note['size']} registered for this file")
        return {"bytes": written}

    def _open_upload_url(self, token: str) -> dict:
        note = self.signer.open(token, "put")
        dataset = self.datasets.get(note["account"], note["dataset"])
        registration = self.datasets.registration(note["account"], note["dataset"])
        if (dataset.state.value != "UPLOADING" or dataset.source_job_name or registration is None
                or registration["nonce"] != note["nonce"] or registration["files"].get(note["file"]) != note["size"]):
            raise FailedPrecondition("this upload URL no longer applies: its dataset is not UPLOADING "
                                     "or its registration was replaced")
        if self.validations.running(note["account"], note["dataset"]):
            raise FailedPrecondition(f"dataset {note['dataset']} is being validated; its files cannot "
                                     "change until that ends (its status shows the progress)")
        return note

    @api.get(SIGNED_PREFIX + "{token}")
    def signed_get(self, token: str):
        note = self.signer.open(token, "get")
        location = self.store.location
        if not location.exists(note["path"]):
            raise NotFound("file not found")
        handle = location.open_read(note["path"])

        def chunks():
            with handle:
                while chunk := handle.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    # ------------------------------------------------------------------- jobs

    @api.post("/v1/accounts/{account}/batchInferenceJobs")
    async def create_job(self, account: str, request: Request):
        job_id = query_params(request, batchInferenceJobId=str)["batchInferenceJobId"]
        body: CreateJobRequest = await read_body(request, CreateJobRequest)
        key = await run_in_threadpool(self._caller, request, account, *([job_id] if job_id else []))
        return await self.scheduler.create_job.remote(account, job_id, body, key.key_id)

    @api.post("/v1/accounts/{account}/batchInferenceJobs:validate")
    async def dry_run_job(self, account: str, request: Request):
        """A dry run (ours): the create body checked and its input read and validated as
        the job would; line counts, bad lines by code, input tokens. Nothing is written."""
        from raybatch.jobs.dry_run import dry_run

        query_params(request, batchInferenceJobId=str)  # accepted as create takes it; unused
        body: CreateJobRequest = await read_body(request, CreateJobRequest)
        await run_in_threadpool(self._caller, request, account)
        return to_json(await run_in_threadpool(dry_run, self.store, self.config, account, body))

    @api.get("/v1/accounts/{account}/batchInferenceJobs")
    def list_jobs(self, account: str, request: Request):
        query = query_params(request, pageSize=int, pageToken=str, filter=str, orderBy=str, readMask=str)
        mask = mask_paths(query["readMask"], BatchInferenceJob)
        self._caller(request, account)
        visible = [r.job for r in self.store.list_jobs(account) if not r.runtime.delete_requested]
        jobs = listed(visible, query["filter"], query["orderBy"], JOB_FIELDS)
        page, token = page_of(jobs, query["pageSize"], query["pageToken"])
        answer = to_json(ListJobsResponse(batch_inference_jobs=page, next_page_token=token, total_size=len(jobs)))
        answer["batchInferenceJobs"] = [apply_mask(job, mask) for job in answer["batchInferenceJobs"]]
        return answer

    @api.get("/v1/accounts/{account}/batchInferenceJobs/{job_id}")
    def get_job(self, account: str, job_id: str, request: Request):
        mask = mask_paths(query_params(request, readMask=str)["readMask"], BatchInferenceJob)
        self._caller(request, account, job_id)
        record = self.store.get_job(account, job_id)
        if record is None or record.runtime.delete_requested:  # deleted, still stopping
            raise NotFound(f"batch inference job {job_id} not found")
        return apply_mask(to_json(record.job), mask)

    @api.post("/v1/accounts/{account}/batchInferenceJobs/{reference}")
    async def job_method(self, account: str, reference: str, request: Request):
        job_id, _, verb = reference.partition(":")
        query_params(request)
        await run_in_threadpool(self._caller, request, account, job_id)
        if verb != "cancel":
            raise NotFound(f"no method {verb!r} on batchInferenceJobs")
        return await self.scheduler.cancel_job.remote(account, job_id)

    @api.delete("/v1/accounts/{account}/batchInferenceJobs/{job_id}")
    async def delete_job(self, account: str, job_id: str, request: Request):
        query_params(request)
        await run_in_threadpool(self._caller, request, account, job_id)
        await self.scheduler.delete_job.remote(account, job_id)
        return Response(content=b"{}", media_type="application/json")

    # ------------------------------------------------------------------- admin

    @api.get("/v1/admin/engines")
    async def list_engines(self, request: Request):
        """The engine pool's replicas, for the accounts in `admin_accounts` only."""
        key = await run_in_threadpool(self._authenticate, request)
        if key.account not in self.config.admin_accounts:
            raise PermissionDenied("this route is for the service's admin accounts")
        return {"replicas": await self.engine_pool.replicas.remote()}


def build_app(args: dict) -> serve.Application:
    return RaybatchApi.bind(ServiceConfig.model_validate(args or {}))
