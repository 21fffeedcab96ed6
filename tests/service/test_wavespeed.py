"""The WaveSpeed protocol, driven by the official `wavespeed` SDK, unmodified, against a real server."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import wavespeed
from PIL import Image

try:
    from . import server_util as su
except ImportError:
    import server_util as su

T2I = "wavespeed-ai/hidream-o1-image/text-to-image"
EDIT = "wavespeed-ai/hidream-o1-image/edit"
QUICK = {"size": "64*64", "num_inference_steps": 2, "seed": 3}


@dataclass
class Hooks:
    """A webhook receiver on loopback: records each POST's JSON body and answers 200."""

    got: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                hooks.got.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0")))))
                hooks.arrived.set()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.http = su.LoopbackHTTP(Handler)


@dataclass
class Server:
    proc: su.Proc
    key: str
    hooks: Hooks

    @property
    def url(self) -> str:
        return self.proc.base_url

    def sdk(self, key: str | None = None) -> wavespeed.Client:
        """The official client on this server; no task-level retries."""
        return wavespeed.Client(api_key=key or self.key, base_url=self.url, max_retries=0, max_connection_retries=0,
                                retry_interval=0.1)

    def native(self, prediction_id: str) -> dict[str, Any]:
        with su.client(self.url, self.key) as c:
            return su.ok(c.get(f"/api/v1/model/prediction/{prediction_id}"))


@contextmanager
def serving(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, name: str,
            **settings: Any) -> Iterator[tuple[su.Proc, str, Hooks]]:
    """A `hidream serve` with a worker (webhooks to loopback allowed), its first key and a webhook receiver."""
    home = tmp_path_factory.mktemp(name)
    procs = su.Processes(home.parent / (home.name + "-logs"))
    hooks = Hooks()
    hooks.start()
    try:
        proc = procs.serve(su.service_env(home / "home", checkpoint, fetch_allow="127.0.0.1/32", webhook_retry_s=0.2,
                                          **settings), worker=True)
        key = proc.first_key()
        assert key, proc.output()
        yield proc, key, hooks
    finally:
        procs.stop_all()
        hooks.http.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    with serving(tmp_path_factory, demo_checkpoint, "wavespeed") as (proc, key, hooks):
        yield Server(proc, key, hooks)


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def image_of(output: str) -> Image.Image:
    if output.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(output.split(",", 1)[1])))
    return Image.open(io.BytesIO(httpx.get(output, timeout=30).content))


def test_text_to_image_async_then_read_through_the_native_api(server: Server) -> None:
    client = server.sdk()
    out = client.run(T2I, {"prompt": "a red circle on a blue background", **QUICK}, poll_interval=0.1, timeout=120)
    (url,) = out["outputs"]
    assert image_of(url).size == (64, 64)
    with su.client(server.url, server.key) as c:
        (latest,) = su.ok(c.get("/api/v1/predictions", params={"limit": 1}))["items"]
    assert [u.split("?")[0] for u in latest["outputs"]] == [url.split("?")[0]]  # the same file, signed anew
    native = server.native(latest["id"])
    assert native["input"]["width"] == 64 and native["input"]["num_inference_steps"] == 2
    assert native["input"]["prompt"] == "a red circle on a blue background" and native["input"]["surface"] == "wavespeed"
    result = client.get_result(latest["id"])["data"]
    assert result["status"] == "completed" and result["urls"]["get"].endswith(f"/api/v3/predictions/{latest['id']}/result")


def test_sync_mode_with_base64_outputs(server: Server) -> None:
    out = server.sdk().run(T2I, {"prompt": "a yellow square", "enable_base64_output": True, "output_format": "jpeg",
                                 **QUICK}, enable_sync_mode=True)
    (uri,) = out["outputs"]
    assert uri.startswith("data:image/jpeg;base64,") and image_of(uri).format == "JPEG"


def test_edit_with_a_file_uploaded_through_the_sdk(server: Server, tmp_path: Path) -> None:
    client = server.sdk()
    path = tmp_path / "ref.png"
    path.write_bytes(png())
    url = client.upload(str(path))
    assert url.startswith(server.url + "/files/uploads/")
    assert httpx.get(url).content == path.read_bytes()
    out = client.run(EDIT, {"prompt": "make the circle green", "images": [url], **QUICK}, poll_interval=0.1,
                     timeout=120)
    assert image_of(out["outputs"][0]).size == (64, 64)
    with su.client(server.url, server.key) as c:
        (latest,) = su.ok(c.get("/api/v1/predictions", params={"limit": 1}))["items"]
    assert latest["input"]["mode"] == "edit" and len(latest["input"]["reference_image_urls"]) == 1


