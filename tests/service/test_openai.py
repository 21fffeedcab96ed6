"""The OpenAI-compatible images API end to end: real `hidream serve` processes, the official `openai` package.

Three servers, all on loopback and stopped by their fixtures:
- `server`: API and in-process worker on the demo checkpoint; small, quick images (256x256, 2 steps).
- `queue`: no worker and a 0.5 s sync wait, so every accepted request ends in a 504 that names its
  prediction, whose `input` shows how the OpenAI fields were mapped (sizes that would be slow to render
  here included); and the errors, which never reach a task.
- `standin`: no worker; the test itself plays the worker through the store (claims the task, fails it)
  or cancels it through the native route, to see what the waiting OpenAI call answers.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from hidream.service.store import Store

try:  # tests/service as a package or as a plain directory on sys.path
    from . import server_util as su
except ImportError:
    import server_util as su

MODEL = "hidream-o1-image"
SMALL: dict[str, Any] = {"size": "256x256", "extra_body": {"num_inference_steps": 2}}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

pytestmark = pytest.mark.timeout(240)


# --- helpers ------------------------------------------------------------------------------------------------


def picture(width: int, height: int, color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    """A PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes, fmt: str, size: tuple[int, int]) -> Image.Image:
    """The image in `data`, checked to be a `fmt` file of `size`."""
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == PIL_FORMAT[fmt] and img.size == size, (img.format, img.size)
    return img


def download(url: str, fmt: str) -> bytes:
    """An output URL's bytes: no key needed (the URL is signed)."""
    assert url.startswith("http://127.0.0.1:"), url
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == MIME[fmt], (r.status_code, r.headers)
    return r.content


def error_of(err: openai.APIStatusError) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error response: exactly its four keys (and extensions)."""
    body = err.response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


@dataclass
class Server:
    proc: su.Proc
    key: str
    home: Path

    @property
    def url(self) -> str:
        return self.proc.base_url

    def openai(self, key: str | None = None, **options: Any) -> openai.OpenAI:
        """The official client on this server's /v1; no retries unless asked for."""
        options = {"max_retries": 0, "timeout": 120} | options
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, **options)

    def native(self) -> httpx.Client:
        return su.client(self.url, self.key)

    def prediction(self, prediction_id: str) -> dict[str, Any]:
        with self.native() as c:
            return su.ok(c.get(f"/api/v1/model/prediction/{prediction_id}"))

    def prediction_ids(self) -> list[str]:
        with self.native() as c:
            return [p["id"] for p in su.ok(c.get("/api/v1/predictions", params={"limit": 100}))["items"]]

    @contextmanager
    def store(self) -> Iterator[Store]:
        """The server's database, opened from the test process."""
        store = Store.open(f"sqlite:///{self.home / 'hidream.db'}")
        try:
            yield store
        finally:
            store.close()


@contextmanager
def running(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, name: str, worker: bool,
            **settings: Any) -> Iterator[Server]:
    """A `hidream serve` process with these settings, stopped on exit."""
    home = tmp_path_factory.mktemp(name)
    procs = su.Processes(home.parent / (home.name + "-logs"))
    try:
        proc = procs.serve(su.service_env(home, checkpoint, **settings), worker=worker)
        key = proc.first_key()
        assert key, proc.output()
        yield Server(proc, key, home)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    with running(tmp_path_factory, demo_checkpoint, "openai", worker=True) as s:
        yield s


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    with running(tmp_path_factory, demo_checkpoint, "openai-queue", worker=False, sync_timeout_s=0.5) as s:
        yield s


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    with running(tmp_path_factory, demo_checkpoint, "openai-standin", worker=False, sync_timeout_s=20) as s:
        yield s


def timed_out(call: Any) -> dict[str, Any]:
    """The 504 error of a call that the worker-less server cannot finish; it names the prediction."""
    with pytest.raises(openai.InternalServerError) as info:
        call()
    assert info.value.status_code == 504
    assert info.value.response.headers["x-should-retry"] == "false"
    error = error_of(info.value)
    assert error["type"] == "server_error" and error["code"] == "timeout" and error["param"] is None
    pid = error["prediction_id"]
    assert f"prediction {pid} is still created" in error["message"]
    assert f"/api/v1/model/prediction/{pid}" in error["message"]
    return error


