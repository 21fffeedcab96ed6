"""Defects a new user meets first, each against a real `hidream serve` on 127.0.0.1 (the demo checkpoint):
readiness while the model loads, the docs offline, redirects to unparsable locations (webhooks and references),
references the engine would refuse, files left by crashes, the OpenAPI description, and error wording."""

from __future__ import annotations

import base64
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hidream.service.app import create_app
from hidream.service.janitor import ORPHAN_AFTER_S
from hidream.service.settings import Settings
from hidream.service.storage import LocalStorage
from hidream.service.store import Store

try:  # tests/service as a package or as a plain directory on sys.path
    from . import server_util as su
except ImportError:
    import server_util as su

MODEL = "hidream-o1-image"
GENERATE = "/api/v1/model/generateImage"
SMALL = {"model": MODEL, "prompt": "a lighthouse", "image_size": "256x256", "num_inference_steps": 2}
BAD_LOCATION = "data:image/png;base64,iVBORw0KGgo="  # httpx cannot build a request for it, even unfollowed
GIVE_UP_S = 3.0

pytestmark = pytest.mark.timeout(240)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Peer:
    """A loopback HTTP server: GET /bad-location and POST /bad-location answer 302 to an unparsable Location;
    GET /thin-<W>x<H>.png serves a PNG of that size; POST /ok answers 204. It counts the POSTs per path."""

    posts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/bad-location":
                    return self._answer(302, Location=BAD_LOCATION)
                if m := re.fullmatch(r"/thin-(\d+)x(\d+)\.png", self.path):
                    return self._answer(200, png(int(m[1]), int(m[2])), **{"Content-Type": "image/png"})
                self._answer(404)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with peer.lock:
                    peer.posts[self.path] = peer.posts.get(self.path, 0) + 1
                if self.path == "/bad-location":
                    return self._answer(302, Location=BAD_LOCATION)
                self._answer(204 if self.path == "/ok" else 404)

        self.http = su.LoopbackHTTP(Handler)

    def url(self, path: str) -> str:
        return self.http.url(path)

    def count(self, path: str) -> int:
        with self.lock:
            return self.posts.get(path, 0)

    def close(self) -> None:
        self.http.close()


@dataclass
class Server:
    proc: su.Proc
    key: str
    env: dict[str, str]
    home: Path
    peer: Peer

    def client(self) -> httpx.Client:
        return su.client(self.proc.base_url, self.key)

    @property
    def files(self) -> Path:
        return self.home / "storage"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("first-contact")
    peer = Peer()
    peer.start()
    procs = su.Processes(root / "logs")
    env = su.service_env(root / "home", demo_checkpoint, fetch_allow="127.0.0.1/32", webhook_retry_s=0.2,
                         webhook_timeout_s=1.0, webhook_give_up_s=GIVE_UP_S)
    try:
        proc = procs.serve(env)
        yield Server(proc, proc.first_key(), env, root / "home", peer)
    finally:
        procs.stop_all()
        peer.close()


def stored(root: Path, prefix: str) -> list[str]:
    top = root / prefix
    return sorted(p.relative_to(root).as_posix() for p in top.rglob("*") if p.is_file()) if top.is_dir() else []


# --- 2. /readyz is 503 until the worker has its model ---------------------------------------------------------


