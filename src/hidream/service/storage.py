"""Blob storage behind a small interface (local directory now), and signed, expiring file URLs."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Protocol

from hidream.service.errors import NotFound

_KEY = re.compile(r"^[a-z]+(/[A-Za-z0-9_-]+)+\.[a-z]+$")


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...


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
        self._path(key).unlink(missing_ok=True)


class UrlSigner:
    """`/files/<key>?expires=<unix>&signature=<hmac>`: unguessable, expiring, checked by the app."""

    def __init__(self, secret: str, base_url: str, ttl_s: int) -> None:
        self._secret = secret.encode()
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s

    def _mac(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.ttl_s)
        return f"{self.base_url}/files/{key}?expires={expires}&signature={self._mac(key, expires)}"

    def verify(self, key: str, expires: str, signature: str, now: float | None = None) -> bool:
        try:
            exp = int(expires)
        except ValueError:
            return False
        if exp < (now or time.time()):
            return False
        return hmac.compare_digest(self._mac(key, exp), signature)

    def key_of(self, url: str) -> str | None:
        """The storage key of a URL this service issued (any query), else None."""
        prefix = self.base_url + "/files/"
        if not url.startswith(prefix):
            return None
        return url[len(prefix):].split("?", 1)[0] or None