# --- generations and edits that complete ---------------------------------------------------------------------


def test_generate_b64_and_url(server: Server) -> None:
    client = server.openai()
    r = client.images.generate(model=MODEL, prompt="a lighthouse at dusk", n=2, size="256x256",
                               response_format="b64_json", extra_body={"seed": 7, "num_inference_steps": 2})
    assert r.size == "256x256" and r.output_format == "png" and len(r.data) == 2
    assert abs(r.created - time.time()) < 3600 and r.data[0].url is None
    first, second = (base64.b64decode(d.b64_json, validate=True) for d in r.data)
    decode(first, "png", (256, 256))
    decode(second, "png", (256, 256))
    assert first != second  # seeds 7 and 8
    pred = server.prediction(r.id)  # the extension: the prediction behind the response
    assert pred["status"] == "completed" and pred["input"]["seed"] == 7
    assert pred["input"]["num_inference_steps"] == 2 and pred["input"]["mode"] == "text-to-image"

    # url is the default format; `model` may be left out (the first served id) or be an alias.
    for model in (openai.omit, "hidream-o1-1.5"):
        r = client.images.generate(prompt="a lighthouse at dusk", output_format="jpeg", model=model, **SMALL)
        assert r.output_format == "jpeg" and len(r.data) == 1 and r.data[0].b64_json is None
        decode(download(r.data[0].url, "jpeg"), "jpeg", (256, 256))
        assert server.prediction(r.id)["model"] == MODEL


def test_same_seed_same_bytes(server: Server) -> None:
    client = server.openai()

    def image(seed: int) -> bytes:
        r = client.images.generate(prompt="a red fox in fresh snow", size="256x256", response_format="b64_json",
                                   output_format="webp", extra_body={"seed": seed, "num_inference_steps": 2})
        return base64.b64decode(r.data[0].b64_json)

    once = image(11)
    decode(once, "webp", (256, 256))
    assert image(11) == once
    assert image(12) != once


def test_edit_one_image_and_several(server: Server, tmp_path: Path) -> None:
    client = server.openai()
    paths = []
    for i, color in enumerate([(200, 30, 60), (20, 90, 220)]):
        paths.append(tmp_path / f"ref{i}.png")
        paths[-1].write_bytes(picture(96, 64, color))

    with open(paths[0], "rb") as f:
        r = client.images.edit(image=f, prompt="make it stormy", response_format="b64_json", output_format="webp",
                               **SMALL)
    assert r.size == "256x256" and r.output_format == "webp"
    decode(base64.b64decode(r.data[0].b64_json), "webp", (256, 256))
    inp = server.prediction(r.id)["input"]
    assert inp["mode"] == "edit" and (inp["width"], inp["height"]) == (256, 256)
    assert inp["reference_image_urls"] == [f"upload: ref0.png ({paths[0].stat().st_size:,} bytes)"]

    with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
        r = client.images.edit(image=[f0, f1], prompt="the two of them together", n=2, **SMALL)
    assert len(r.data) == 2 and r.output_format == "png"
    for d in r.data:
        decode(download(d.url, "png"), "png", (256, 256))
    inp = server.prediction(r.id)["input"]
    assert inp["mode"] == "personalization" and len(inp["reference_image_urls"]) == 2


# --- how the fields map (a worker-less server: each request ends in a 504 naming its prediction) -------------


