"""The HTTP API without a worker: validation, auth, references, uploads, files, catalogue, listing.

Every rejected request must answer the envelope {"code", "message", "data": null} with a message that
starts with the offending field, and leave nothing behind (no task row, usage row or stored file).
Only loopback traffic: reference URLs to other addresses must be refused before any connection, and
the `loopback_only` fixture fails the test if the service tries to send one.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from PIL import Image

from hidream.service import schemas
from hidream.service.storage import UrlSigner

if TYPE_CHECKING:  # the fixtures' types (conftest is not imported: tests/ has two conftest modules)
    from conftest import ImageServer, Service

pytestmark = pytest.mark.usefixtures("loopback_only")

GENERATE = "/api/v1/model/generateImage"
UPLOAD = "/api/v1/model/uploadMedia"
MODEL = "hidream-o1-image"
BASE_URL = "http://127.0.0.1:8000"  # Settings' default base_url, which the test client uses too
HEX32 = re.compile(r"^[0-9a-f]{32}$")
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def png_bytes(size: tuple[int, int] = (32, 24), mode: str = "RGB", noise: bool = False) -> bytes:
    img = (Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise
           else Image.new(mode, size, (200, 30, 60) if mode == "RGB" else 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()
BIG_PNG = png_bytes((64, 64), noise=True)  # about 12 KiB


def data_uri(data: bytes = PNG, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def assert_error(resp: httpx.Response, status: int, field: str | None = None) -> str:
    """The error envelope with `status`; the message starts with `field:`. Returns the message."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "message", "data"}, body
    assert body["code"] == status and body["data"] is None, body
    message = body["message"]
    assert isinstance(message, str) and message, body
    if field is not None:
        assert message.startswith(f"{field}:"), message
    assert "Traceback" not in message
    return message


