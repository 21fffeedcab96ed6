"""Fixtures for the service tests: a fresh API (no worker) per test, keys, and a loopback image server.

Network rule: tests only ever send traffic to 127.0.0.1. The image server binds 127.0.0.1 on a free
port; `loopback_only` makes any outgoing request of the service to another address fail the test
(the service must reject such URLs before it connects anywhere).
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from hidream.service.app import create_app
from hidream.service.settings import Settings
from hidream.service.storage import LocalStorage
from hidream.service.store import Store
from hidream.service.tables import tasks, uploads, usage
from server_util import ChatServer  # tests/service/server_util.py

MODEL = "hidream-o1-image"
BASE_URL = "http://127.0.0.1:8000"  # Settings' default base_url (host 127.0.0.1, port 8000)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24), mode: str = "RGB", noise: bool = False) -> bytes:
    """An image in `fmt`; `noise` makes it incompressible (so a PNG's byte size is about width*height*3)."""
    if noise:
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        img = Image.new(mode, size, (200, 30, 60) if mode == "RGB" else 0)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (32, 24), mode: str = "RGB", noise: bool = False) -> bytes:
    """A PNG; `noise` makes it incompressible (so its byte size is about width*height*3)."""
    return image_bytes("PNG", size, mode, noise)


PNG = png_bytes()
JPEG = image_bytes("JPEG")
WEBP = image_bytes("WEBP")
BIG_PNG = png_bytes((64, 64), noise=True)  # about 12 KiB


@functools.cache
def bomb() -> bytes:
    """64 megapixels of zeros (over the default 40 MP cap), a few tens of KiB compressed; built on first use."""
    return png_bytes((8000, 8000), mode="L")


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 that counts the requests it got, per path.

    Routes: /ok.png, /ok.jpg, /ok.webp (32x24 images), /big.png (about 12 KiB of noise), /big (a PNG
    followed by 5000 zero bytes), /bomb (64 MP), /truncated (half a PNG), /text, /missing (404),
    /redirect-ok, /redirect-private, /redirect-loop, /redirect-loopback-name, and /slow (answers after
    3 s, or as soon as `stop` is set); anything else is a 404.
    """

    png = PNG  # what /ok.png serves
    jpeg = JPEG  # what /ok.jpg serves
    webp = WEBP  # what /ok.webp serves
    big_png = BIG_PNG  # what /big.png serves

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set when closing, so that /slow answers at once
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                with srv.lock:
                    srv.hits.append(self.path)
                routes: dict[str, Callable[[], None]] = {
                    "/ok.png": lambda: self._send(200, PNG),
                    "/ok.jpg": lambda: self._send(200, JPEG, "image/jpeg"),
                    "/ok.webp": lambda: self._send(200, WEBP, "image/webp"),
                    "/big.png": lambda: self._send(200, BIG_PNG),
                    "/big": lambda: self._send(200, PNG + b"\0" * 5000),
                    "/bomb": lambda: self._send(200, bomb()),
                    "/truncated": lambda: self._send(200, PNG[: len(PNG) // 2]),
                    "/text": lambda: self._send(200, b"hello, not an image", "text/plain"),
                    "/missing": lambda: self._send(404, b"nope", "text/plain"),
                    "/redirect-ok": lambda: self._send(302, Location="/ok.png"),
                    "/redirect-private": lambda: self._send(302, Location="http://10.0.0.1/x.png"),
                    "/redirect-loop": lambda: self._send(302, Location="/redirect-loop"),
                    "/redirect-loopback-name": lambda: self._send(
                        302, Location=f"http://localhost:{srv.port}/ok.png"
                    ),
                    "/slow": self._slow,
                }
                routes.get(self.path, lambda: self._send(404, b"", "text/plain"))()

            def _slow(self) -> None:
                srv.stop.wait(3.0)
                try:
                    self._send(200, PNG)
                except OSError:  # the client gave up (timed out) meanwhile
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="image-server", daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def count(self) -> int:
        """How many requests the server got so far (all paths)."""
        with self.lock:
            return len(self.hits)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Release /slow's waiting handlers, stop serving, close the socket."""
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    srv = ImageServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="session")
def chat_server() -> Iterator[ChatServer]:
    """A prompt refiner's endpoint on loopback (server_util.ChatServer)."""
    srv = ChatServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any request the service sends to an address other than 127.0.0.1 fails the test, unsent."""
    real_send = httpx.AsyncClient.send

    async def guarded(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        if request.url.host != "127.0.0.1":
            raise AssertionError(f"the service tried to connect to {request.url}")
        return await real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", guarded)


@dataclass
class Service:
    """One API over its own database and storage directory; `h1`/`h2` authenticate two different keys."""

    settings: Settings
    store: Store
    storage: LocalStorage
    app: FastAPI
    client: TestClient
    key1: str
    key2: str
    token1: str
    token2: str
    h1: dict[str, str] = field(default_factory=dict)
    h2: dict[str, str] = field(default_factory=dict)

    def leftovers(self) -> tuple[int, int, int]:
        """(task rows, usage rows, files under the storage directory)."""
        with self.store.engine.connect() as conn:
            n_tasks = conn.execute(select(func.count()).select_from(tasks)).scalar_one()
            n_usage = conn.execute(select(func.count()).select_from(usage)).scalar_one()
        n_files = sum(1 for p in Path(self.settings.files_dir).rglob("*") if p.is_file())
        return n_tasks, n_usage, n_files

    def upload_rows(self) -> int:
        with self.store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(uploads)).scalar_one()

    def submit(self, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
        body = {"model": MODEL, "prompt": "a red fox in the snow", **fields}
        return self.client.post("/api/v1/model/generateImage", json=body, headers=self.h1 if headers is None else headers)


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """A factory: make_service(**settings overrides) -> a fresh Service (no worker: tasks stay `created`)."""
    made: list[Service] = []

    def make(**overrides: Any) -> Service:
        home = tmp_path / f"svc{len(made)}"
        settings = Settings(home=home, database_url=f"sqlite:///{home}/db.sqlite", storage_dir=home / "files",
                            fetch_allow=())
        if overrides:
            settings = replace(settings, **overrides)
        store = Store.open(settings.db_url)
        storage = LocalStorage(settings.files_dir)
        app = create_app(settings, store, storage)
        client = TestClient(app, base_url=BASE_URL, raise_server_exceptions=False)
        (k1, t1), (k2, t2) = store.create_key("one"), store.create_key("two")
        svc = Service(settings, store, storage, app, client, k1.id, k2.id, t1, t2,
                      {"Authorization": f"Bearer {t1}"}, {"Authorization": f"Bearer {t2}"})
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.client.close()
        svc.store.engine.dispose()


@pytest.fixture
def service(make_service: Callable[..., Service]) -> Service:
    return make_service()