def test_size_auto(queue: Server) -> None:
    client = queue.openai()
    wide = picture(96, 64)
    # One image: its aspect ratio (3:2) within the 2048x2048 pixel budget, patch-aligned.
    error = timed_out(lambda: client.images.edit(image=("wide.png", wide, "image/png"), prompt="x", size="auto"))
    inp = queue.prediction(error["prediction_id"])["input"]
    w, h = inp["width"], inp["height"]
    assert inp["keep_original_aspect"] is True and inp["mode"] == "edit"
    assert w * 64 == h * 96 and w % 32 == 0 and w * h <= 2048 * 2048 and w * h > 1800 * 1800, (w, h)
    # Several images, or none: the default preset (landscape_4_3); so does a left-out size.
    images = [("a.png", wide, "image/png"), ("b.png", picture(64, 64), "image/png")]
    for call in (lambda: client.images.edit(image=images, prompt="x", size="auto"),
                 lambda: client.images.generate(prompt="x", size="auto"),
                 lambda: client.images.generate(prompt="x")):
        inp = queue.prediction(timed_out(call)["prediction_id"])["input"]
        assert (inp["width"], inp["height"]) == (2304, 1728) and inp["keep_original_aspect"] is False


def test_snap_to_native_passes_through_json_and_forms(queue: Server) -> None:
    client = queue.openai()
    for call in (lambda: client.images.generate(prompt="x", size="512x512", extra_body={"snap_to_native": True}),
                 lambda: client.images.edit(image=("a.png", picture(96, 64), "image/png"), prompt="x",
                                            size="512x512", extra_body={"snap_to_native": "true"})):
        inp = queue.prediction(timed_out(call)["prediction_id"])["input"]
        assert (inp["width"], inp["height"]) == (2048, 2048) and inp["snap_to_native"] is True


def test_step_cache_passes_through_json_and_forms(queue: Server) -> None:
    client = queue.openai()
    for call in (lambda: client.images.generate(prompt="x", size="256x256", extra_body={"cache": "fast"}),
                 lambda: client.images.edit(image=("a.png", picture(96, 64), "image/png"), prompt="x",
                                            size="256x256", extra_body={"cache": "fast"})):
        assert queue.prediction(timed_out(call)["prediction_id"])["input"]["cache"] == "fast"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="256x256", extra_body={"cache": "quick"})
    assert error_of(err.value)["param"] == "cache" and "off, fast" in error_of(err.value)["message"]


def test_layout_boxes_pass_through_forms_as_json_text(queue: Server) -> None:
    client = queue.openai()
    images = [("a.png", picture(96, 64), "image/png"), ("b.png", picture(64, 96), "image/png")]
    call = lambda: client.images.edit(image=images, prompt="x", size="256x256",  # noqa: E731
                                      extra_body={"layout_boxes": "[[0, 0, 0.5, 1], [0.5, 0, 1, 1]]"})
    inp = queue.prediction(timed_out(call)["prediction_id"])["input"]
    assert inp["layout_boxes"] == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=images, prompt="x", size="256x256", extra_body={"layout_boxes": "[[0, 0, 0.5, 1]]"})
    assert error_of(err.value)["param"] == "layout_boxes"


def test_fields_map_onto_the_task(queue: Server) -> None:
    client = queue.openai()
    ignored = {"quality": "high", "style": "vivid", "user": "u-1", "background": "opaque", "moderation": "low",
               "output_compression": 80, "input_fidelity": "high"}
    error = timed_out(lambda: client.images.generate(
        prompt="a fox", n=3, size="1024x768", output_format="jpeg", response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 3, "guidance_scale": 2.5, **ignored}))
    inp = queue.prediction(error["prediction_id"])["input"]
    assert (inp["width"], inp["height"], inp["num_images"], inp["output_format"]) == (1024, 768, 3, "jpeg")
    assert (inp["seed"], inp["num_inference_steps"], inp["guidance_scale"]) == (5, 3, 2.5)
    # Multipart fields are text: the same values arrive typed.
    error = timed_out(lambda: client.images.edit(
        image=("a.png", picture(32, 32), "image/png"), prompt="x", n=2, size="512x512",
        extra_body={"seed": 9, "guidance_scale": 1.5, **ignored}))
    inp = queue.prediction(error["prediction_id"])["input"]
    assert (inp["width"], inp["height"], inp["num_images"], inp["seed"], inp["guidance_scale"]) == \
        (512, 512, 2, 9, 1.5)