def assert_ok(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == 200 and body["message"] == "success", body
    return body["data"]


def rejected(svc: Service, status: int, field: str, *, headers: dict[str, str] | None = None,
             **fields: Any) -> str:
    """Submit `fields` (over a valid request), expect `status` naming `field`, and nothing left behind."""
    before = svc.leftovers()
    message = assert_error(svc.submit(headers, **fields), status, field)
    assert svc.leftovers() == before
    return message


def post_raw(svc: Service, content: bytes, ctype: str = "application/json") -> httpx.Response:
    return svc.client.post(GENERATE, content=content, headers={**svc.h1, "Content-Type": ctype})


@pytest.fixture
def allow(make_service: Callable[..., Service]) -> Service:
    """A service whose operator allow-listed 127.0.0.1 for reference URLs (the test image server)."""
    return make_service(fetch_allow=("127.0.0.1/32",))


# --- bad input: each rejected with 400 naming the field, nothing left behind -----------------------


@pytest.mark.parametrize(("fields", "field", "got"), [
    pytest.param({"prompt": "x" * 5001}, "prompt", "5,001 characters", id="prompt-5001"),
    pytest.param({"prompt": " \t\n  "}, "prompt", None, id="prompt-blank"),
    pytest.param({"prompt": ""}, "prompt", None, id="prompt-empty"),
    pytest.param({"prompt": 5}, "prompt", None, id="prompt-not-string"),
    pytest.param({"image_size": "square_xl"}, "image_size", None, id="preset-unknown"),
    pytest.param({"num_inference_steps": 0}, "num_inference_steps", "(got 0)", id="steps-0"),
    pytest.param({"num_inference_steps": 101}, "num_inference_steps", "(got 101)", id="steps-101"),
    pytest.param({"num_inference_steps": 20.5}, "num_inference_steps", None, id="steps-float"),
    pytest.param({"guidance_scale": 0.5}, "guidance_scale", "(got 0.5)", id="guidance-0.5"),
    pytest.param({"guidance_scale": 21}, "guidance_scale", "(got 21)", id="guidance-21"),
    pytest.param({"guidance_scale": "5"}, "guidance_scale", None, id="guidance-string"),
    pytest.param({"output_format": "gif"}, "output_format", "gif", id="format-gif"),
    pytest.param({"seed": -2}, "seed", "(got -2)", id="seed-minus-2"),
    pytest.param({"seed": 2**32}, "seed", f"(got {2**32})", id="seed-2^32"),
    pytest.param({"seed": True}, "seed", None, id="seed-bool"),
    pytest.param({"num_images": 0}, "num_images", None, id="num-images-0"),
    pytest.param({"num_images": 5}, "num_images", None, id="num-images-5"),
    pytest.param({"keep_original_aspect": "yes"}, "keep_original_aspect", None, id="keep-aspect-string"),
    pytest.param({"snap_to_native": "true"}, "snap_to_native", None, id="snap-to-native-string"),
    pytest.param({"reference_image_urls": [data_uri()] * 11}, "reference_image_urls", None, id="refs-11"),
    pytest.param({"reference_image_urls": "http://x/y.png"}, "reference_image_urls", None, id="refs-not-list"),
    pytest.param({"reference_image_urls": [7]}, "reference_image_urls[0]", None, id="refs-item-not-string"),
    pytest.param({"reference_image_urls": ["hello"]}, "reference_image_urls[0]", "'hello'", id="ref-hello"),
    pytest.param({"reference_image_urls": [data_uri(), "ftp://x/y.png"]}, "reference_image_urls[1]", "ftp://x/y.png",
                 id="ref-ftp"),
    pytest.param({"reference_image_urls": [data_uri(b"hello", "text/plain")]}, "reference_image_urls[0]", None,
                 id="ref-data-uri-not-image"),
    pytest.param({"reference_image_urls": [data_uri(b"hello")]}, "reference_image_urls[0]", None,
                 id="ref-data-uri-not-png"),
    pytest.param({"reference_image_urls": ["data:image/png;base64,@@@"]}, "reference_image_urls[0]", None,
                 id="ref-data-uri-bad-base64"),
    pytest.param({"negative_prompt": "blurry"}, "negative_prompt", "unknown field", id="unknown-field"),
    pytest.param({"model": "hidream-o2"}, "model", "hidream-o2", id="model-unknown"),
    pytest.param({"image_size": "40x40"}, "image_size", "(got '40x40')", id="size-too-small"),
    pytest.param({"image_size": "8192x256"}, "image_size", "(got '8192x256')", id="size-too-big"),
    pytest.param({"image_size": "4000x4000"}, "image_size", "(got '4000x4000')", id="size-over-area"),
    pytest.param({"image_size": "3104x2048"}, "image_size", None, id="size-over-area-2"),
    pytest.param({"image_size": "1000 by 700"}, "image_size", None, id="size-garbage"),
    pytest.param({"image_size": {"width": 512}}, "image_size", None, id="size-object-missing-height"),
    pytest.param({"image_size": {"width": 512.0, "height": 512}}, "image_size", None, id="size-object-float"),
    pytest.param({"image_size": {"width": 512, "height": 512, "depth": 3}}, "image_size", None,
                 id="size-object-extra"),
])
def test_bad_field(service: Service, fields: dict[str, Any], field: str, got: str | None) -> None:
    message = rejected(service, 400, field, **fields)
    if got is not None:
        assert got in message


def test_missing_prompt(service: Service) -> None:
    before = service.leftovers()
    resp = service.client.post(GENERATE, json={"model": MODEL}, headers=service.h1)
    assert assert_error(resp, 400, "prompt") == "prompt: is required"
    assert service.leftovers() == before


def test_missing_model(service: Service) -> None:
    before = service.leftovers()
    resp = service.client.post(GENERATE, json={"prompt": "a fox"}, headers=service.h1)
    assert_error(resp, 400, "model")
    assert service.leftovers() == before


def test_malformed_json(service: Service) -> None:
    before = service.leftovers()
    assert "malformed JSON" in assert_error(post_raw(service, b'{"model":'), 400, "body")
    assert service.leftovers() == before


@pytest.mark.parametrize("content", [b"[1,2]", b'"a string"', b"null", b""], ids=["list", "string", "null", "empty"])
def test_body_not_an_object(service: Service, content: bytes) -> None:
    before = service.leftovers()
    assert_error(post_raw(service, content), 400, "body")
    assert service.leftovers() == before


# --- reference URLs: fetched only from allowed addresses, errors name the item ---------------------


def test_ref_not_an_image(allow: Service, image_server: ImageServer) -> None:
    url = image_server.url("/text")
    message = rejected(allow, 400, "reference_image_urls[0]", reference_image_urls=[url])
    assert url in message and "not a PNG, JPEG or WebP image" in message


def test_ref_404(allow: Service, image_server: ImageServer) -> None:
    url = image_server.url("/missing")
    message = rejected(allow, 400, "reference_image_urls[0]", reference_image_urls=[url])
    assert url in message and "404" in message


def test_ref_fetched_when_allowlisted(allow: Service, image_server: ImageServer) -> None:
    url = image_server.url("/ok.png")
    before = allow.leftovers()
    data = assert_ok(allow.submit(reference_image_urls=[url]))
    assert data["input"]["mode"] == "edit" and data["input"]["reference_image_urls"] == [url]
    assert allow.leftovers() == (before[0] + 1, before[1], before[2] + 1)
    (ref,) = allow.store.get_task(data["id"])["references"]
    assert allow.storage.get(ref) == image_server.png


def test_ref_loopback_without_allowlist(service: Service, image_server: ImageServer) -> None:
    url = image_server.url("/ok.png")
    hits = image_server.count()
    message = rejected(service, 400, "reference_image_urls[0]", reference_image_urls=[url])
    assert url in message and "loopback" in message
    assert image_server.count() == hits  # refused before connecting


def test_ref_loopback_by_name(service: Service, image_server: ImageServer) -> None:
    url = image_server.url("/ok.png", host="localhost")
    hits = image_server.count()
    message = rejected(service, 400, "reference_image_urls[0]", reference_image_urls=[url])
    assert url in message and "loopback" in message
    assert image_server.count() == hits


@pytest.mark.parametrize(("url", "kind"), [
    ("http://10.0.0.1/a.png", "private"),
    ("http://169.254.169.254/x.png", "link-local"),
    ("http://[::1]:9/a.png", "loopback"),
    ("http://[::ffff:10.0.0.1]/a.png", "private"),
    ("http://0.0.0.0/a.png", "unspecified"),
])
def test_ref_non_public_address(allow: Service, url: str, kind: str) -> None:
    # Even with 127.0.0.1 allow-listed, these stay refused (and loopback_only proves nothing was sent).
    message = rejected(allow, 400, "reference_image_urls[0]", reference_image_urls=[url])
    assert kind in message


def test_ref_redirect_to_private(allow: Service, image_server: ImageServer) -> None:
    url = image_server.url("/redirect-private")
    message = rejected(allow, 400, "reference_image_urls[0]", reference_image_urls=[url])
    assert url in message and "10.0.0.1" in message and "private" in message


def test_ref_over_byte_cap(make_service: Callable[..., Service], image_server: ImageServer) -> None:
    svc = make_service(fetch_allow=("127.0.0.1/32",), max_upload_bytes=1000)
    assert len(image_server.big_png) > 1000
    message = rejected(svc, 400, "reference_image_urls[0]", reference_image_urls=[image_server.url("/big.png")])
    assert "1000-byte limit" in message


def test_ref_data_uri_over_byte_cap(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_upload_bytes=1000)
    message = rejected(svc, 400, "reference_image_urls[0]", reference_image_urls=[data_uri(BIG_PNG)])
    assert "1000-byte limit" in message


def test_ref_decompression_bomb(allow: Service, image_server: ImageServer) -> None:
    message = rejected(allow, 400, "reference_image_urls[0]", reference_image_urls=[image_server.url("/bomb")])
    assert "8000x8000" in message and "pixel limit" in message


def test_ref_second_item_named(allow: Service, image_server: ImageServer) -> None:
    message = rejected(allow, 400, "reference_image_urls[1]",
                       reference_image_urls=[image_server.url("/ok.png"), image_server.url("/missing")])
    assert "/missing" in message


# --- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer hd-not-a-key"}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"},
], ids=["missing", "wrong", "empty", "basic"])
def test_bad_key(service: Service, headers: dict[str, str]) -> None:
    before = service.leftovers()
    assert_error(service.submit(headers), 401)
    assert_error(service.client.get("/api/v1/models", headers=headers), 401)
    assert_error(service.client.get("/api/v1/usage", headers=headers), 401)
    assert_error(service.client.get("/api/v1/predictions", headers=headers), 401)
    assert_error(service.client.post(UPLOAD, files={"file": ("a.png", PNG, "image/png")}, headers=headers), 401)
    assert service.leftovers() == before
    assert service.upload_rows() == 0


