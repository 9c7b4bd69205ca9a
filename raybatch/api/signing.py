"""Short-lived URLs for uploading and downloading dataset files.

On S3 they are S3's own presigned URLs: bytes go straight to the bucket, and an upload
URL signs the registered Content-Length, so S3 takes exactly that many bytes. On local
storage raybatch serves them itself under `/v1/signed/{token}`, the token an
HMAC-signed, timestamped (itsdangerous) note of the operation and the file; the key is
the store's `service/signing-key`, shared by every API replica. S3 storage has no
`/v1/signed/` route and no signing key.

A note never carries a free path. An upload note names an account, a dataset, a
registration (nonce) and a file name, and the path is built here inside that dataset's
upload area; a download note's path must be a file of a dataset (`DOWNLOADABLE`). So
even a token signed with a stolen key reaches no key record, no job record and not the
signing key. Each note also names the API key that asked for it: revoking that key ends
its URLs.
"""

from __future__ import annotations

import os
import re

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from raybatch.exceptions import ApiError, NotFound
from raybatch.store import Store

SIGNED_PREFIX = "/v1/signed/"
_ID = r"[a-z][a-z0-9-]{0,62}"
_FILE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.jsonl"
# A dataset's files; while a job writes one, also its committed parts (partial downloads).
DOWNLOADABLE = re.compile(rf"accounts/{_ID}/datasets/{_ID}/files/(?:_raybatch/parts/)?{_FILE}")
NONCE = re.compile(r"[0-9a-f]{32}")


def upload_path(store: Store, account: str, dataset_id: str, nonce: str, filename: str) -> str:
    """Store-relative path where a signed PUT of `filename` lands: inside the dataset's
    upload area, under the registration's nonce, so that a URL of an earlier
    registration (or one used after the dataset is READY) writes where nothing reads."""
    if not NONCE.fullmatch(nonce) or not re.fullmatch(_FILE, filename) or ".." in filename:
        raise NotFound("signed URL invalid or expired")
    return f"{store.dataset_uploads(account, dataset_id)}/{nonce}/{filename}"


class UrlSigner:
    def __init__(self, store: Store, lifetime_seconds: int):
        self._store = store
        self._lifetime = lifetime_seconds
        self._serializer = None
        self._s3 = None
        if store.local:
            self._serializer = URLSafeTimedSerializer(store.signing_key(), salt="raybatch-file-url")
        else:
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            self._s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(signature_version="s3v4"))

    @property
    def serves_urls(self) -> bool:
        """Whether the API answers `/v1/signed/` itself (local storage)."""
        return self._serializer is not None

    def upload_url(self, base_url: str, key_id: str, account: str, dataset_id: str, nonce: str,
                   filename: str, size: int) -> str:
        """A URL to PUT exactly `size` bytes of `filename` for registration `nonce`."""
        if self._s3 is not None:
            bucket, _, key = self._store.location.path(upload_path(self._store, account, dataset_id, nonce, filename)).partition("/")
            # ContentLength is a signed header: S3 refuses a PUT of any other size.
            return self._s3.generate_presigned_url(
                "put_object", Params={"Bucket": bucket, "Key": key, "ContentLength": size}, ExpiresIn=self._lifetime
            )
        note = {"op": "put", "key": key_id, "account": account, "dataset": dataset_id, "nonce": nonce,
                "file": filename, "size": size}
        return f"{base_url.rstrip('/')}{SIGNED_PREFIX}{self._serializer.dumps(note)}"

    def download_url(self, base_url: str, key_id: str, relative: str) -> str:
        """A URL to GET the store's `relative` file, a file of a dataset."""
        if not DOWNLOADABLE.fullmatch(relative):
            raise ValueError(f"not a dataset file: {relative}")
        if self._s3 is not None:
            bucket, _, key = self._store.location.path(relative).partition("/")
            return self._s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._lifetime)
        note = {"op": "get", "key": key_id, "path": relative}
        return f"{base_url.rstrip('/')}{SIGNED_PREFIX}{self._serializer.dumps(note)}"

    def open(self, token: str, operation: str) -> dict:
        """The signed note of a local URL, or 404 when it is forged, expired, for another
        operation, outside the files it may name, or its key was revoked (one answer
        for all, so a probe learns nothing)."""
        invalid = NotFound("signed URL invalid or expired")
        if self._serializer is None:
            raise invalid
        try:
            note = self._serializer.loads(token, max_age=self._lifetime)
        except (SignatureExpired, BadSignature):
            raise invalid from None
        if not isinstance(note, dict) or note.get("op") != operation or not isinstance(note.get("key"), str):
            raise invalid
        try:
            key = self._store.get_key(note["key"])
        except Exception:
            raise invalid from None
        if key is None or key.revoked:
            raise invalid
        if operation == "get":
            path = note.get("path")
            if not isinstance(path, str) or not DOWNLOADABLE.fullmatch(path) or path.split("/")[1] != key.account:
                raise invalid
            return note
        if note.get("account") != key.account or not isinstance(note.get("size"), int):
            raise invalid
        try:
            note["path"] = upload_path(self._store, note["account"], note["dataset"], note["nonce"], note["file"])
        except (TypeError, ValueError, ApiError):
            raise invalid from None
        return note