def test_idempotency_key(queue: Server) -> None:
    client = queue.openai()
    headers = {"Idempotency-Key": f"openai-{time.time_ns()}"}
    first = timed_out(lambda: client.images.generate(prompt="once", extra_headers=headers))
    again = timed_out(lambda: client.images.generate(prompt="once", extra_headers=headers))
    assert again["prediction_id"] == first["prediction_id"]
    with pytest.raises(openai.ConflictError) as info:
        client.images.generate(prompt="another", extra_headers=headers)
    error = error_of(info.value)
    assert error["message"].startswith("Idempotency-Key: was used with a different request")
    assert info.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", extra_headers={"Idempotency-Key": "k" * 256})
    assert error_of(info.value)["message"].startswith("Idempotency-Key: must be 1 to 255 printable ASCII")


def test_rate_limit(queue: Server) -> None:
    with queue.store() as store:
        _, token = store.create_key("limited", max_concurrent=1)
    client = queue.openai(token)
    timed_out(lambda: client.images.generate(prompt="the one that waits"))  # queued for good: no worker
    with pytest.raises(openai.RateLimitError) as info:
        client.images.generate(prompt="one too many")
    error = error_of(info.value)
    assert error["type"] == "rate_limit_error" and error["message"].startswith("rate limit:")
    assert int(info.value.response.headers["retry-after"]) > 0


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "param", "rule"), [
    ({"n": 0}, "n", "n: must be an integer from 1 to 4 (got 0)"),
    ({"n": 5}, "n", "n: must be an integer from 1 to 4 (got 5)"),
    ({"size": "10x10"}, "size", 'size: must be "auto", "WxH" with sides from 64 to 4096'),
    ({"size": "4096x4096"}, "size", "size: must be"),
    ({"extra_body": {"colour": "red"}}, "colour", "colour: unknown field (allowed: "),
    ({"output_format": "gif"}, "output_format", "output_format: must be png, jpeg or webp (got 'gif')"),
    ({"response_format": "html"}, "response_format", "response_format: must be url or b64_json"),
    ({"model": "dall-e-3"}, "model", "model: must be one of hidream-o1-image"),
    ({"prompt": "   "}, "prompt", "prompt: must be a string of 1 to 5,000 characters"),
    ({"extra_body": {"seed": -2}}, "seed", "seed: must be an integer from 0 to 4294967295, or -1"),
    ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", "num_inference_steps: must be"),
    ({"stream": True}, "stream", "stream: streaming is not supported"),
])
def test_generation_errors(queue: Server, call: dict[str, Any], param: str, rule: str) -> None:
    before = queue.prediction_ids()
    with pytest.raises(openai.BadRequestError) as info:
        queue.openai().images.generate(**{"prompt": "a fox", **call})
    error = error_of(info.value)
    assert info.value.param == param and error["param"] == param
    assert info.value.type == error["type"] == "invalid_request_error"
    assert error["message"].startswith(rule), error["message"]
    assert queue.prediction_ids() == before  # nothing was queued


@pytest.mark.parametrize(("call", "param", "rule"), [
    ({"mask": ("m.png", picture(32, 32), "image/png")}, "mask",
     "mask: masks are not supported; describe the edit in the prompt"),
    ({"n": 5}, "n", "n: must be an integer from 1 to 4 (got 5)"),
    ({"size": "10x10"}, "size", "size: must be"),
    ({"image": ("notes.txt", b"not an image", "text/plain")}, "image", "image: not a PNG, JPEG or WebP image"),
    ({"image": [("a.png", picture(32, 32), "image/png"), ("b.png", b"\x89PNG\r\n", "image/png")]}, "image[1]",
     "image[1]: "),
    ({"image": [("a.png", picture(32, 32), "image/png")] * 11}, "image", "image: at most 10 images (got 11)"),
    ({"extra_body": {"strength": "0.5"}}, "strength", "strength: unknown field"),
])
def test_edit_errors(queue: Server, call: dict[str, Any], param: str, rule: str) -> None:
    before = queue.prediction_ids()
    with pytest.raises(openai.BadRequestError) as info:
        queue.openai().images.edit(**{"image": ("a.png", picture(32, 32), "image/png"), "prompt": "x", **call})
    error = error_of(info.value)
    assert info.value.param == param and error["param"] == param
    assert error["message"].startswith(rule), error["message"]
    assert queue.prediction_ids() == before