def test_auth_checked_before_validation(service: Service) -> None:
    # An unauthenticated caller learns nothing about validation: 401, not 400.
    assert_error(service.client.post(GENERATE, json={"model": MODEL}, headers={}), 401)
    assert_error(service.client.post(GENERATE, json=[1, 2], headers={}), 401)
    assert_error(service.client.post(UPLOAD, files={"file": ("a.txt", b"text", "text/plain")}, headers={}), 401)


def test_auth_checked_before_json_parsing(service: Service) -> None:
    resp = service.client.post(GENERATE, content=b'{"model":', headers={"Content-Type": "application/json"})
    assert_error(resp, 401)


def test_upload_malformed_multipart(service: Service) -> None:
    resp = service.client.post(UPLOAD, content=b"junk",
                               headers={**service.h1, "Content-Type": "multipart/form-data; boundary=x"})
    message = assert_error(resp, 400)
    assert message.split(":")[0] in ("file", "body"), message


def test_revoked_key(service: Service) -> None:
    assert_ok(service.submit())
    assert service.store.revoke_key(service.key1)
    before = service.leftovers()
    assert "revoked" in assert_error(service.submit(), 401)
    assert service.leftovers() == before
    assert_ok(service.submit(service.h2))  # the other key still works


def test_other_keys_prediction_is_404(service: Service) -> None:
    pid = assert_ok(service.submit())["id"]
    mine = service.client.get(f"/api/v1/model/prediction/{pid}", headers=service.h1)
    assert assert_ok(mine)["id"] == pid
    theirs = assert_error(service.client.get(f"/api/v1/model/prediction/{pid}", headers=service.h2), 404)
    random_id = "0" * 32
    unknown = assert_error(service.client.get(f"/api/v1/model/prediction/{random_id}", headers=service.h2), 404)
    assert theirs.replace(pid, "<id>") == unknown.replace(random_id, "<id>")


# --- body size --------------------------------------------------------------------------------------


def test_body_over_cap(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_body_bytes=2000)
    before = svc.leftovers()
    message = assert_error(svc.submit(prompt="a" * 4000), 413, "body")
    assert "2,000 bytes" in message
    assert svc.leftovers() == before
    assert_ok(svc.submit(prompt="a" * 1000))  # under the cap


def test_streamed_body_over_cap(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_body_bytes=2000)

    def chunks():  # no Content-Length: the cap must hold on the bytes actually received
        yield b'{"model": "hidream-o1-image", "prompt": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'

    before = svc.leftovers()
    resp = svc.client.post(GENERATE, content=chunks(), headers={**svc.h1, "Content-Type": "application/json"})
    assert svc.leftovers() == before
    assert_error(resp, 413, "body")


# --- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "wh"), [
    ("1000x700", (992, 704)),
    ("1000*700", (992, 704)),
    ({"width": 512, "height": 512}, (512, 512)),
    ("square", (1024, 1024)),
    ("square_hd", (2048, 2048)),
    ("portrait_16_9", (1440, 2560)),
    ("256x3104", (256, 3104)),
    ("64x64", (64, 64)),  # the rule is the engine's and the CLI's: 64 to 4096 a side, 2048x2048 pixels at most
    ("4096x1024", (4096, 1024)),
    ({"width": 50, "height": 4100}, (64, 4096)),  # rounded to multiples of 32 first
])
def test_size_accepted(service: Service, size: Any, wh: tuple[int, int]) -> None:
    inp = assert_ok(service.submit(image_size=size))["input"]
    assert (inp["width"], inp["height"]) == wh
    assert inp["image_size"] == size