def test_upload_tickets_are_checked(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        ticket = su.ok(c.post("/api/v3/media/uploads", headers=headers,
                              json={"filename": "a.png", "size": len(png()), "content_type": "image/png"}))
        put = ticket["upload"]
        assert put["method"] == "PUT"
        tampered = put["url"].replace("size=", "size=1")
        assert c.put(tampered, content=png()).status_code == 403
        assert c.put(put["url"], content=png((32, 32))).status_code == 400  # not the size the ticket is for
        assert c.put(put["url"], content=png()).status_code == 200
        assert c.put(put["url"], content=png()).status_code == 409  # once only
        assert c.get(ticket["download_url"]).content == png()
        jpeg = io.BytesIO()
        Image.new("RGB", (64, 48)).save(jpeg, format="JPEG")
        other = su.ok(c.post("/api/v3/media/uploads", headers=headers,
                             json={"filename": "b.png", "size": len(jpeg.getvalue())}))  # the type from the name
        r = c.put(other["upload"]["url"], content=jpeg.getvalue())
        assert r.status_code == 400 and "the ticket is for image/png, but the bytes are image/jpeg" in r.text
        for body, field_ in (({"filename": "a.gif", "size": 10}, "content_type"), ({"filename": "a.png"}, "size"),
                             ({"size": 10}, "filename")):
            r = c.post("/api/v3/media/uploads", headers=headers, json=body)
            assert r.status_code == 400 and r.json()["message"].startswith(field_ + ":"), r.text
        r = c.post("/api/v3/media/uploads", headers=headers, json={"filename": "a.png", "size": 10**9})
        assert r.status_code == 413 and r.json()["message"].startswith("size:")
        assert c.post("/api/v3/media/uploads", json={"filename": "a.png", "size": 10}).status_code == 401


@pytest.mark.parametrize(("model", "body", "status", "message"), [
    (T2I, {"prompt": "x", "size": "8*8"}, 400, "size: "),
    (T2I, {"prompt": "x", "width": 64}, 400, "width: unknown field"),
    (T2I, {"prompt": "x", "images": ["https://example.com/a.png"]}, 400, "images: the text-to-image model"),
    (EDIT, {"prompt": "x"}, 400, "images: is required by the edit model"),
    (T2I, {"prompt": ""}, 400, "prompt: "),
    (T2I.replace("hidream-o1-image", "hidream-o1-image-dev"), {"prompt": "x"}, 404, "model 'wavespeed-ai/"),
    ("wavespeed-ai/flux-dev", {"prompt": "x"}, 404, "model 'wavespeed-ai/flux-dev' is not served here (served: "
                                                    f"{T2I}, {EDIT})"),
    (EDIT, {"prompt": "x", "images": ["ftp://example.com/a.png"]}, 400, "images[0]: "),
])
def test_errors_surface_as_the_sdks_exception_with_our_message(server: Server, model: str, body: dict[str, Any],
                                                               status: int, message: str) -> None:
    with pytest.raises(RuntimeError) as err:
        server.sdk().run(model, body, timeout=30)
    text = str(err.value)
    assert f"HTTP {status}" in text and f'"message":"{message}' in text, text  # the message starts with the field


def test_a_bad_key_is_a_401(server: Server) -> None:
    with pytest.raises(RuntimeError, match="HTTP 401"):
        server.sdk("hd-wrong").run(T2I, {"prompt": "x", **QUICK}, timeout=30)


def test_a_webhook_in_the_query_gets_the_prediction(server: Server) -> None:
    hook = server.hooks.http.url("/done")
    # the SDK builds {base}/api/v3/{model}: the model string carries WaveSpeed's ?webhook= query
    out = server.sdk().run(f"{T2I}?webhook={hook}", {"prompt": "a green triangle", **QUICK}, poll_interval=0.1,
                           timeout=120)
    assert server.hooks.arrived.wait(30)
    (sent,) = server.hooks.got
    assert sent["status"] == "completed" and sent["outputs"] == out["outputs"] and sent["id"]
    assert sent["input"]["prompt"] == "a green triangle"