def test_auth_errors(queue: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        queue.openai("hd-not-a-key").images.generate(prompt="x", n=99)  # 401 whatever the body
    assert error_of(info.value) == {"message": "invalid or revoked API key", "type": "authentication_error",
                                    "param": None, "code": "invalid_api_key"}
    for headers, said in (({}, "missing API key: send Authorization: Bearer <key>"),
                          ({"Authorization": f"Basic {queue.key}"}, "Authorization: the scheme is 'Basic', not Bearer"),
                          ({"Authorization": queue.key}, "Authorization: the scheme is missing")):
        r = httpx.post(queue.url + "/v1/images/edits", files={"image": ("a.png", picture(32, 32))},
                       headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["message"].startswith(said), r.text


def test_openapi_lists_the_routes(queue: Server) -> None:
    spec = httpx.get(queue.url + "/openapi.json", timeout=30).json()
    gen, edit = (spec["paths"][f"/v1/images/{p}"]["post"] for p in ("generations", "edits"))
    assert "application/json" in gen["requestBody"]["content"]
    form = edit["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "prompt"} <= set(form["required"]) and "mask" not in form["properties"]
    ok = gen["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/OpenAIImagesResponse")
    assert gen["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorResponse")


# --- the wait ends without images -----------------------------------------------------------------------------


def call_in_background(call: Any) -> tuple[ThreadPoolExecutor, Future]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(call)


def claimed(store: Store, timeout: float = 30) -> dict[str, Any]:
    """The next queued task, claimed as a worker would (once the waiting call has queued it)."""
    deadline = time.monotonic() + timeout
    while (row := store.claim("test-worker", [MODEL], 60)) is None:
        assert time.monotonic() < deadline, "the OpenAI call queued no task"
        time.sleep(0.02)
    return row


def test_failed_task_is_a_500_that_is_not_retried(standin: Server) -> None:
    before = set(standin.prediction_ids())
    client = standin.openai(max_retries=2, timeout=60)  # retries on: the answer must turn them off
    pool, future = call_in_background(lambda: client.images.generate(prompt="doomed"))
    try:
        with standin.store() as store:
            row = claimed(store)
            assert store.fail(row["id"], "test-worker", "out of memory: try a smaller size")
        with pytest.raises(openai.InternalServerError) as info:
            future.result(timeout=60)
    finally:
        pool.shutdown()
    error = error_of(info.value)
    assert info.value.status_code == 500
    assert error == {"message": "out of memory: try a smaller size", "type": "server_error", "param": None,
                     "code": "generation_failed", "prediction_id": row["id"]}
    assert set(standin.prediction_ids()) - before == {row["id"]}  # one task: the client did not retry


def test_canceled_task_is_a_409(standin: Server) -> None:
    before = set(standin.prediction_ids())
    client = standin.openai(max_retries=2, timeout=60)
    pool, future = call_in_background(lambda: client.images.generate(prompt="never mind"))
    try:
        deadline = time.monotonic() + 30
        while not (new := set(standin.prediction_ids()) - before):
            assert time.monotonic() < deadline, "the OpenAI call queued no task"
            time.sleep(0.02)
        (pid,) = new
        with standin.native() as c:
            assert su.ok(c.post(f"/api/v1/model/prediction/{pid}/cancel"))["error"] == "canceled"
        with pytest.raises(openai.ConflictError) as info:
            future.result(timeout=60)
    finally:
        pool.shutdown()
    error = error_of(info.value)
    assert (error["code"], error["prediction_id"]) == ("canceled", pid)
    assert error["message"] == f"prediction {pid} was canceled before it completed"
    assert set(standin.prediction_ids()) - before == {pid}