@pytest.mark.parametrize("size", [{"width": 10**400, "height": 512}, "1" + "0" * 400 + "x700"],
                         ids=["object", "string"])
def test_size_huge_integer(service: Service, size: Any) -> None:
    rejected(service, 400, "image_size", image_size=size)


# --- queue full -------------------------------------------------------------------------------------


def test_queue_full(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_queue=2)
    assert_ok(svc.submit())
    assert_ok(svc.submit(svc.h2))
    before = svc.leftovers()
    resp = svc.submit()
    message = assert_error(resp, 429)
    assert "queue" in message
    assert resp.headers["Retry-After"].isdigit() and int(resp.headers["Retry-After"]) > 0
    # With a reference: its stored bytes are removed again.
    assert_error(svc.submit(reference_image_urls=[data_uri(), data_uri()]), 429)
    assert svc.leftovers() == before == (2, 0, 0)


# --- success without a worker -----------------------------------------------------------------------


def test_submit_created(service: Service) -> None:
    before = service.leftovers()
    data = assert_ok(service.submit())
    assert HEX32.match(data["id"])
    assert data["model"] == MODEL and data["status"] == "created"
    inp = data["input"]
    assert (inp["width"], inp["height"], inp["mode"]) == (2304, 1728, "text-to-image")
    assert isinstance(inp["seed"], int) and 0 <= inp["seed"] <= 2**32 - 1
    assert inp["prompt"] == "a red fox in the snow" and inp["num_inference_steps"] == 50
    assert inp["guidance_scale"] == 5.0 and inp["output_format"] == "png" and inp["num_images"] == 1
    assert inp["image_size"] == "landscape_4_3" and inp["reference_image_urls"] == []
    assert data["urls"]["get"] == f"{BASE_URL}/api/v1/model/prediction/{data['id']}"
    assert data["outputs"] == [] and data["has_nsfw_contents"] == [] and data["error"] == ""
    assert ISO_Z.match(data["created_at"]) and data["started_at"] is None and data["completed_at"] is None
    assert data["progress"] is None
    assert service.leftovers() == (before[0] + 1, before[1], before[2])

    polled = assert_ok(service.client.get(data["urls"]["get"], headers=service.h1))
    assert polled == data


def test_random_seeds_differ(service: Service) -> None:
    seeds = {assert_ok(service.submit(seed=-1))["input"]["seed"] for _ in range(4)}
    assert len(seeds) > 1


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_seed_echoed(service: Service, seed: int) -> None:
    assert assert_ok(service.submit(seed=seed))["input"]["seed"] == seed


@pytest.mark.parametrize("prompt", ["x" * 5000, "\U0001F98A" * 5000, " x "], ids=["5000", "5000-code-points", "padded"])
def test_prompt_limits(service: Service, prompt: str) -> None:
    assert assert_ok(service.submit(prompt=prompt))["input"]["prompt"] == prompt


def test_all_fields_echoed(service: Service) -> None:
    inp = assert_ok(service.submit(image_size="square", num_inference_steps=1, guidance_scale=1.0,
                                   output_format="webp", seed=42, num_images=4, enable_base64_output=True))["input"]
    assert inp["num_inference_steps"] == 1 and inp["guidance_scale"] == 1.0 and inp["output_format"] == "webp"
    assert inp["seed"] == 42 and inp["num_images"] == 4 and inp["enable_base64_output"] is True


@pytest.mark.parametrize("alias", ["hidream-o1-1.5", "hidream-ai/hidream-o1-1.5"])
def test_model_alias(service: Service, alias: str) -> None:
    assert assert_ok(service.submit(model=alias))["model"] == MODEL


@pytest.mark.parametrize(("n", "mode"), [(1, "edit"), (2, "personalization"), (10, "personalization")])
def test_data_uri_references(service: Service, n: int, mode: str) -> None:
    before = service.leftovers()
    data = assert_ok(service.submit(reference_image_urls=[data_uri()] * n))
    assert data["input"]["mode"] == mode
    assert len(data["input"]["reference_image_urls"]) == n
    assert all(u.startswith("data: URI (") for u in data["input"]["reference_image_urls"])  # not echoed in full
    refs = service.store.get_task(data["id"])["references"]
    assert len(refs) == n and all(service.storage.get(r) == PNG for r in refs)
    assert service.leftovers() == (before[0] + 1, before[1], before[2] + n)


def test_keep_original_aspect(service: Service) -> None:
    ref = data_uri(png_bytes((300, 100)))
    inp = assert_ok(service.submit(reference_image_urls=[ref], keep_original_aspect=True))["input"]
    assert (inp["width"], inp["height"]) == (3520, 1152)
    assert inp["keep_original_aspect"] is True
    # Ignored without exactly one reference.
    inp = assert_ok(service.submit(reference_image_urls=[ref, ref], keep_original_aspect=True))["input"]
    assert (inp["width"], inp["height"]) == (2304, 1728)


