"""Datasets read in place from an `externalUrl` (Fireworks' `Dataset.externalUrl`): an
`s3://` or `gs://` prefix of `.jsonl` shards or one file, or an `https://` file. Jobs
read it where it is, with the service's own credentials (the usual AWS / Google
environment of the API replicas and the job drivers); nothing is copied into the store.

Those credentials reach the service's own storage, and perhaps more than a tenant
should read, so a tenant's URL is checked at create (400 INVALID_ARGUMENT otherwise):

- its scheme is one of `external_url_schemes` (s3, gs, https): never `file://` or a
  plain path, which would read the API replica's or a worker's local files;
- it carries no user name or password (it is stored and shown back);
- it does not overlap the service's storage root, where every account's datasets,
  the key records and the signing key live (neither inside it nor a prefix of it);
- it lies under one of `external_url_prefixes`, when the operator lists some;
- an http(s) host resolves to public addresses only, unless
  `external_url_private_hosts`: no loopback, private, link-local (cloud metadata) or
  reserved address. The name is resolved here, once; a DNS name that later resolves
  elsewhere (rebinding) is not caught: operators who fear it list prefixes.

Redirects are not followed (`storage.filesystem_for`), and an http(s) URL names one
file: fsspec would otherwise follow an HTML page's links to any host.

`ExternalFiles` lists and opens the URL's shards with the same functions a job uses
(`storage.list_shards`, `open_shard`), so validation measures what a job will read.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import IO
from urllib.parse import urlsplit

from raybatch.config import ServiceConfig
from raybatch.exceptions import ConfigError, FailedPrecondition, InvalidArgument
from raybatch.storage import list_shards, open_shard

MAX_URL_CHARS = 2048
OBJECT_STORES = ("s3", "s3a", "gs", "gcs")


def check_external_url(url: str, config: ServiceConfig) -> str:
    """The URL if a tenant may name it (see the module docstring); else InvalidArgument."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS or any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidArgument(f"externalUrl must be a URL of at most {MAX_URL_CHARS} characters, without spaces")
    allowed = [scheme.lower() for scheme in config.external_url_schemes]
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "://" not in url or scheme not in allowed or scheme == "file":
        raise InvalidArgument(
            f"externalUrl {url!r} is not read: use {', '.join(s + '://' for s in allowed)} "
            "(local files and other schemes are refused)")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("externalUrl must not carry credentials: the service reads with its own")
    if not parts.hostname:
        raise InvalidArgument(f"externalUrl {url!r} names no {'bucket' if scheme in OBJECT_STORES else 'host'}")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise InvalidArgument(f"externalUrl {url!r} holds a '.' or '..' segment")
    if config.external_url_prefixes and not any(_under(url, prefix) for prefix in config.external_url_prefixes):
        raise InvalidArgument(f"externalUrl {url!r} is outside the prefixes this service reads: "
                              + ", ".join(config.external_url_prefixes))
    if scheme in OBJECT_STORES and _overlaps_store(scheme, parts.netloc, parts.path, config.storage):
        raise InvalidArgument(f"externalUrl {url!r} points into the service's own storage")
    if scheme in ("http", "https") and not config.external_url_private_hosts:
        _check_public_host(parts.hostname, parts.port or (443 if scheme == "https" else 80))
    return url


def _under(url: str, prefix: str) -> bool:
    return url == prefix.rstrip("/") or url.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _bucket_key(netloc: str, path: str) -> str:
    return f"{netloc.lower()}/{path.strip('/')}".rstrip("/")


def _overlaps_store(scheme: str, netloc: str, path: str, storage: str) -> bool:
    """Whether `scheme://netloc/path` lies inside the store root, or holds it."""
    root = urlsplit(storage)
    same_service = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
    if same_service.get(root.scheme.lower()) != same_service[scheme]:
        return False  # a local store, or another service: no object of it is reachable so
    wanted, store = _bucket_key(netloc, path), _bucket_key(root.netloc, root.path)
    # `store.startswith(wanted)` without a '/' boundary on purpose: S3 lists by plain
    # prefix, so `s3://bucket/ray` would list `s3://bucket/raybatch/...`.
    return store.startswith(wanted) or wanted.startswith(store + "/")


def _check_public_host(host: str, port: int) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError) as error:
        raise InvalidArgument(f"externalUrl host {host!r} does not resolve: {error}") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:127.0.0.1 is 127.0.0.1
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            raise InvalidArgument(f"externalUrl host {host!r} resolves to {ip}, a non-public address: "
                                  "the service does not read its own network")


class ExternalFiles:
    """The shards of an externalUrl, listed as a job lists them, read through the two
    calls `DatasetService.validate` makes of a `Location` (`size`, `open_read`)."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.shards = {shard.name: shard for shard in list_shards(url)}
        except ConfigError as error:  # not found, or no .jsonl under the prefix
            raise FailedPrecondition(f"externalUrl: {error}") from None
        except OSError as error:  # access denied, no such bucket, a host that refuses
            raise FailedPrecondition(f"externalUrl {url} cannot be read with the service's credentials: "
                                     f"{type(error).__name__}: {error}") from None
        if urlsplit(url).scheme.lower() in ("http", "https") and [s.url for s in self.shards.values()] != [url]:
            # fsspec would list an HTML page's links, to any host: one file only.
            raise FailedPrecondition(f"externalUrl {url}: an http(s) URL names one .jsonl file, not a listing")

    def size(self, name: str) -> int:
        return self.shards[name].size

    def open_read(self, name: str) -> IO[bytes]:
        return open_shard(self.shards[name])