def test_readyz_is_503_while_the_model_loads_then_200(tmp_path: Path) -> None:
    from hidream.service.worker import Worker

    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite", storage_dir=tmp_path / "f")
    store, storage = Store.open(settings.db_url), LocalStorage(settings.files_dir)
    loading = threading.Event()

    def load():
        loading.wait(30)  # a model that takes its time
        return object()

    worker = Worker(settings, store, storage, load, poll_s=0.02)
    with TestClient(create_app(settings, store, storage, worker)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["data"] == {"ready": False, "worker": "starting"}, r.text
        assert "loading the model" in r.json()["message"]
        assert client.get("/healthz").status_code == 503
        assert client.get("/livez").status_code == 200  # alive all the same
        loading.set()
        deadline = time.monotonic() + 10
        while (r := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.02)
        assert r.json()["data"] == {"ready": True, "worker": "idle"}


def test_a_real_server_is_ready_with_its_model(server: Server) -> None:
    r = httpx.get(server.proc.base_url + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["data"] == {"ready": True, "worker": "idle"}


# --- 7. the docs work with no network ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_files_of_the_server(server: Server, page: str) -> None:
    html = httpx.get(server.proc.base_url + page, timeout=10)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text) + re.findall(r"""url: ?['"]([^'"]+)['"]""",
                                                                                  html.text)
    assert urls, html.text
    assert not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls  # no CDN, no other host
    for url in urls:
        asset = httpx.get(server.proc.base_url + url, timeout=10)
        assert asset.status_code == 200 and asset.content, url
    assert any(u.endswith(".js") for u in urls)


# --- 16. a webhook receiver redirecting to an unparsable Location -------------------------------------------------


def test_a_redirect_to_an_unparsable_location_is_a_recorded_failed_attempt(server: Server) -> None:
    with server.client() as c:
        bad = su.ok(c.post(GENERATE, json=SMALL | {"webhook_url": server.peer.url("/bad-location")}))
        good = su.ok(c.post(GENERATE, json=SMALL | {"webhook_url": server.peer.url("/ok")}))
        deadline = time.monotonic() + 60
        while True:
            final = su.ok(c.get(bad["urls"]["get"]))
            if final["webhook"]["state"] == "failed":
                break
            assert time.monotonic() < deadline, final
            time.sleep(0.1)
        # The other prediction's webhook went out meanwhile: the sender did not take this for an outage.
        assert su.ok(c.get(good["urls"]["get"]))["webhook"]["state"] == "delivered"
    attempts = final["webhook"]["attempts"]
    assert len(attempts) >= 2  # retried, then given up
    assert all(a["status_code"] is None and "invalid URL" in a["error"] for a in attempts), attempts
    time.sleep(1.0)
    assert server.peer.count("/bad-location") == len(attempts)  # every POST is a recorded attempt; no more


# --- 17. a reference whose server redirects to an unparsable Location -----------------------------------------------


def test_a_reference_redirecting_to_an_unparsable_location_is_a_400(server: Server) -> None:
    with server.client() as c:
        msg = su.error_of(c.post(GENERATE, json=SMALL | {"reference_image_urls": [server.peer.url("/bad-location")]}), 400)
    assert msg.startswith("reference_image_urls[0]: ") and "invalid URL" in msg, msg


# --- 18. references the engine would refuse are refused at submit ---------------------------------------------------


@pytest.mark.parametrize(("size", "keep"), [((1, 100000), False), ((100000, 1), False), ((2, 4000), False),
                                            ((4000, 2), False), ((32, 2048), True), ((4000, 2), True)])
def test_a_reference_the_engine_would_refuse_is_a_400_that_stores_nothing(server: Server, size: tuple[int, int],
                                                                          keep: bool) -> None:
    before = stored(server.files, "references")
    ref = "data:image/png;base64," + base64.b64encode(png(*size)).decode()
    with server.client() as c:
        n = len(su.ok(c.get("/api/v1/predictions", params={"limit": 100}))["items"])
        body = SMALL | {"reference_image_urls": [ref], "keep_original_aspect": keep}
        msg = su.error_of(c.post(GENERATE, json=body), 400)
        assert len(su.ok(c.get("/api/v1/predictions", params={"limit": 100}))["items"]) == n
    assert msg.startswith("reference_image_urls[0]: ") and f"{size[0]}x{size[1]}" in msg, msg
    assert stored(server.files, "references") == before


def test_thin_references_by_url_and_through_the_openai_route_too(server: Server) -> None:
    with server.client() as c:
        msg = su.error_of(c.post(GENERATE, json=SMALL | {"reference_image_urls": [server.peer.url("/thin-4000x2.png")]}),
                       400)
        assert msg.startswith("reference_image_urls[0]: "), msg
        r = c.post("/v1/images/edits", data={"prompt": "x", "size": "256x256"},
                   files=[("image[]", ("a.png", png(64, 64))), ("image[]", ("b.png", png(2, 4000)))])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "image[1]" and "2x4000" in r.json()["error"]["message"]


# --- 19. nothing left behind by a crash ---------------------------------------------------------------------------------


def test_a_task_keeps_no_references_once_it_ended(server: Server) -> None:
    ref = "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()
    with server.client() as c:
        pred = su.ok(c.post(GENERATE, json=SMALL | {"reference_image_urls": [ref], "enable_sync_mode": True}))
    assert pred["status"] == "completed"
    deadline = time.monotonic() + 10
    while stored(server.files, f"references/{pred['id']}"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stored(server.files, f"outputs/{pred['id']}")  # the images stay


def test_files_a_killed_process_left_are_swept_at_start_up(tmp_path: Path, demo_checkpoint: Path) -> None:
    """An API killed between writing a submit's references and its row, and a worker killed before it deleted an
    ended task's references: the next start removes both, and leaves a submit in flight alone."""
    home = tmp_path / "home"
    files = home / "storage"
    store = Store.open(f"sqlite:///{home / 'hidream.db'}")  # the database `serve` opens: a task that completed
    key, _ = store.create_key("k")
    done = store.insert_task(key.id, MODEL, {"num_images": 1, "output_format": "png"}, [], 10)
    store.claim("w", [MODEL], 30)
    assert store.complete(done["id"], "w", [f"outputs/{done['id']}/0.png"], 1, 1)
    store.engine.dispose()
    old = time.time() - ORPHAN_AFTER_S - 60
    leftovers = {"references/" + "a" * 32 + "/0.png": old,  # no row, old: a killed submit's
                 f"references/{done['id']}/0.png": time.time(),  # an ended task's: any age
                 "references/" + "b" * 32 + "/0.png": time.time(),  # no row yet, just written: in flight
                 f"outputs/{done['id']}/0.png": old}  # a completed task's image
    for key_path, mtime in leftovers.items():
        path = files / key_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(8, 8))
        os.utime(path, (mtime, mtime))
    procs = su.Processes(tmp_path / "logs")
    try:
        server = procs.serve(su.service_env(home, demo_checkpoint))
        deadline = time.monotonic() + 20
        while stored(files, "references") != ["references/" + "b" * 32 + "/0.png"]:
            assert time.monotonic() < deadline, stored(files, "references")
            time.sleep(0.1)
        assert server.alive()
        assert stored(files, "outputs") == [f"outputs/{done['id']}/0.png"]  # a completed task's images stay
    finally:
        procs.stop_all()


def test_a_task_that_fails_on_its_last_attempt_keeps_no_images(tmp_path: Path) -> None:
    """A worker stored the images, then died before completing; on its last attempt the task fails: no image stays."""
    from hidream.service.worker import Worker

    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite", storage_dir=tmp_path / "f",
                        max_attempts=1, lease_s=0.2)
    store, storage = Store.open(settings.db_url), LocalStorage(settings.files_dir)
    key, _ = store.create_key("k")
    row = store.insert_task(key.id, MODEL, {"num_images": 1, "output_format": "png"}, ["references/x/0.png"], 10)
    storage.put(f"references/{row['id']}/0.png", png(8, 8))
    assert store.claim("dead-worker", [MODEL], 0.2)["id"] == row["id"]
    storage.put(f"outputs/{row['id']}/0.png", png(8, 8))  # ... and then it was killed
    time.sleep(0.3)
    worker = Worker(settings, store, storage, lambda: None)
    worker._serve_one([MODEL])  # recovery runs first: the lease expired on the last attempt
    assert store.get_task(row["id"])["status"] == "failed"
    assert stored(settings.files_dir, "outputs") == [] and stored(settings.files_dir, "references") == []