def test_snap_to_native_makes_the_nearest_native_size_and_says_so(service: Service) -> None:
    inp = assert_ok(service.submit(image_size="512x512", snap_to_native=True))["input"]
    assert (inp["width"], inp["height"]) == (2048, 2048) and inp["snap_to_native"] is True
    assert inp["image_size"] == "512x512"  # what was asked stays as given; width and height are what is made
    inp = assert_ok(service.submit(image_size={"width": 1920, "height": 800}, snap_to_native=True))["input"]
    assert (inp["width"], inp["height"]) == (3104, 1312)
    # with keep_original_aspect the aspect is the reference's (300x100, 3:1: the widest native size)
    ref = data_uri(png_bytes((300, 100)))
    inp = assert_ok(service.submit(reference_image_urls=[ref], keep_original_aspect=True, snap_to_native=True))["input"]
    assert (inp["width"], inp["height"]) == (3104, 1312)
    # left out, nothing changes and the input does not carry the field
    inp = assert_ok(service.submit(image_size="512x512"))["input"]
    assert (inp["width"], inp["height"]) == (512, 512) and "snap_to_native" not in inp
    params = assert_ok(service.client.get("/api/v1/models", headers=service.h1))[0]["parameters"]["snap_to_native"]
    assert params["default"] is False and {"width": 3104, "height": 1312} in params["sizes"]


def test_layout_boxes_are_checked_and_kept_for_the_worker(service: Service) -> None:
    from hidream.service.worker import build_request

    refs = [data_uri(png_bytes((64, 48))), data_uri(png_bytes((48, 64)))]
    boxes = [[0, 0, 0.5, 1], [0.5, 0.25, 1, 0.75]]
    data = assert_ok(service.submit(reference_image_urls=refs, layout_boxes=boxes, image_size="256x256"))
    assert data["input"]["layout_boxes"] == boxes and data["input"]["mode"] == "personalization"
    assert build_request(service.store.get_task(data["id"]), []).layout == boxes
    assert "layout_boxes" not in assert_ok(service.submit(reference_image_urls=refs))["input"]  # stored when given
    rejected(service, 400, "layout_boxes", reference_image_urls=refs, layout_boxes=boxes[:1])
    rejected(service, 400, "layout_boxes", layout_boxes=boxes[:1])  # no reference
    rejected(service, 400, "layout_boxes[1]", reference_image_urls=refs, layout_boxes=[boxes[0], [0.5, 0, 1.2, 1]])
    rejected(service, 400, "layout_boxes[0]", reference_image_urls=refs, layout_boxes=[[0, 0, 1], boxes[1]])
    rejected(service, 400, "layout_boxes", reference_image_urls=refs[:1], layout_boxes=boxes[:1],
             keep_original_aspect=True)
    rejected(service, 400, "layout_boxes", reference_image_urls=refs, layout_boxes="left, right")
    rejected(service, 400, "layout_boxes", reference_image_urls=refs * 3, layout_boxes=boxes * 3)  # at most 5


def test_seam_smoothing_defaults_rules_and_the_worker(service: Service) -> None:
    from hidream.engine.seams import SeamSmoothing
    from hidream.service.worker import build_request

    data = assert_ok(service.submit(seam_smoothing={}))
    assert data["input"]["seam_smoothing"] == {"start": 0.8, "end": 1.0, "passes": 2}
    assert build_request(service.store.get_task(data["id"]), []).seam_smoothing == SeamSmoothing(0.8, 1.0, 2)
    data = assert_ok(service.submit(seam_smoothing={"start": 0.5, "passes": 8}))
    assert build_request(service.store.get_task(data["id"]), []).seam_smoothing == SeamSmoothing(0.5, 1.0, 8)
    plain = assert_ok(service.submit())
    assert "seam_smoothing" not in plain["input"]
    assert build_request(service.store.get_task(plain["id"]), []).seam_smoothing is None
    for fields, field in [({"passes": 3}, "seam_smoothing"), ({"start": 0.9, "end": 0.5}, "seam_smoothing"),
                          ({"start": 1.5}, "seam_smoothing.start"), ({"end": "1"}, "seam_smoothing.end"),
                          ({"strength": 1}, "seam_smoothing.strength"), (True, "seam_smoothing")]:
        message = rejected(service, 400, field, seam_smoothing=fields)
        assert "allowed: start, end, passes" in message or "passes: one of 2, 4, 8" in message or \
            "must be an object" in message, message


def test_step_cache_is_stored_only_when_on_and_reaches_the_worker(service: Service) -> None:
    from hidream.service.worker import build_request

    data = assert_ok(service.submit(cache="fast"))
    assert data["input"]["cache"] == "fast"
    assert build_request(service.store.get_task(data["id"]), []).cache == "fast"
    for body in ({}, {"cache": "off"}):
        plain = assert_ok(service.submit(**body))
        assert "cache" not in plain["input"]
        assert build_request(service.store.get_task(plain["id"]), []).cache == "off"
    for bad in ("slow", "FAST", True, None, ["fast"]):
        message = rejected(service, 400, "cache", cache=bad)
        assert "must be one of off, fast" in message, message
    params = assert_ok(service.client.get("/api/v1/models", headers=service.h1))[0]["parameters"]
    assert params["cache"] == {"type": "string", "default": "off", "enum": ["off", "fast"],
                                            "extension": True}


def test_keep_original_aspect_extreme(service: Service) -> None:
    ref = data_uri(png_bytes((5000, 1), mode="L"))
    rejected(service, 400, "reference_image_urls[0]", reference_image_urls=[ref], keep_original_aspect=True)


# --- uploadMedia ------------------------------------------------------------------------------------


