"""Blob storage behind a small interface (a local directory or an S3 bucket), and signed, expiring file URLs."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from hidream.service.errors import NotFound, ServiceError

if TYPE_CHECKING:
    from hidream.service.settings import Settings

_KEY = re.compile(r"^[a-z]+(/[A-Za-z0-9_-]+)+\.[a-z]+$")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[tuple[str, float]]:
        """(key, last modified as Unix seconds) of every file whose key starts with `prefix`."""
        ...

    def public_url(self, key: str) -> str | None:
        """A URL that clients can download `key` from directly, or None: the app serves it under /files."""
        ...


class LocalStorage:
    """Files under one directory; a key is a relative path like `outputs/<task>/0.png`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise NotFound(f"no such file: {key}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        """Write atomically: a reader never sees half a file."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as err:
            raise NotFound(f"no such file: {key}") from err

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        if path.parent.parent != self.root:  # outputs/<task>/0.png: no empty <task> folder stays behind
            try:
                path.parent.rmdir()
            except OSError:  # not empty, or gone
                pass

    def list(self, prefix: str) -> list[tuple[str, float]]:
        top = self.root / prefix.split("/", 1)[0]
        found = []
        for path in top.rglob("*") if top.is_dir() else ():
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and _KEY.match(key):  # not a half-written .tmp- file
                try:
                    found.append((key, path.stat().st_mtime))
                except FileNotFoundError:  # deleted meanwhile
                    pass
        return sorted(found)

    def public_url(self, key: str) -> None:
        return None  # the app signs its own /files URL


class S3Storage:
    """Objects in an S3-compatible bucket, at `<prefix>/<key>`; clients download them by presigned URL."""

    def __init__(self, bucket: str, prefix: str, client: Any, url_ttl_s: int) -> None:
        self.bucket, self.prefix, self.client, self.url_ttl_s = bucket, prefix.strip("/"), client, url_ttl_s

    def _object(self, key: str) -> str:
        if not _KEY.match(key):
            raise NotFound(f"no such file: {key}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        """One PUT: S3 makes the object visible whole or not at all."""
        ctype = CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")
        self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=ctype)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no such file: {key}") from err
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))  # a missing key is no error

    def list(self, prefix: str) -> list[tuple[str, float]]:
        base = f"{self.prefix}/" if self.prefix else ""
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
            found += [(obj["Key"][len(base):], obj["LastModified"].timestamp()) for obj in page.get("Contents", [])]
        return sorted(found)

    def public_url(self, key: str) -> str:
        """A presigned GET URL, valid url_ttl_s seconds; computed locally, no request to S3."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=self.url_ttl_s)


def discard_task_files(storage: Storage, task_id: str, outputs: bool = True) -> None:
    """Delete what a task that ended keeps no use for: its references, and with `outputs` (a task that did
    not complete) any images an attempt stored before it failed."""
    for prefix in ("references/", "outputs/") if outputs else ("references/",):
        for key, _ in storage.list(f"{prefix}{task_id}/"):
            storage.delete(key)


# Bounds on each S3 call, so that an unreachable endpoint fails start-up in seconds, not minutes.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 60.0
S3_MAX_ATTEMPTS = 3
S3_MAX_URL_TTL_S = 7 * 24 * 3600  # SigV4's limit on a presigned URL


def s3_client(settings: Settings, region: str | None = None, connect_timeout_s: float = S3_CONNECT_TIMEOUT_S,
              read_timeout_s: float = S3_READ_TIMEOUT_S, max_attempts: int = S3_MAX_ATTEMPTS) -> Any:
    """A boto3 S3 client from the settings; credentials left unset use boto3's default chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4", connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        # Path-style (endpoint/bucket/key) on a custom endpoint: MinIO and most others need no DNS for it.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=region or settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=settings.s3_secret_access_key,
        config=config)


def _why(err: Exception, bucket: str) -> str:
    """A short reason for a failed S3 call."""
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            return f"bucket {bucket!r} does not exist"
        if code in ("403", "AccessDenied") or status == 403:
            return f"access denied to bucket {bucket!r} (check the credentials and the bucket policy)"
        return f"{code or status}: {error.get('Message') or err}"
    return f"{type(err).__name__}: {err}"


def open_storage(settings: Settings, **client_options: Any) -> Storage:
    """The configured storage: `storage_url` s3://bucket/prefix (checked now: the bucket exists and
    takes writes), a local path, or by default the local directory `files_dir`.

    Any problem raises ServiceError naming HIDREAM_STORAGE_URL, so that a process refuses to start.
    `client_options` go to s3_client (timeouts, attempts).
    """
    url = settings.storage_url
    if not url:
        return LocalStorage(settings.files_dir)
    parts = urlsplit(url)
    if parts.scheme == "file" or (len(parts.scheme) <= 1 and "://" not in url):  # a path (or C:\...)
        return LocalStorage(Path(parts.path if parts.scheme == "file" else url).expanduser())
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ServiceError(f"HIDREAM_STORAGE_URL: cannot use {url!r}: expected s3://bucket/optional/prefix "
                           "or a local directory")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    where = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if bool(settings.s3_access_key_id) != bool(settings.s3_secret_access_key):
        raise ServiceError(f"HIDREAM_STORAGE_URL: cannot use {where}: set both HIDREAM_S3_ACCESS_KEY_ID and "
                           "HIDREAM_S3_SECRET_ACCESS_KEY, or neither (boto3's default credentials)")
    if not 1 <= settings.url_ttl_s <= S3_MAX_URL_TTL_S:
        raise ServiceError(f"HIDREAM_URL_TTL_S: cannot use {settings.url_ttl_s} with {where}: presigned S3 URLs "
                           f"are valid 1 to {S3_MAX_URL_TTL_S} seconds (7 days)")
    from botocore.exceptions import BotoCoreError, ClientError

    step = ""
    try:
        client = s3_client(settings, **client_options)
        head = client.head_bucket(Bucket=bucket)
        # Presigned URLs must be signed for the bucket's own region: take it from S3 when none is set.
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if not settings.s3_region and region and region != client.meta.region_name:
            client = s3_client(settings, region=region, **client_options)
        probe = f"{prefix}/.hidream-probe-{uuid.uuid4().hex}" if prefix else f".hidream-probe-{uuid.uuid4().hex}"
        step = f"writing a test object {probe!r}: "
        client.put_object(Bucket=bucket, Key=probe, Body=b"hidream write check", ContentType="text/plain")
        step = f"deleting the test object {probe!r}: "
        client.delete_object(Bucket=bucket, Key=probe)
    except (BotoCoreError, ClientError, ValueError) as err:  # ValueError: e.g. a malformed endpoint URL
        raise ServiceError(f"HIDREAM_STORAGE_URL: cannot use {where}: {step}{_why(err, bucket)}") from err
    return S3Storage(bucket, prefix, client, settings.url_ttl_s)


class UrlSigner:
    """`/files/<key>?expires=<unix>&signature=<hmac>`: unguessable, expiring, checked by the app."""

    def __init__(self, secret: str, base_url: str, ttl_s: int) -> None:
        self._secret = secret.encode()
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s

    def mac(self, key: str, expires: int) -> str:
        """The signature of `key` until `expires` (what `verify` checks): for file URLs and other signed links."""
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.ttl_s)
        return f"{self.base_url}/files/{key}?expires={expires}&signature={self.mac(key, expires)}"

    def verify(self, key: str, expires: str, signature: str, now: float | None = None) -> bool:
        try:
            exp = int(expires)
        except ValueError:
            return False
        if exp < (now or time.time()):
            return False
        return hmac.compare_digest(self.mac(key, exp), signature)

    def key_of(self, url: str) -> str | None:
        """The storage key of a URL this service issued (any query), else None."""
        prefix = self.base_url + "/files/"
        if not url.startswith(prefix):
            return None
        return url[len(prefix):].split("?", 1)[0] or None