# --- 20. the OpenAPI description tells the truth ------------------------------------------------------------------


def test_openapi_documents_what_the_routes_answer(server: Server) -> None:
    spec = httpx.get(server.proc.base_url + "/openapi.json", timeout=10).json()
    paths = spec["paths"]
    for path in ("/api/v1/models", "/api/v1/usage"):
        assert "401" in paths[path]["get"]["responses"], path
    assert "404" in paths["/files/{key}"]["get"]["responses"]
    assert "400" in paths["/api/v1/model/prediction/{prediction_id}/stream"]["get"]["responses"]
    model = spec["components"]["schemas"]["GenerateImageRequest"]["properties"]["model"]
    assert model["enum"][0] == MODEL and "hidream-o1-1.5" in model["enum"]
    for route in ("generations", "edits"):
        body = paths[f"/v1/images/{route}"]["post"]["requestBody"]["content"]
        schema = next(iter(body.values()))["schema"]
        assert schema["properties"]["prompt"]["minLength"] == 1, route
    with server.client() as c:
        assert "hidream-o1-1.5" in {a for m in su.ok(c.get("/api/v1/models")) for a in m["aliases"]}


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", GENERATE, {"POST"}), ("PUT", "/api/v1/models", {"GET"}), ("POST", "/api/v1/usage", {"GET"}),
])
def test_a_405_says_which_methods_are_allowed(server: Server, method: str, path: str, allowed: set[str]) -> None:
    r = httpx.request(method, server.proc.base_url + path, timeout=10)
    assert r.status_code == 405 and r.json()["code"] == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= allowed


# --- 21. error wording ---------------------------------------------------------------------------------------------------


def test_a_key_without_the_bearer_scheme_is_told_so(server: Server) -> None:
    base = server.proc.base_url
    msg = su.error_of(httpx.get(base + "/api/v1/models", headers={"Authorization": server.key}, timeout=10), 401)
    assert msg == "Authorization: the scheme is missing: send Authorization: Bearer <key>"
    msg = su.error_of(httpx.get(base + "/api/v1/models", timeout=10), 401)
    assert msg == "missing API key: send Authorization: Bearer <key>"
    msg = su.error_of(httpx.get(base + "/api/v1/models", headers={"Authorization": "Token abc"}, timeout=10), 401)
    assert msg.startswith("Authorization: the scheme is 'Token', not Bearer")


@pytest.mark.parametrize(("body", "got"), [({"image_size": "10x10"}, "(got '10x10')"),
                                           ({"image_size": {"width": 9000, "height": 64}},
                                            "(got {'width': 9000, 'height': 64})")])
def test_the_size_error_says_what_it_got(server: Server, body: dict[str, Any], got: str) -> None:
    with server.client() as c:
        msg = su.error_of(c.post(GENERATE, json=SMALL | body), 400)
    assert msg.startswith("image_size: must be one of square_hd") and msg.endswith(got), msg


@pytest.mark.parametrize("limit", ["0", "101", "ten", "-3"])
def test_limit_errors_are_in_the_projects_own_words(server: Server, limit: str) -> None:
    with server.client() as c:
        msg = su.error_of(c.get("/api/v1/predictions", params={"limit": limit}), 400)
    assert msg == f"limit: must be an integer from 1 to 100 (got {limit!r})", msg