def upload(svc: Service, data: bytes, headers: dict[str, str] | None = None, name: str = "a.png",
           ctype: str = "image/png") -> httpx.Response:
    return svc.client.post(UPLOAD, files={"file": (name, data, ctype)}, headers=svc.h1 if headers is None else headers)


def test_upload_and_use(service: Service) -> None:
    resp = upload(service, PNG)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == 200 and body["message"] == "success"
    url = body["url"]
    assert body["data"] == {"url": url} and url.startswith(f"{BASE_URL}/files/uploads/")
    assert service.upload_rows() == 1

    got = service.client.get(url)  # no key needed: the signature is the capability
    assert got.status_code == 200 and got.content == PNG and got.headers["content-type"] == "image/png"

    data = assert_ok(service.submit(reference_image_urls=[url]))
    assert data["input"]["mode"] == "edit"
    refs = service.store.get_task(data["id"])["references"]
    assert [service.storage.get(r) for r in refs] == [PNG]

    before = service.leftovers()
    message = rejected(service, 400, "reference_image_urls[0]", headers=service.h2, reference_image_urls=[url])
    assert "not a file this API key uploaded" in message
    assert service.leftovers() == before


def test_upload_jpeg_and_webp(service: Service) -> None:
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format=fmt)
        url = upload(service, buf.getvalue(), ctype=mime).json()["url"]
        got = service.client.get(url)
        assert got.status_code == 200 and got.headers["content-type"] == mime


