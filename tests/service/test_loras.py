"""LoRAs through the service: `loras` on generateImage and the OpenAI routes, GET /api/v1/loras, downloads,
and the worker, which resolves each task's set to this machine's files and switches sets between tasks.

Bad LoRA input is a 400 naming `loras[i].path` (or `.scale`), with nothing stored: no task row, no charge, no
file in the storage, nothing in the download cache. Only loopback traffic (`loopback_only`); the download
server is plain http on 127.0.0.1, reached by widening `loras.URL_SCHEMES` (the service takes https only).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hidream.service import loras
from hidream.service.errors import ServiceError
from hidream.service.settings import Settings, load_settings
from hidream.service.storage import LocalStorage
from hidream.service.store import Store
from hidream.service.worker import Worker, WorkerState

if TYPE_CHECKING:  # the fixtures' types (conftest is not imported: tests/ has two conftest modules)
    from conftest import Service

pytestmark = pytest.mark.usefixtures("loopback_only")

GENERATE = "/api/v1/model/generateImage"
MODEL = "hidream-o1-image"
DOWN = "model.language_model.layers.0.mlp.down_proj"  # demo model: [64, 128]
Q = "model.language_model.layers.1.self_attn.q_proj"  # demo model: [64, 64]
SHAPES = {DOWN: (64, 128), Q: (64, 64)}


# --- LoRA files ---------------------------------------------------------------------------------------------


def peft_file(path: Path, names: tuple[str, ...] = (DOWN,), rank: int = 2, seed: int = 0,
              std: float = 0.5) -> Path:
    """A PEFT LoRA for the demo model: lora_A [r, in] and lora_B [out, r] per module."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        out, inp = SHAPES[name]
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * std
        tensors[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * std
    save_file(tensors, str(path))
    return path


def kohya_file(path: Path) -> Path:
    key = "lora_unet_" + Q.replace(".", "_")
    save_file({f"{key}.lora_down.weight": torch.ones(4, 64), f"{key}.lora_up.weight": torch.ones(64, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    return path


def not_a_lora(path: Path) -> Path:
    save_file({"model.language_model.norm.weight": torch.ones(64)}, str(path))
    return path


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    """good (PEFT, rank 2), style (PEFT, rank 4, two modules), kohya, broken (weights, no LoRA), garbage (no
    safetensors at all), and what the listing skips: a text file, a hidden file, a folder."""
    root = tmp_path / "loras"
    root.mkdir()
    peft_file(root / "good.safetensors")
    peft_file(root / "style.safetensors", (DOWN, Q), rank=4, seed=1)
    kohya_file(root / "kohya.safetensors")
    not_a_lora(root / "broken.safetensors")
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (root / "notes.txt").write_text("not a LoRA")
    peft_file(root / ".hidden.safetensors")
    (root / "folder.safetensors").mkdir()
    peft_file(tmp_path / "outside.safetensors")  # beside the directory: never reachable by a name
    return root


@pytest.fixture
def svc(make_service: Callable[..., Service], lora_dir: Path) -> Service:
    return make_service(lora_dir=lora_dir)


def cache_files(svc: Service) -> list[Path]:
    """Everything under the download cache, temporary folders included."""
    root = svc.settings.lora_cache_dir
    return sorted(root.rglob("*")) if root.exists() else []


def rejected(svc: Service, field: str, body_loras: Any, **fields: Any) -> str:
    """Submit `loras`, expect a 400 whose message starts with `field:`, and nothing left anywhere."""
    before = svc.leftovers()
    resp = svc.submit(loras=body_loras, **fields)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["code"] == 400 and body["data"] is None, body
    assert body["message"].startswith(f"{field}: "), body["message"]
    assert svc.leftovers() == before
    assert cache_files(svc) == []
    return body["message"]


def accepted(svc: Service, **fields: Any) -> dict[str, Any]:
    resp = svc.submit(**fields)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


# --- names in the directory ---------------------------------------------------------------------------------


def test_names_in_the_directory_are_echoed_with_their_scales(svc: Service) -> None:
    pred = accepted(svc, loras=[{"path": "good.safetensors", "scale": 0.5}, {"path": "style.safetensors"},
                                {"path": "kohya.safetensors", "scale": -2}])
    assert pred["input"]["loras"] == [{"path": "good.safetensors", "scale": 0.5},
                                      {"path": "style.safetensors", "scale": 1.0},
                                      {"path": "kohya.safetensors", "scale": -2.0}]
    assert svc.store.get_task(pred["id"])["input"]["loras"] == pred["input"]["loras"]
    without = accepted(svc)
    assert "loras" not in without["input"]  # other predictions look as they did
    assert "loras" not in accepted(svc, loras=[])["input"]


@pytest.mark.parametrize(("path", "says"), [
    pytest.param("../outside.safetensors", "no / or \\", id="dot-dot-slash"),
    pytest.param("..\\outside.safetensors", "no / or \\", id="dot-dot-backslash"),
    pytest.param("..outside.safetensors", "must not start with a dot", id="dot-dot-start"),
    pytest.param("a..b.safetensors", "must not contain ..", id="dot-dot-inside"),
    pytest.param("/etc/passwd", "no / or \\", id="absolute"),
    pytest.param("ABSOLUTE", "no / or \\", id="absolute-to-a-real-lora"),
    pytest.param("sub/good.safetensors", "no / or \\", id="subdirectory"),
    pytest.param(".hidden.safetensors", "must not start with a dot", id="hidden"),
    pytest.param("good.safetensors\0.txt", "must not contain NUL", id="nul"),
    pytest.param("notes.txt", "must be a .safetensors file name", id="not-safetensors"),
    pytest.param(".safetensors", "must not start with a dot", id="only-the-suffix"),
    pytest.param("missing.safetensors", "missing.safetensors is not in the LoRA directory", id="missing"),
    pytest.param("folder.safetensors", "folder.safetensors is not a regular file", id="a-folder"),
    pytest.param("broken.safetensors", "model.language_model.norm.weight: not a LoRA key", id="not-a-lora"),
    pytest.param("garbage.safetensors", "not a readable safetensors file", id="not-safetensors-data"),
])
def test_bad_names_are_refused_naming_the_entry(svc: Service, lora_dir: Path, path: str, says: str) -> None:
    if path == "ABSOLUTE":
        path = str(lora_dir / "good.safetensors")
    message = rejected(svc, "loras[1].path", [{"path": "good.safetensors"}, {"path": path}])
    assert says in message, message


@pytest.mark.parametrize(("entry", "field", "says"), [
    pytest.param({"path": "good.safetensors", "scale": 10.5}, "loras[0].scale", "(got 10.5)", id="scale-over"),
    pytest.param({"path": "good.safetensors", "scale": -11}, "loras[0].scale", "(got -11)", id="scale-under"),
    pytest.param({"path": "good.safetensors", "scale": "1"}, "loras[0].scale", "finite number", id="scale-string"),
    pytest.param({"path": "good.safetensors", "scale": True}, "loras[0].scale", "finite number", id="scale-bool"),
    pytest.param({"scale": 1.0}, "loras[0].path", "is required", id="no-path"),
    pytest.param({"path": ""}, "loras[0].path", "GET /api/v1/loras", id="empty-path"),
    pytest.param({"path": 3}, "loras[0].path", "GET /api/v1/loras", id="path-not-string"),
    pytest.param({"path": "good.safetensors", "weight": 1}, "loras[0].weight", "unknown field", id="unknown-key"),
    pytest.param("good.safetensors", "loras[0]", "must be an object", id="a-bare-string"),
])
def test_bad_entries_name_the_field(svc: Service, entry: Any, field: str, says: str) -> None:
    assert says in rejected(svc, field, [entry])


def test_the_scale_limits_themselves_are_accepted(svc: Service) -> None:
    pred = accepted(svc, loras=[{"path": "good.safetensors", "scale": 10}, {"path": "good.safetensors", "scale": -10},
                                {"path": "good.safetensors", "scale": 0}])
    assert [e["scale"] for e in pred["input"]["loras"]] == [10.0, -10.0, 0.0]


def test_a_non_finite_scale_is_refused(svc: Service) -> None:
    before = svc.leftovers()
    body = ('{"model": "hidream-o1-image", "prompt": "a fox", '
            '"loras": [{"path": "good.safetensors", "scale": NaN}]}')
    resp = svc.client.post(GENERATE, content=body, headers={**svc.h1, "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["message"].startswith("loras[0].scale: "), resp.text
    assert svc.leftovers() == before


def test_at_most_eight_loras_and_why(svc: Service) -> None:
    accepted(svc, loras=[{"path": "good.safetensors"}] * 8)
    message = rejected(svc, "loras", [{"path": "good.safetensors"}] * 9)
    assert "at most 8 LoRAs" in message and "each adds work to every step" in message
    assert "must be a list" in rejected(svc, "loras", {"path": "good.safetensors"})


def test_without_a_lora_directory_any_lora_is_refused(make_service: Callable[..., Service]) -> None:
    svc = make_service()
    message = rejected(svc, "loras", [{"path": "good.safetensors"}])
    assert "serves no LoRAs" in message and "HIDREAM_LORA_DIR" in message
    accepted(svc, loras=[])  # an empty set is no LoRA at all


def test_a_url_is_refused_while_urls_are_off(svc: Service) -> None:
    message = rejected(svc, "loras[0].path", [{"path": "https://127.0.0.1:9/x.safetensors"}])
    assert "HIDREAM_LORA_URLS is off" in message


# --- the Idempotency-Key fingerprint ------------------------------------------------------------------------


def test_the_lora_set_is_part_of_the_idempotency_fingerprint(svc: Service) -> None:
    def post(key: str, lora_set: list[dict[str, Any]] | None):
        extra = {} if lora_set is None else {"loras": lora_set}
        return svc.submit({**svc.h1, "Idempotency-Key": key}, **extra)

    first = post("k1", [{"path": "good.safetensors", "scale": 0.5}])
    assert first.status_code == 200, first.text
    again = post("k1", [{"path": "good.safetensors", "scale": 0.5}])
    assert again.status_code == 200 and again.json()["data"]["id"] == first.json()["data"]["id"]
    for other in ([{"path": "good.safetensors", "scale": 0.6}], [{"path": "style.safetensors", "scale": 0.5}],
                  [{"path": "good.safetensors", "scale": 0.5}, {"path": "style.safetensors"}], None):
        conflict = post("k1", other)
        assert conflict.status_code == 409, (other, conflict.text)
        assert conflict.json()["message"].startswith("Idempotency-Key: "), conflict.text
    # a scale left out is the default 1.0: the same request
    assert post("k2", [{"path": "good.safetensors"}]).json()["data"]["id"] == \
        post("k2", [{"path": "good.safetensors", "scale": 1.0}]).json()["data"]["id"]


# --- GET /api/v1/loras --------------------------------------------------------------------------------------


def test_the_route_lists_the_directory(svc: Service, lora_dir: Path) -> None:
    assert svc.client.get("/api/v1/loras").status_code == 401
    resp = svc.client.get("/api/v1/loras", headers=svc.h1)
    assert resp.status_code == 200, resp.text
    files = {f["name"]: f for f in resp.json()["data"]}
    assert sorted(files) == ["broken.safetensors", "garbage.safetensors", "good.safetensors", "kohya.safetensors",
                             "style.safetensors"]  # no text file, hidden file or folder
    assert files["good.safetensors"] == {"name": "good.safetensors", "format": "peft", "modules": 1, "ranks": [2],
                                         "error": None,
                                         "size_bytes": (lora_dir / "good.safetensors").stat().st_size}
    assert (files["style.safetensors"]["modules"], files["style.safetensors"]["ranks"]) == (2, [4])
    assert (files["kohya.safetensors"]["format"], files["kohya.safetensors"]["ranks"]) == ("kohya", [4])
    broken = files["broken.safetensors"]
    assert broken["format"] is None and "model.language_model.norm.weight" in broken["error"], broken
    assert "not a readable safetensors file" in files["garbage.safetensors"]["error"]


def test_the_route_is_empty_without_a_directory(make_service: Callable[..., Service]) -> None:
    svc = make_service()
    resp = svc.client.get("/api/v1/loras", headers=svc.h1)
    assert resp.status_code == 200 and resp.json()["data"] == [], resp.text


def test_the_schema_documents_loras(svc: Service) -> None:
    spec = svc.client.get("/openapi.json").json()
    assert "/api/v1/loras" in spec["paths"]
    assert {"LoraRef", "LoraFile"} <= set(spec["components"]["schemas"])
    loras_field = spec["components"]["schemas"]["GenerateImageRequest"]["properties"]["loras"]
    assert loras_field["maxItems"] == 8 and loras_field["items"] == {"$ref": "#/components/schemas/LoraRef"}
    models = svc.client.get("/api/v1/models", headers=svc.h1).json()["data"]
    assert models[0]["parameters"]["loras"]["max_items"] == 8


# --- downloads ----------------------------------------------------------------------------------------------


class FileServer:
    """Plain http on 127.0.0.1 serving `files` (path -> bytes) and `redirects` (path -> Location)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.hits: list[str] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                srv.hits.append(self.path)
                if self.path in srv.redirects:
                    self.send_response(302)
                    self.send_header("Location", srv.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = srv.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    srv = FileServer()
    srv.files["/style.safetensors"] = peft_file(tmp_path / "dl-style.safetensors", seed=7).read_bytes()
    srv.files["/weights.safetensors"] = not_a_lora(tmp_path / "dl-weights.safetensors").read_bytes()
    srv.redirects["/moved.safetensors"] = "/style.safetensors"
    srv.redirects["/to-https.safetensors"] = f"https://127.0.0.1:{srv.port}/style.safetensors"
    srv.redirects["/to-private.safetensors"] = "http://10.0.0.1/style.safetensors"
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def urls_on(make_service: Callable[..., Service], lora_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A factory of services that take LoRA URLs, with the loopback test server allow-listed and reachable
    over plain http."""
    monkeypatch.setattr(loras, "URL_SCHEMES", ("https", "http"))

    def make(**overrides: Any) -> Service:
        return make_service(**({"lora_dir": lora_dir, "lora_urls": True, "fetch_allow": ("127.0.0.1/32",)}
                               | overrides))

    return make


def test_a_download_is_checked_cached_by_sha256_and_echoed(urls_on, files: FileServer) -> None:
    svc = urls_on()
    data = files.files["/style.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    url = files.url("/style.safetensors")
    pred = accepted(svc, loras=[{"path": url, "scale": 0.75}, {"path": "good.safetensors"}])
    assert pred["input"]["loras"] == [{"path": url, "scale": 0.75, "sha256": sha},
                                      {"path": "good.safetensors", "scale": 1.0}]
    assert cache_files(svc) == [svc.settings.lora_cache_dir / f"{sha}.safetensors"]  # no temporary folder left
    assert cache_files(svc)[0].read_bytes() == data
    assert svc.storage.get(f"loras/{sha}.safetensors") == data  # for workers on other machines
    # the same file again (also through a redirect): the same cache entry
    again = accepted(svc, loras=[{"path": files.url("/moved.safetensors")}])
    assert again["input"]["loras"][0]["sha256"] == sha
    assert len(cache_files(svc)) == 1


@pytest.mark.parametrize(("path", "says"), [
    pytest.param("/missing.safetensors", "returned HTTP 404", id="404"),
    pytest.param("/weights.safetensors", "not a LoRA key", id="not-a-lora"),
    pytest.param("/style.safetensors", "over the 1000-byte limit", id="too-big"),
])
def test_a_failed_download_leaves_nothing(urls_on, files: FileServer, path: str, says: str) -> None:
    svc = urls_on(lora_max_bytes=1000 if path == "/style.safetensors" else 2_000_000_000)
    # the first entry downloads fine: it must go too
    first = [] if path == "/style.safetensors" else [{"path": files.url("/style.safetensors")}]
    message = rejected(svc, f"loras[{len(first)}].path", [*first, {"path": files.url(path)}])
    assert says in message and files.url(path) in message, message


def test_a_download_that_cannot_be_queued_leaves_nothing(urls_on, files: FileServer) -> None:
    svc = urls_on(max_queue=1)
    accepted(svc)
    before = svc.leftovers()
    resp = svc.submit(loras=[{"path": files.url("/style.safetensors")}])
    assert resp.status_code == 429, resp.text
    assert svc.leftovers() == before and cache_files(svc) == []


def test_urls_to_loopback_and_private_hosts_are_refused(make_service: Callable[..., Service],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(lora_urls=True)  # no directory, no allow-list
    for url, says in (("https://127.0.0.1/x.safetensors", "a loopback address"),
                      ("https://localhost:8443/x.safetensors", "a loopback address"),
                      ("https://10.1.2.3/x.safetensors", "a private address"),
                      ("https://[::1]/x.safetensors", "a loopback address"),
                      ("http://93.184.216.34/x.safetensors", "is not an https URL"),
                      ("ftp://93.184.216.34/x.safetensors", "is not an https URL")):
        message = rejected(svc, "loras[0].path", [{"path": url}])
        assert says in message, (url, message)
    assert "no LoRA directory" in rejected(svc, "loras[0].path", [{"path": "good.safetensors"}])


def test_every_redirect_is_checked_again(urls_on, files: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = urls_on()
    message = rejected(svc, "loras[0].path", [{"path": files.url("/to-private.safetensors")}])
    assert "resolves to 10.0.0.1, a private address" in message, message
    # a hop must keep to the schemes allowed (here plain http stands in for https: a move to another is refused)
    monkeypatch.setattr(loras, "URL_SCHEMES", ("http",))
    message = rejected(svc, "loras[0].path", [{"path": files.url("/to-https.safetensors")}])
    assert "is not an http URL (redirected from" in message, message


# --- the OpenAI routes --------------------------------------------------------------------------------------


def openai_post(svc: Service, route: str, **kwargs: Any):
    return svc.client.post(route, headers=svc.h1, **kwargs)


def test_openai_generations_take_loras(make_service: Callable[..., Service], lora_dir: Path) -> None:
    svc = make_service(lora_dir=lora_dir, sync_timeout_s=0.05)  # no worker: each accepted request is a 504
    resp = openai_post(svc, "/v1/images/generations",
                       json={"prompt": "a fox", "loras": [{"path": "good.safetensors", "scale": 0.25}]})
    assert resp.status_code == 504, resp.text
    row = svc.store.get_task(resp.json()["error"]["prediction_id"])
    assert row["input"]["loras"] == [{"path": "good.safetensors", "scale": 0.25}]
    before = svc.leftovers()
    bad = openai_post(svc, "/v1/images/generations", json={"prompt": "a fox", "loras": [{"path": "../x.safetensors"}]})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "loras[0].path" and "no / or" in bad.json()["error"]["message"]
    scale = openai_post(svc, "/v1/images/generations",
                        json={"prompt": "a fox", "loras": [{"path": "good.safetensors", "scale": 99}]})
    assert scale.status_code == 400 and scale.json()["error"]["param"] == "loras[0].scale", scale.text
    assert svc.leftovers() == before
    # the fingerprint of the OpenAI route covers the set too
    h = {**svc.h1, "Idempotency-Key": "o1"}
    first = svc.client.post("/v1/images/generations", headers=h, json={"prompt": "a fox", "loras": []})
    other = svc.client.post("/v1/images/generations", headers=h,
                            json={"prompt": "a fox", "loras": [{"path": "good.safetensors"}]})
    assert first.status_code == 504 and other.status_code == 409, (first.text, other.text)


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_openai_edits_take_loras_as_a_json_form_field(make_service: Callable[..., Service], lora_dir: Path) -> None:
    svc = make_service(lora_dir=lora_dir, sync_timeout_s=0.05)
    form = {"prompt": "make it blue", "loras": json.dumps([{"path": "style.safetensors", "scale": -0.5}])}
    resp = openai_post(svc, "/v1/images/edits", data=form, files={"image": ("a.png", png(), "image/png")})
    assert resp.status_code == 504, resp.text
    row = svc.store.get_task(resp.json()["error"]["prediction_id"])
    assert row["input"]["loras"] == [{"path": "style.safetensors", "scale": -0.5}]
    before = svc.leftovers()
    for value, param in (("not json", "loras"), ('[{"path": "missing.safetensors"}]', "loras[0].path"),
                         ('{"path": "good.safetensors"}', "loras")):
        bad = openai_post(svc, "/v1/images/edits", data={"prompt": "x", "loras": value},
                          files={"image": ("a.png", png(), "image/png")})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (value, bad.text)
    assert svc.leftovers() == before


# --- settings -----------------------------------------------------------------------------------------------


def test_the_settings_and_their_errors(tmp_path: Path) -> None:
    s = load_settings({"HIDREAM_LORA_DIR": str(tmp_path), "HIDREAM_LORA_URLS": "true",
                       "HIDREAM_LORA_MAX_BYTES": "1000", "HIDREAM_LORA_CACHE_BYTES": "5"})
    assert (s.lora_dir, s.lora_urls, s.lora_max_bytes, s.lora_cache_bytes) == (tmp_path, True, 1000, 5)
    d = Settings()
    assert (d.lora_dir, d.lora_urls, d.lora_max_bytes, d.lora_cache_bytes) == (None, False, 2_000_000_000, 2**31)
    with pytest.raises(ServiceError, match="HIDREAM_LORA_URLS"):
        load_settings({"HIDREAM_LORA_URLS": "perhaps"})
    loras.check_settings(s)
    for bad, name in ((replace(s, lora_dir=tmp_path / "nope"), "HIDREAM_LORA_DIR: must be a directory"),
                      (replace(s, lora_max_bytes=0), "HIDREAM_LORA_MAX_BYTES"),
                      (replace(s, lora_cache_bytes=-1), "HIDREAM_LORA_CACHE_BYTES")):
        with pytest.raises(ServiceError, match=name):
            loras.check_settings(bad)


# --- the worker ---------------------------------------------------------------------------------------------


INPUT = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 5.0,
         "output_format": "png", "seed": 5, "keep_original_aspect": False, "num_images": 1,
         "enable_base64_output": False}


@dataclass
class Result:
    images: list


class RecordingEngine:
    """Records each request's LoRAs; has an LRU like the real engine's."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lora_cache = type("Cache", (), {"max_bytes": 1})()

    def generate(self, request, progress=None, should_cancel=None):
        self.requests.append(request)
        for spec in request.loras:
            assert Path(spec.path).is_file(), spec
        return Result([Image.new("RGB", (request.width, request.height), (1, 2, 3))])


@pytest.fixture
def queue(tmp_path: Path, lora_dir: Path):
    settings = Settings(home=tmp_path / "home", lora_dir=lora_dir, lora_cache_bytes=12345, lease_s=1.0)
    store = Store.open(settings.db_url)
    storage = LocalStorage(settings.files_dir)
    key, _ = store.create_key()
    return settings, store, storage, key.id


def run_tasks(worker: Worker, store: Store, task_ids: list[str], timeout: float = 120.0) -> None:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(store.get_task(t)["status"] in ("completed", "failed")
                                                   for t in task_ids):
        time.sleep(0.02)
    worker.stop()
    thread.join(timeout)
    assert worker.state is WorkerState.STOPPED
    assert all(store.get_task(t)["status"] in ("completed", "failed") for t in task_ids)


def insert(store: Store, key_id: str, lora_set: list[dict[str, Any]] | None = None, **changes: Any) -> str:
    inp = INPUT | changes | ({"loras": lora_set} if lora_set else {})
    return store.insert_task(key_id, MODEL, inp, [], max_queue=100)["id"]


def test_the_worker_resolves_names_and_downloads_to_local_files(queue, lora_dir: Path, tmp_path: Path) -> None:
    from hidream.engine.lora import LoraSpec

    settings, store, storage, key_id = queue
    data = peft_file(tmp_path / "fetched.safetensors", seed=3).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    storage.put(f"loras/{sha}.safetensors", data)  # fetched by an API on another machine: not in this cache
    url = "https://loras.test/fetched.safetensors"
    named = insert(store, key_id, [{"path": "good.safetensors", "scale": 0.5},
                                   {"path": url, "scale": -1.0, "sha256": sha}])
    plain = insert(store, key_id)
    engine = RecordingEngine()
    worker = Worker(settings, store, storage, lambda: engine)
    run_tasks(worker, store, [named, plain])
    assert engine.lora_cache.max_bytes == 12345  # HIDREAM_LORA_CACHE_BYTES
    assert store.get_task(named)["status"] == store.get_task(plain)["status"] == "completed"
    cached = settings.lora_cache_dir / f"{sha}.safetensors"
    assert list(engine.requests[0].loras) == [LoraSpec(lora_dir / "good.safetensors", 0.5), LoraSpec(cached, -1.0)]
    assert cached.read_bytes() == data
    assert list(engine.requests[1].loras) == []


def test_a_lora_missing_at_the_worker_fails_its_task_naming_it(queue, lora_dir: Path) -> None:
    settings, store, storage, key_id = queue
    gone = insert(store, key_id, [{"path": "good.safetensors"}, {"path": "vanished.safetensors"}])
    lost = insert(store, key_id, [{"path": "https://x.test/a.safetensors", "scale": 1.0, "sha256": "ab" * 32}])
    after = insert(store, key_id)
    engine = RecordingEngine()
    run_tasks(Worker(settings, store, storage, lambda: engine), store, [gone, lost, after])
    row = store.get_task(gone)
    assert row["status"] == "failed" and row["error"].startswith("loras[1].path: vanished.safetensors"), row["error"]
    row = store.get_task(lost)
    assert row["status"] == "failed" and row["error"].startswith("loras[0].path: https://x.test/a.safetensors")
    assert store.get_task(after)["status"] == "completed"  # the worker goes on
    assert store.charges(gone) == store.charges(lost) == 0


def test_a_lora_that_does_not_fit_the_model_fails_the_task_with_the_engines_words(queue, lora_dir: Path,
                                                                                  demo_checkpoint: Path) -> None:
    from hidream.engine.pipeline import Engine

    settings, store, storage, key_id = queue
    save_file({f"{DOWN}.lora_A.weight": torch.ones(2, 96), f"{DOWN}.lora_B.weight": torch.ones(64, 2)},
              str(lora_dir / "wrong-shape.safetensors"))  # a LoRA for a model of another width
    tid = insert(store, key_id, [{"path": "wrong-shape.safetensors"}])
    run_tasks(Worker(settings, store, storage, lambda: Engine.load(demo_checkpoint, device="cpu")), store, [tid])
    row = store.get_task(tid)
    assert row["status"] == "failed" and row["error"].startswith("loras[0]"), row["error"]
    assert "wrong-shape.safetensors" in row["error"] and "[64, 96]" in row["error"], row["error"]
    assert str(lora_dir) not in row["error"]  # the request's name, not this machine's path


def test_a_worker_switching_lora_sets_gives_each_task_its_own_sets_image(queue, lora_dir: Path,
                                                                         demo_checkpoint: Path) -> None:
    """Tasks A, B, none, A in a row on one engine: each image equals the one a fresh engine draws with that set."""
    from hidream.engine.lora import LoraSpec
    from hidream.engine.pipeline import Engine, GenerationRequest

    settings, store, storage, key_id = queue
    sets = {"A": [{"path": "good.safetensors", "scale": 1.5}],
            "B": [{"path": "style.safetensors", "scale": -1.0}, {"path": "good.safetensors", "scale": 0.5}],
            "none": []}
    order = ["A", "B", "none", "A"]
    task_ids = [insert(store, key_id, sets[name]) for name in order]
    engine = Engine.load(demo_checkpoint, device="cpu")
    run_tasks(Worker(settings, store, storage, lambda: engine), store, task_ids, timeout=300)
    got = []
    for tid in task_ids:
        row = store.get_task(tid)
        assert row["status"] == "completed", row["error"]
        got.append(np.asarray(Image.open(io.BytesIO(storage.get(row["outputs"][0]))).convert("RGB")))

    def fresh(name: str) -> np.ndarray:
        specs = [LoraSpec(lora_dir / e["path"], e["scale"]) for e in sets[name]]
        request = GenerationRequest(prompt=INPUT["prompt"], width=64, height=64, steps=2,
                                    guidance=INPUT["guidance_scale"], seed=INPUT["seed"], loras=specs)
        return np.asarray(Engine.load(demo_checkpoint, device="cpu").generate(request).images[0].convert("RGB"))

    expected = {name: fresh(name) for name in sets}
    for name, image in zip(order, got, strict=True):
        assert np.array_equal(image, expected[name]), name
    # and the sets do change the image, each its own way
    assert not np.array_equal(expected["A"], expected["none"])
    assert not np.array_equal(expected["B"], expected["none"])
    assert not np.array_equal(expected["A"], expected["B"])
