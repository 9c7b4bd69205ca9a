"""Short-lived URLs for uploading and downloading dataset files.

On S3 they are S3's own presigned URLs: bytes go straight to the bucket. On local
storage raybatch serves them itself under `/v1/signed/{token}`, the token an
HMAC-signed, timestamped (itsdangerous) note of the operation and the file; the key is
the store's `service/signing-key`, shared by every API replica.
"""

from __future__ import annotations

import os
from typing import Optional

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from raybatch.exceptions import InvalidArgument, NotFound
from raybatch.store import Store

SIGNED_PREFIX = "/v1/signed/"


class UrlSigner:
    def __init__(self, store: Store, lifetime_seconds: int):
        self._store = store
        self._lifetime = lifetime_seconds
        self._serializer = URLSafeTimedSerializer(store.signing_key(), salt="raybatch-file-url")
        self._s3 = None
        if store.root_url.startswith(("s3://", "s3a://")):
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            self._s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(signature_version="s3v4"))

    def url(self, base_url: str, operation: str, relative: str, size: Optional[int] = None) -> str:
        """A URL to PUT (`operation="put"`) or GET (`"get"`) the store's `relative` file."""
        if self._s3 is not None:
            bucket, _, key = self._store.location.path(relative).partition("/")
            method = "put_object" if operation == "put" else "get_object"
            return self._s3.generate_presigned_url(
                method, Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._lifetime
            )
        token = self._serializer.dumps({"op": operation, "path": relative, "size": size})
        return f"{base_url.rstrip('/')}{SIGNED_PREFIX}{token}"

    def open(self, token: str, operation: str) -> dict:
        """The signed note of a local URL, or 404 when it is forged, expired or for
        another operation (one answer for all, so a probe learns nothing)."""
        try:
            note = self._serializer.loads(token, max_age=self._lifetime)
        except (SignatureExpired, BadSignature):
            raise NotFound("signed URL invalid or expired") from None
        if note.get("op") != operation:
            raise NotFound("signed URL invalid or expired")
        if ".." in note["path"].split("/"):
            raise InvalidArgument("bad path")  # cannot happen: we signed it
        return note