@pytest.mark.parametrize(("data", "name"), [(b"just some text", "a.txt"), (PNG[: len(PNG) // 2], "half.png")],
                         ids=["text", "truncated"])
def test_upload_not_an_image(service: Service, data: bytes, name: str) -> None:
    before = service.leftovers()
    assert_error(upload(service, data, name=name, ctype="text/plain"), 400, "file")
    assert service.leftovers() == before and service.upload_rows() == 0


def test_upload_too_big(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_upload_bytes=1000)
    before = svc.leftovers()
    assert "1,000 bytes" in assert_error(upload(svc, BIG_PNG), 413, "file")
    assert svc.leftovers() == before and svc.upload_rows() == 0
    assert_ok(upload(svc, PNG))  # a small one is fine


def test_upload_over_pixel_cap(make_service: Callable[..., Service]) -> None:
    svc = make_service(max_upload_pixels=1000)
    assert_error(upload(svc, png_bytes((40, 40))), 400, "file")
    assert svc.upload_rows() == 0 and svc.leftovers()[2] == 0


def test_upload_missing_file(service: Service) -> None:
    assert_error(service.client.post(UPLOAD, headers=service.h1, data={"other": "x"}), 400, "file")


def test_upload_url_of_other_blob_rejected(service: Service) -> None:
    # A URL under /files/ that is not an upload (e.g. a reference copy) is no reference.
    pid = assert_ok(service.submit(reference_image_urls=[data_uri()]))["id"]
    (ref,) = service.store.get_task(pid)["references"]
    signer = UrlSigner(service.settings.signing_secret(), BASE_URL, 60)
    message = rejected(service, 400, "reference_image_urls[0]", reference_image_urls=[signer.url(ref)])
    assert "not a file this API key uploaded" in message


def test_an_output_of_the_keys_own_prediction_is_a_reference(service: Service) -> None:
    """"Use as reference": the signed URL of one of the key's outputs feeds an edit, without an upload."""
    pid = assert_ok(service.submit())["id"]
    task = service.store.claim("w1", [MODEL], 30)
    out = f"outputs/{pid}/0.png"
    service.storage.put(out, PNG)
    assert service.store.complete(task["id"], "w1", [out], 5, 44_000)
    url = assert_ok(service.client.get(f"/api/v1/model/prediction/{pid}", headers=service.h1))["outputs"][0]
    data = assert_ok(service.submit(reference_image_urls=[url]))
    assert data["input"]["mode"] == "edit"
    assert [service.storage.get(r) for r in service.store.get_task(data["id"])["references"]] == [PNG]
    # Another key cannot, and a made-up output path of this prediction is no reference either.
    before = service.leftovers()
    message = rejected(service, 400, "reference_image_urls[0]", headers=service.h2, reference_image_urls=[url])
    assert "not a file this API key uploaded or generated" in message
    signer = UrlSigner(service.settings.signing_secret(), BASE_URL, 60)
    rejected(service, 400, "reference_image_urls[0]", reference_image_urls=[signer.url(f"outputs/{pid}/9.png")])
    assert service.leftovers() == before


def test_reference_urls_are_signed_afresh_when_a_prediction_is_read(make_service: Callable[..., Service]) -> None:
    svc = make_service(url_ttl_s=1)
    url = upload(svc, PNG).json()["url"]
    pid = assert_ok(svc.submit(reference_image_urls=[url]))["id"]
    time.sleep(1.1)  # the link given at upload time has expired by now
    assert svc.client.get(url).status_code == 404
    [shown] = assert_ok(svc.client.get(f"/api/v1/model/prediction/{pid}", headers=svc.h1))["input"][
        "reference_image_urls"]
    assert shown != url and shown.split("?")[0] == url.split("?")[0]
    got = svc.client.get(shown)
    assert got.status_code == 200 and got.content == PNG


# --- /files: signed, expiring -----------------------------------------------------------------------


def test_files_signature_and_expiry(service: Service) -> None:
    url = upload(service, PNG).json()["url"]
    assert service.client.get(url).status_code == 200
    path, _, query = url.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&"))
    bad_sig = f"{path}?expires={params['expires']}&signature={'0' * 64}"
    no_sig = path
    key = path.removeprefix(f"{BASE_URL}/files/")
    signer = UrlSigner(service.settings.signing_secret(), BASE_URL, 3600)
    expired = signer.url(key, now=time.time() - 7200)
    foreign = UrlSigner("another secret", BASE_URL, 3600).url(key)
    other_key = signer.url("uploads/" + "f" * 32 + ".png").replace("f" * 32, key.split("/")[1].split(".")[0])
    later = f"{path}?expires={int(params['expires']) + 1}&signature={params['signature']}"
    for bad in (bad_sig, no_sig, expired, foreign, other_key, later):
        assert_error(service.client.get(bad), 404)
    assert_error(service.client.get(signer.url("uploads/" + "e" * 32 + ".png")), 404)  # signed but absent


# --- catalogue, usage, listing ----------------------------------------------------------------------


def test_models(service: Service) -> None:
    data = assert_ok(service.client.get("/api/v1/models", headers=service.h1))
    assert [m["id"] for m in data] == [MODEL]
    (model,) = data
    assert set(model["aliases"]) == {"hidream-o1-1.5", "hidream-ai/hidream-o1-1.5"}
    assert model["price_per_image_usd"] == 0.044
    p = model["parameters"]
    assert (p["num_inference_steps"]["minimum"], p["num_inference_steps"]["maximum"]) == (1, 100)
    assert p["num_inference_steps"]["default"] == 50
    assert (p["guidance_scale"]["minimum"], p["guidance_scale"]["maximum"]) == (1.0, 20.0)
    assert (p["seed"]["minimum"], p["seed"]["maximum"]) == (-1, 2**32 - 1)
    assert (p["num_images"]["minimum"], p["num_images"]["maximum"]) == (1, 4)
    assert p["reference_image_urls"]["max_items"] == 10
    assert p["output_format"]["enum"] == ["png", "jpeg", "webp"]
    assert p["image_size"]["presets"]["landscape_4_3"] == {"width": 2304, "height": 1728}
    assert p["prompt"]["max_length"] == 5000


def test_models_say_whether_the_demo_model_is_served_and_what_it_knows(make_service: Callable[..., Service],
                                                                      demo_checkpoint: Path) -> None:
    from hidream import world

    svc = make_service()  # no model configured: the shipped demo model
    (model,) = assert_ok(svc.client.get("/api/v1/models", headers=svc.h1))
    assert model["demo"] is True and model["suggested"] == {"image_size": {"width": 256, "height": 256}}
    known = model["demo_world"]
    assert (known["colours"], known["shapes"], known["size"]) == (list(world.COLOURS), list(world.SHAPES), 256)
    for mode, prompts in known["examples"].items():
        for prompt in prompts:  # every example is a sentence of the world's grammar, of its mode
            parsed = world.parse(prompt)
            assert {"text-to-image": world.Scene, "edit": world.Edit,
                    "personalization": world.PersonalizePrompt}[mode] is type(parsed), (mode, prompt)
    # another checkpoint (the random official-layout one): not the demo model, nothing suggested
    other = make_service(model=str(demo_checkpoint))
    (model,) = assert_ok(other.client.get("/api/v1/models", headers=other.h1))
    assert (model["demo"], model["demo_world"], model["suggested"]) == (False, None, {})


def test_models_list_the_live_workers_and_how_their_engines_run(make_service: Callable[..., Service]) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from hidream.service.store import utcnow
    from hidream.service.tables import workers

    svc = make_service(model_ids=(MODEL, "other"))
    assert [m["workers"] for m in assert_ok(svc.client.get("/api/v1/models", headers=svc.h1))] == [[], []]
    fp8 = {"precision": "bf16", "quantize": "fp8", "offload": "layers", "variant": "dev"}
    svc.store.register_worker("w-fp8", "gpu-box", 1, [MODEL], "cuda:0", fp8)
    svc.store.register_worker("w-both", "cpu-box", 2, [MODEL, "other"], "cpu")  # an older worker: no engine facts
    for gone in ("w-stale", "w-stopping"):
        svc.store.register_worker(gone, "box", 3, [MODEL], "cuda:1", fp8)
    with svc.store.engine.begin() as conn:
        conn.execute(update(workers).where(workers.c.id == "w-stale").values(heartbeat_at=utcnow() - timedelta(hours=1)))
    svc.store.worker_heartbeat("w-stopping", "stopping", None)

    data = {m["id"]: m for m in assert_ok(svc.client.get("/api/v1/models", headers=svc.h1))}
    assert data[MODEL]["workers"] == [
        {"id": "w-fp8", "device": "cuda:0", "precision": "bf16", "quantize": "fp8", "offload": "layers",
         "variant": "dev"},
        {"id": "w-both", "device": "cpu", "precision": None, "quantize": None, "offload": None, "variant": None},
    ]
    assert [w["id"] for w in data["other"]["workers"]] == ["w-both"]
    assert set(data[MODEL]) == {"id", "aliases", "price_per_image_usd", "demo", "demo_world", "suggested",
                                 "parameters", "workers"}


def test_the_openapi_description_of_the_models_workers_is_valid(service: Service) -> None:
    from openapi_spec_validator import validate

    spec = service.client.get("/openapi.json").json()
    validate(spec)
    info = spec["components"]["schemas"]["ModelInfo"]
    assert info["properties"]["workers"]["items"] == {"$ref": "#/components/schemas/ModelWorker"}
    assert "workers" not in info.get("required", [])  # additive: a client of the old schema is unaffected
    worker = spec["components"]["schemas"]["ModelWorker"]
    assert set(worker["properties"]) == {"id", "device", "precision", "quantize", "offload", "variant"}


def test_models_price_configurable(make_service: Callable[..., Service]) -> None:
    svc = make_service(price_usd=0.01)
    assert assert_ok(svc.client.get("/api/v1/models", headers=svc.h1))[0]["price_per_image_usd"] == 0.01


def test_usage(service: Service) -> None:
    empty = {"images": 0, "amount_usd": 0, "days": []}
    assert assert_ok(service.client.get("/api/v1/usage", headers=service.h1)) == empty
    assert_ok(service.submit(num_images=2))
    task = service.store.claim("w1", [MODEL], 30)
    assert service.store.complete(task["id"], "w1", ["outputs/a/0.png", "outputs/a/1.png"], 5, 44_000)
    data = assert_ok(service.client.get("/api/v1/usage", headers=service.h1))
    assert data["images"] == 2 and data["amount_usd"] == pytest.approx(0.088)
    (day,) = data["days"]
    assert re.match(r"^\d{4}-\d\d-\d\d$", day["date"]) and day["images"] == 2
    assert day["amount_usd"] == pytest.approx(0.088)
    assert assert_ok(service.client.get("/api/v1/usage", headers=service.h2)) == empty


def test_predictions_pagination(service: Service) -> None:
    ids = [assert_ok(service.submit(prompt=f"image {i}"))["id"] for i in range(5)]
    seen, pages, cursor = [], 0, None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        data = assert_ok(service.client.get("/api/v1/predictions", params=params, headers=service.h1))
        pages += 1
        assert len(data["items"]) <= 2
        seen += [item["id"] for item in data["items"]]
        cursor = data["next_cursor"]
        if not cursor:
            break
        assert pages < 10
    assert pages == 3
    assert seen == ids[::-1]  # newest first, each exactly once
    other = assert_ok(service.client.get("/api/v1/predictions", headers=service.h2))
    assert other == {"items": [], "next_cursor": None}
    everything = assert_ok(service.client.get("/api/v1/predictions", headers=service.h1))
    assert [i["id"] for i in everything["items"]] == ids[::-1] and everything["next_cursor"] is None


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"), ({"cursor": "zzz"}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, "cursor"),
])
def test_predictions_bad_query(service: Service, params: dict[str, Any], field: str) -> None:
    assert_error(service.client.get("/api/v1/predictions", params=params, headers=service.h1), 400, field)


def test_openapi(service: Service) -> None:
    resp = service.client.get("/openapi.json")
    assert resp.status_code == 200
    spec = resp.json()
    paths = spec["paths"]
    expected = {
        "/api/v1/model/generateImage": "post", "/api/v1/model/prediction/{prediction_id}": "get",
        "/api/v1/model/uploadMedia": "post", "/api/v1/models": "get", "/api/v1/usage": "get",
        "/api/v1/predictions": "get",
    }
    for path, method in expected.items():
        assert method in paths.get(path, {}), path
    body = paths["/api/v1/model/generateImage"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert set(body["properties"]) == {"model", *schemas.RULES}
    assert body["additionalProperties"] is False
    assert set(body["required"]) == {"model", "prompt"}


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_guidance_not_finite(service: Service, value: bytes) -> None:
    before = service.leftovers()
    body = b'{"model": "hidream-o1-image", "prompt": "x", "guidance_scale": ' + value + b"}"
    assert_error(post_raw(service, body), 400, "guidance_scale")
    assert service.leftovers() == before


def test_dev_variant_defaults(make_service: Callable[..., Service]) -> None:
    svc = make_service(variant="dev")
    inp = assert_ok(svc.submit())["input"]
    assert (inp["num_inference_steps"], inp["guidance_scale"]) == (28, 1.0)
    inp = assert_ok(svc.submit(num_inference_steps=10, guidance_scale=3.5))["input"]
    assert (inp["num_inference_steps"], inp["guidance_scale"]) == (10, 3.5)
    params = assert_ok(svc.client.get("/api/v1/models", headers=svc.h1))[0]["parameters"]
    assert (params["num_inference_steps"]["default"], params["guidance_scale"]["default"]) == (28, 1.0)


def test_unexpected_error_is_500_with_request_id(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service.store, "insert_task", broken)
    before = service.leftovers()
    message = assert_error(service.submit(reference_image_urls=[data_uri()]), 500)
    assert re.fullmatch(r"internal error \(request id [0-9a-f]+\)", message), message
    assert "secret" not in message
    assert service.leftovers() == before  # the reference copy is removed again



def test_prompt_with_a_control_token_is_rejected_at_submission(service: Service) -> None:
    before = service.leftovers()
    message = assert_error(service.submit(prompt="a cat <|image_pad|> on a mat"), 400)
    assert message.startswith("prompt: must not contain the model's control token <|image_pad|>"), message
    assert service.leftovers() == before
    assert_ok(service.submit(prompt="explain <think> tags and <b>bold</b>"))  # ordinary markup is fine
