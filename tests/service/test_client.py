"""The Python client (`hidream.client`) and `hidream submit`: against real `hidream serve` processes, plus
pure tests of the webhook helpers, the event-stream parser and the retry policy (httpx.MockTransport).

The servers run the session's demo checkpoint on the CPU, bind 127.0.0.1 on free ports and are stopped by
fixture finalizers. Requests are small (256x256, 2 steps) except where a test needs a task that runs for a
few seconds (progress, cancel).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from hidream.client import (
    ApiConnectionError, AuthenticationError, BadRequest, Client, Conflict, InputError, NotFound, Prediction,
    PredictionFailed, ProgressEvent, RateLimited, ServerEvent, Unavailable, WaitTimeout, WebhookVerificationError,
    error_from_response, iter_sse, sign_webhook, verify_webhook, webhook_body, webhook_headers,
)

try:  # tests/service as a package or as a plain directory on sys.path
    from . import server_util as su
except ImportError:
    import server_util as su

pytestmark = pytest.mark.timeout(240)

SMALL: dict[str, Any] = {"image_size": "256x256", "num_inference_steps": 2}
SLOW: dict[str, Any] = {"image_size": "768x768", "num_inference_steps": 40}  # a few seconds here
LONG: dict[str, Any] = {"image_size": "768x768", "num_inference_steps": 100}  # about 8 s here
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def picture(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def check_images(paths: list[Path], fmt: str, size: tuple[int, int] = (256, 256)) -> None:
    for path in paths:
        with Image.open(path) as img:
            assert (img.format, img.size) == (PIL_FORMAT[fmt], size), path


# --- servers ------------------------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST (headers, raw body) and answers 200."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.cond:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.cond.notify_all()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, webhook_id: str, timeout: float = 30) -> tuple[dict[str, str], bytes]:
        """The first delivery whose HiDream-Webhook-Id is `webhook_id` (header names in lower case)."""
        def found() -> tuple[dict[str, str], bytes] | None:
            return next(((h, b) for h, b in self.received if h.get("hidream-webhook-id") == webhook_id), None)

        with self.cond:
            assert self.cond.wait_for(lambda: found() is not None, timeout), f"no webhook for {webhook_id}"
            delivery = found()
        assert delivery is not None
        return delivery

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Served:
    url: str
    key: str
    env: dict[str, str]

    def client(self, **kwargs: Any) -> Client:
        return Client(self.url, self.key, **kwargs)

    def cli_env(self) -> dict[str, str]:
        return self.env | {"HIDREAM_BASE_URL": self.url, "HIDREAM_API_KEY": self.key}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Served]:
    """One `hidream serve` (API + worker) that may call webhooks on loopback."""
    home = tmp_path_factory.mktemp("client-home")
    procs = su.Processes(home.parent / (home.name + "-logs"))
    try:
        env = su.service_env(home, demo_checkpoint, fetch_allow="127.0.0.0/8")
        proc = procs.serve(env)
        key = proc.first_key()
        assert key, proc.output()
        yield Served(proc.base_url, key, env)
    finally:
        procs.stop_all()


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    with served.client() as c:
        yield c


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


procs = su.procs


def wait_running(client: Client, prediction: Prediction) -> None:
    """Until the prediction runs (a step done, when the progress shows)."""
    seen: list[ProgressEvent] = []

    class Running(Exception):
        pass

    def stop_when_running(event: ProgressEvent) -> None:
        seen.append(event)
        if event.status == "processing" and event.step:
            raise Running

    with pytest.raises(Running):
        client.wait(prediction, progress=stop_when_running, timeout=60)


# --- against the server -------------------------------------------------------------------------------------


def test_generate_wait_on_the_stream_and_download(client: Client, tmp_path: Path) -> None:
    before = client.usage()["images"]
    submitted = client.generate("a lighthouse", seed=5, output_format="webp", num_images=2, **SMALL)
    assert submitted.status in ("created", "processing") and submitted.input["seed"] == 5
    assert submitted.created_at is not None and submitted.raw["id"] == submitted.id

    events: list[ProgressEvent] = []
    done = client.wait(submitted, progress=events.append)
    assert done.succeeded and done.id == submitted.id and len(done.outputs) == 2
    assert {e.source for e in events} == {"stream"}
    assert events[-1].status == "completed" and events[-1].prediction == done
    assert events[-1].step == events[-1].total == 4  # 2 steps x 2 images
    again = client.get(done.id)
    assert (again.id, again.status, again.input, len(again.outputs)) == (done.id, "completed", done.input, 2)

    paths = client.download(done, tmp_path / "out")
    assert paths == [tmp_path / "out" / f"{done.id}_{i}.webp" for i in range(2)]
    check_images(paths, "webp")
    assert client.download(done.id, [tmp_path / "a.webp", tmp_path / "b.webp"])[1].exists()
    assert client.usage()["images"] == before + 2
    assert done.id in {p.id for p in client.list(limit=5).items}
    assert any(p.id == done.id for p in client.iter_predictions(page_size=1))
    assert client.models()[0]["id"] == "hidream-o1-image"


def test_edit_with_a_local_file_then_poll(client: Client, tmp_path: Path) -> None:
    ref = tmp_path / "photo.png"
    picture(96, 64).save(ref)
    events: list[ProgressEvent] = []
    sub = client.edit("make the sky stormy", ref, keep_original_aspect=False, seed=1, output_format="jpeg",
                      **SMALL)
    assert sub.input["mode"] == "edit"
    assert sub.input["reference_image_urls"][0].startswith(client.base_url + "/files/uploads/")
    done = client.wait(sub, stream=False, progress=events.append, poll_interval=0.05)
    assert done.succeeded
    assert events and {e.source for e in events} == {"poll"}
    steps = [e.step for e in events if e.step is not None]
    assert steps == sorted(steps) and events[-1].step == 2
    check_images(client.download(done, tmp_path / "edit.jpg"), "jpeg")
    assert (tmp_path / "edit.jpg").exists()


def test_personalize_with_bytes_and_a_pil_image_base64_output(client: Client, tmp_path: Path) -> None:
    done = client.personalize("the two of them having tea", [encoded(picture(seed=1), "JPEG"), picture(seed=2)],
                              base64_output=True, wait=True, progress=False, **SMALL)
    assert done.succeeded and done.input["mode"] == "personalization"
    assert done.outputs[0].startswith("data:image/png;base64,")
    check_images(client.download(done, tmp_path), "png")
    with pytest.raises(InputError):
        client.personalize("only one", [picture()])


def test_progress_steps_increase_with_previews(client: Client) -> None:
    events: list[ProgressEvent] = []
    done = client.generate("a slow one", wait=True, progress=events.append, image_size="768x768",
                           num_inference_steps=20)
    assert done.succeeded
    progress = [e for e in events if e.step is not None]
    steps = [e.step or 0 for e in progress]
    assert steps == sorted(steps), steps
    assert {e.total for e in progress} == {20} and steps[-1] == 20
    assert any(e.status == "processing" and 0 < (e.step or 0) <= 20 for e in events), events
    previews = [e.preview for e in events if e.preview]
    assert all(p.startswith("data:image/jpeg;base64,") for p in previews)


def test_cancel_a_running_prediction(client: Client) -> None:
    before = client.usage()["images"]
    sub = client.generate("a slow one", **SLOW)
    wait_running(client, sub)
    canceled = client.cancel(sub)
    final = client.wait(canceled, progress=False, timeout=60)
    assert final.status == "failed" and final.canceled and final.error == "canceled"
    with pytest.raises(PredictionFailed) as failed:
        final.raise_for_status()
    assert failed.value.canceled
    with pytest.raises(PredictionFailed):
        client.download(final)
    assert client.cancel(final.id) == final  # already ended: unchanged
    assert client.usage()["images"] == before


def test_wait_timeout_keeps_the_prediction(client: Client) -> None:
    sub = client.generate("a slow one", **SLOW)
    with pytest.raises(WaitTimeout):
        client.wait(sub, timeout=0.05, progress=False)
    assert client.cancel(sub).id == sub.id  # leave the worker free for the next test
    assert client.wait(sub, progress=False).canceled


def test_errors_are_typed(served: Served, client: Client) -> None:
    with pytest.raises(BadRequest) as bad:
        client.generate("x", num_inference_steps=0)
    assert (bad.value.status, bad.value.field) == (400, "num_inference_steps")
    assert str(bad.value).startswith("num_inference_steps: must be an integer from 1 to 100")
    with pytest.raises(BadRequest) as bad_ref:
        client.edit("x", "http://127.0.0.1:1/nothing.png", **SMALL)
    assert bad_ref.value.field == "reference_image_urls[0]"
    with pytest.raises(NotFound):
        client.get("0" * 32)
    with pytest.raises(InputError):
        client.edit("x", Path("/nonexistent/photo.png"))
    with Client(served.url, "hd-wrong") as wrong, pytest.raises(AuthenticationError) as unauthorized:
        wrong.models()
    assert unauthorized.value.status == 401 and unauthorized.value.field is None
    with Client("http://127.0.0.1:1", "k", max_retries=1, backoff=0) as nowhere, \
            pytest.raises(ApiConnectionError):
        nowhere.models()


def test_idempotency_key_returns_the_same_prediction(client: Client) -> None:
    key = f"test-{time.time_ns()}"
    first = client.generate("idempotent", seed=3, idempotency_key=key, **SMALL)
    again = client.generate("idempotent", seed=3, idempotency_key=key, **SMALL)
    assert again.id == first.id
    with pytest.raises(Conflict) as conflict:
        client.generate("another body", seed=3, idempotency_key=key, **SMALL)
    assert (conflict.value.status, conflict.value.field) == (409, "Idempotency-Key")
    assert client.generate("idempotent", seed=3, **SMALL).id != first.id  # a fresh key each call
    client.wait(first, progress=False)


def test_webhook_delivery_verifies(client: Client, receiver: Receiver) -> None:
    secret = client.webhook_secret()
    assert secret.startswith("whsec_")
    done = client.generate("hooked", webhook_url=receiver.url, wait=True, progress=False, **SMALL)
    assert done.succeeded and done.webhook is not None and done.webhook["url"] == receiver.url
    headers, body = receiver.wait_for(done.id)
    assert headers["hidream-webhook-attempt"] == "1"
    prediction = verify_webhook(body, headers, secret)
    assert prediction["id"] == done.id and prediction["status"] == "completed"
    assert verify_webhook(body.decode(), headers, secret) == prediction  # its text does as well
    # the prediction object signs (and serializes) to what the server sent
    timestamp = int(headers["hidream-webhook-timestamp"])
    assert webhook_body(prediction) == body
    assert sign_webhook(prediction, secret, timestamp) == headers["hidream-webhook-signature"]
    assert webhook_headers(prediction, secret, done.id, timestamp=timestamp)["HiDream-Webhook-Signature"] \
        == headers["hidream-webhook-signature"]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body.replace(b"completed", b"failed"), headers, secret)


def test_rate_limited(procs: su.Processes, tmp_path: Path, demo_checkpoint: Path) -> None:
    api = procs.serve(su.service_env(tmp_path / "home", demo_checkpoint, rate_per_minute=1), worker=False)
    key = api.first_key()
    assert key
    with Client(api.base_url, key, max_retries=0) as c:
        c.generate("one", **SMALL)
        with pytest.raises(RateLimited) as limited:
            c.generate("two", **SMALL)
    assert limited.value.status == 429 and limited.value.message.startswith("rate limit:")
    assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 60


# --- hidream submit -----------------------------------------------------------------------------------------


def test_cli_submit_edit_to_a_file(served: Served, tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    picture().save(ref)
    out = tmp_path / "result.webp"
    r = su.run_cli(["submit", "make it blue", "--ref", str(ref), "--size", "256x256", "--steps", "2",
                    "--seed", "4", "-o", str(out)], served.cli_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(out)]
    assert "submitted prediction" in r.stderr and "completed" in r.stderr  # the progress bar
    check_images([out], "webp")


def test_cli_submit_flags_no_wait_and_errors(served: Served, tmp_path: Path) -> None:
    env = served.env  # no HIDREAM_BASE_URL / HIDREAM_API_KEY: the flags give them
    flags = ["--base-url", served.url, "--api-key", served.key]
    r = su.run_cli(["submit", "later", "--size", "256x256", "--steps", "2", "--no-wait", *flags], env)
    assert r.returncode == 0, r.stderr
    pred_id = r.stdout.strip()
    with served.client() as c:
        assert c.wait(pred_id, progress=False).succeeded

    r = su.run_cli(["submit", "x", "--steps", "0", "-q", *flags], env)
    assert (r.returncode, r.stdout) == (2, "")
    # the field named as the API does or as the flag (when the CLI checks the value before sending it)
    assert re.match(r"error: (num_inference_steps|--steps): must be an integer from 1 to 100", r.stderr), r.stderr
    r = su.run_cli(["submit", "x", "--base-url", served.url, "--api-key", "hd-wrong"], env)
    assert r.returncode == 2 and r.stderr.startswith("error: invalid or revoked API key"), r.stderr
    r = su.run_cli(["submit", "x", "--base-url", served.url], env)
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Children started inside this block turn Ctrl-C into KeyboardInterrupt, even if this process ignores
    SIGINT. A test run started in the background by a non-interactive shell (`scripts/test &`) ignores it;
    an ignored signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler, so
    `hidream submit` would never see the SIGINT (and finish with 0). A handler, unlike SIG_IGN, is reset
    to the default action by exec."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


RUNNING_BAR = re.compile(rb"processing: +\d+%\|[^|]*\| *[1-9]\d*/\d+")  # the bar at step 1 or later


def test_cli_ctrl_c_cancels(served: Served, client: Client) -> None:
    args = [sys.executable, "-m", "hidream.cli", "submit", "a slow one", "--size", LONG["image_size"],
            "--steps", str(LONG["num_inference_steps"])]
    with sigint_not_ignored():
        proc = subprocess.Popen(args, env=served.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    stderr = bytearray()
    try:
        assert proc.stderr is not None
        while not RUNNING_BAR.search(stderr):  # the bar shows the prediction running, a step done
            chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
            assert chunk, f"hidream submit ended early: {stderr.decode(errors='replace')}"
            stderr += chunk
        proc.send_signal(signal.SIGINT)  # with some 90 steps (7 s) to go
        rest_out, rest_err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (stderr + rest_err).decode(errors="replace")
    assert proc.returncode == 130, text
    pred_id = text.split("submitted prediction ")[1].split()[0]
    assert f"canceling prediction {pred_id}" in text and "Traceback" not in text
    assert "completed" not in text and rest_out == b""  # interrupted while running: nothing downloaded
    final = client.wait(pred_id, progress=False, timeout=60)
    assert final.canceled, final
    assert final.progress is None or final.progress.step < final.progress.total, final.progress


# --- webhook helpers (no server) ----------------------------------------------------------------------------

SECRET = "whsec_test"
BODY = json.dumps({"id": "abc", "status": "completed"}).encode()


def test_verify_webhook_valid_and_case_insensitive() -> None:
    headers = webhook_headers(BODY, SECRET, "abc", attempt=2, timestamp=1_700_000_000)
    assert headers["HiDream-Webhook-Signature"] == sign_webhook(BODY, SECRET, 1_700_000_000)
    assert headers["HiDream-Webhook-Attempt"] == "2"
    assert verify_webhook(BODY, headers, SECRET, now=1_700_000_100) == {"id": "abc", "status": "completed"}
    lower = {k.lower(): v for k, v in headers.items()}
    assert verify_webhook(BODY.decode(), lower, SECRET, now=1_700_000_000)["id"] == "abc"
    upper = {k.upper(): v for k, v in headers.items()}
    assert verify_webhook(BODY, httpx.Headers(upper), SECRET, now=1_700_000_000)["id"] == "abc"
    # a rotated secret: several signatures, one of them valid
    rotated = headers | {"HiDream-Webhook-Signature": f"v1={'0' * 64} {headers['HiDream-Webhook-Signature']}"}
    assert verify_webhook(BODY, rotated, SECRET, now=1_700_000_000)["id"] == "abc"


def test_sign_webhook_matches_the_definition_and_the_server() -> None:
    import hashlib
    import hmac

    from hidream.service.webhooks import sign

    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign_webhook(BODY, SECRET, 1_700_000_000) == f"v1={expected}" == sign(SECRET, 1_700_000_000, BODY)


def test_sign_webhook_takes_the_prediction_object() -> None:
    """A dict is signed as the server sends it: compact JSON, non-ASCII escaped (json.dumps' default)."""
    from hidream.service.webhooks import sign

    prediction = {"id": "abc", "status": "completed", "input": {"prompt": "café ☕", "seed": 7},
                  "outputs": ["http://x/y.png"], "timings": {"total_s": 1.5}}
    sent = (b'{"id":"abc","status":"completed","input":{"prompt":"caf\\u00e9 \\u2615","seed":7},'
            b'"outputs":["http://x/y.png"],"timings":{"total_s":1.5}}')
    assert webhook_body(prediction) == sent == json.dumps(prediction, separators=(",", ":")).encode()
    signature = sign(SECRET, 1_700_000_000, sent)
    assert sign_webhook(prediction, SECRET, 1_700_000_000) == signature
    assert sign_webhook(sent, SECRET, 1_700_000_000) == sign_webhook(sent.decode(), SECRET, 1_700_000_000) == signature
    headers = webhook_headers(prediction, SECRET, "abc", timestamp=1_700_000_000)
    assert headers["HiDream-Webhook-Signature"] == signature
    assert verify_webhook(sent, headers, SECRET, now=1_700_000_000) == prediction
    # the same object with json.dumps' default separators is other bytes: not what was signed
    with pytest.raises(WebhookVerificationError):
        verify_webhook(json.dumps(prediction).encode(), headers, SECRET, now=1_700_000_000)
    with pytest.raises(TypeError, match="body: bytes, str or a prediction mapping"):
        sign_webhook(12, SECRET, 1_700_000_000)  # type: ignore[arg-type]


def test_verify_webhook_wants_the_raw_body() -> None:
    prediction = {"id": "abc", "status": "completed"}
    headers = webhook_headers(prediction, SECRET, "abc", timestamp=1_700_000_000)
    with pytest.raises(TypeError, match=r"pass the raw request body \(bytes or str\) exactly as received, "
                                        r"not the parsed JSON"):
        verify_webhook(prediction, headers, SECRET, now=1_700_000_000)  # type: ignore[arg-type]
    assert verify_webhook(bytearray(webhook_body(prediction)), headers, SECRET, now=1_700_000_000) == prediction
    assert verify_webhook(memoryview(webhook_body(prediction)), headers, SECRET, now=1_700_000_000) == prediction


@pytest.mark.parametrize("case", ["tampered", "wrong secret", "stale", "future", "missing", "bad timestamp",
                                  "not json", "unsigned scheme"])
def test_verify_webhook_rejects(case: str) -> None:
    now = time.time()
    headers = webhook_headers(BODY, SECRET, "abc", timestamp=int(now))
    body, secret = BODY, SECRET
    if case == "tampered":
        body = BODY.replace(b"completed", b"failed")
    elif case == "wrong secret":
        secret = "whsec_other"
    elif case in ("stale", "future"):
        ts = int(now) + (-301 if case == "stale" else 301)
        headers = webhook_headers(BODY, SECRET, "abc", timestamp=ts)  # validly signed, out of tolerance
    elif case == "missing":
        del headers["HiDream-Webhook-Signature"]
    elif case == "bad timestamp":
        headers["HiDream-Webhook-Timestamp"] = "yesterday"
    elif case == "not json":
        body = b"not json"
        headers = webhook_headers(body, SECRET, "abc", timestamp=int(now))
    elif case == "unsigned scheme":
        headers["HiDream-Webhook-Signature"] = headers["HiDream-Webhook-Signature"].replace("v1=", "v0=")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, secret)
    if case == "stale":  # a wider tolerance (or none) accepts it
        assert verify_webhook(body, headers, secret, tolerance_s=None)["id"] == "abc"


# --- event stream, retries, errors (httpx.MockTransport) ----------------------------------------------------

PID = "f" * 32


def prediction_json(status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"id": PID, "model": "hidream-o1-image", "status": status, "outputs": [], "error": "",
            "input": {"num_inference_steps": 4, "num_images": 1}, "progress": None,
            "created_at": "2026-01-01T00:00:00Z", **extra}


def envelope(data: Any, status: int = 200, message: str = "success", **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"code": status, "message": message, "data": data}, headers=headers)


def sse(*events: tuple[str, Any]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> Client:
    return Client("http://api.test", "hd-test", transport=httpx.MockTransport(handler), backoff=0)


def test_iter_sse_parses_comments_crlf_and_multiline_data() -> None:
    lines = ["event: status", 'data: {"status": "processing"}', "", ": keep-alive", "",
             "event: note\r", "data: one\r", "data:two", "id: 7", "retry: 10", "\r", "data: 42", ""]
    assert list(iter_sse(lines)) == [ServerEvent("status", {"status": "processing"}),
                                     ServerEvent("note", "one\ntwo"), ServerEvent("message", 42)]


def test_wait_follows_the_stream_split_across_chunks() -> None:
    body = sse(("status", {"status": "created"}), ("status", {"status": "processing"}),
               ("progress", {"step": 1, "total": 4, "eta_s": 3.0}),
               ("preview", {"step": 1, "image": "data:image/jpeg;base64,AA=="}),
               ("progress", {"step": 3, "total": 4, "eta_s": 1.0}), ("status", {"status": "completed"}),
               ("done", prediction_json()))
    body = b": keep-alive\n\n" + body.replace(b"\n", b"\r\n")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        assert request.headers["Authorization"] == "Bearer hd-test"
        assert request.url.params["previews"] == "true"  # a callable gets the previews
        chunks = [body[i:i + 7] for i in range(0, len(body), 7)]
        return httpx.Response(200, content=iter(chunks), headers={"Content-Type": "text/event-stream"})

    events: list[ProgressEvent] = []
    with mock_client(handler) as c:
        done = c.wait(PID, progress=events.append)
    assert done.succeeded and seen == [f"/api/v1/model/prediction/{PID}/stream"]
    assert [(e.status, e.step, e.total) for e in events] == [
        ("created", None, None), ("processing", None, None), ("processing", 1, 4), ("processing", 1, 4),
        ("processing", 3, 4), ("completed", 3, 4), ("completed", 4, 4)]
    assert events[3].preview == "data:image/jpeg;base64,AA==" and events[2].eta_s == 3.0
    assert events[-1].prediction == done


@pytest.mark.parametrize("failure", ["404", "405", "drop", "ends early"])
def test_wait_falls_back_to_polling(failure: str) -> None:
    polls = iter([prediction_json("processing", progress={"step": 2, "total": 4}), prediction_json()])

    def broken_stream() -> Iterator[bytes]:
        yield sse(("status", {"status": "processing"}))
        raise httpx.RemoteProtocolError("peer closed connection")

    def handler(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/stream"):
            return envelope(next(polls))
        if failure in ("404", "405"):
            return envelope(None, int(failure), "Not Found" if failure == "404" else "Method Not Allowed")
        if failure == "drop":
            return httpx.Response(200, content=broken_stream())
        return httpx.Response(200, content=sse(("status", {"status": "processing"})))

    events: list[ProgressEvent] = []
    with mock_client(handler) as c:
        done = c.wait(PID, progress=events.append, poll_interval=0)
    assert done.succeeded
    assert [(e.status, e.step, e.source) for e in events if e.source == "poll"] == [
        ("processing", 2, "poll"), ("completed", 4, "poll")]


def test_wait_with_a_progress_bar_and_an_unknown_id(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/stream"):
            assert request.url.params["previews"] == "false"
            return httpx.Response(200, content=sse(("progress", {"step": 2, "total": 4}), ("done", prediction_json())))
        return envelope(None, 404, f"prediction {PID!r} not found")

    with mock_client(handler) as c:
        assert c.wait(PID).succeeded
        assert "4/4" in capsys.readouterr().err
        with pytest.raises(NotFound):
            c.wait("unknown", stream=False, progress=False)


class FakeClock:
    """A clock for tqdm (monkeypatched over `tqdm.std.time`): it moves only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    import tqdm.std

    fake = FakeClock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # a bar made from now on takes it as its `_time`
    return fake


def shown(out: io.StringIO) -> str:
    """The bar as last drawn (tqdm redraws its line after a carriage return), runs of spaces as one."""
    return " ".join(out.getvalue().split("\r")[-1].split())


def test_progress_bar_rate_counts_processing_time_only(clock: FakeClock) -> None:
    from hidream.client import _ProgressBar

    out = io.StringIO()
    bar = _ProgressBar(PID, file=out)
    try:
        bar(ProgressEvent(PID, "created"))
        assert shown(out) == f"{PID[:8]} queued"
        clock.advance(86.0)  # 86 s in the queue
        bar(ProgressEvent(PID, "processing"))
        for step in (1, 2):  # then 2 steps in 0.25 s
            clock.advance(0.125)
            bar(ProgressEvent(PID, "processing", step, 4))
        line = shown(out)
        assert line.startswith(f"{PID[:8]} processing: 50%") and "2/4" in line, line
        assert "[00:00<00:00, 8.00step/s]" in line, line  # 8 steps per second of processing, ETA 0.25 s

        # the task retried from the start after a 5 s pause: the clock starts again
        clock.advance(5.0)
        bar(ProgressEvent(PID, "processing", 0, 4))
        clock.advance(0.25)
        bar(ProgressEvent(PID, "processing", 1, 4, eta_s=0.75))
        line = shown(out)
        assert "1/4 [00:00<00:00, 4.00step/s, server eta 1s]" in line, line
        clock.advance(0.75)
        bar(ProgressEvent(PID, "completed", 4, 4))
        assert shown(out).startswith(f"{PID[:8]} completed: 100%"), shown(out)
    finally:
        bar.close()
    text = out.getvalue()
    assert "s/step" not in text and ": :" not in text, text


def test_progress_bar_leaves_steps_done_before_it_out_of_the_rate(clock: FakeClock) -> None:
    """A bar that first sees the prediction with steps done (polling, or a wait joining a running one)."""
    from hidream.client import _ProgressBar

    out = io.StringIO()
    bar = _ProgressBar(PID, file=out)
    try:
        assert shown(out) == f"{PID[:8]} waiting"
        clock.advance(30.0)
        bar(ProgressEvent(PID, "processing", 6, 10, source="poll"))
        assert "6/10 [00:00<?, ?step/s]" in shown(out), shown(out)  # no rate yet: 6 steps in no time is none
        clock.advance(0.5)
        bar(ProgressEvent(PID, "processing", 8, 10, source="poll"))
        assert "8/10 [00:00<00:00, 4.00step/s]" in shown(out), shown(out)
    finally:
        bar.close()
    assert ": :" not in out.getvalue()


def test_retries_honour_retry_after_and_keep_the_idempotency_key() -> None:
    answers = iter([envelope(None, 429, "rate limit: 10 submits per minute", **{"Retry-After": "0"}),
                    envelope(None, 503, "the database is unavailable; retry shortly", **{"Retry-After": "0"}),
                    "drop", envelope(prediction_json("created"))])
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        answer = next(answers)
        if answer == "drop":
            raise httpx.ConnectError("connection refused")
        assert isinstance(answer, httpx.Response)
        return answer

    with mock_client(handler) as c:
        assert c.generate("x").id == PID
    assert len(keys) == 4 and len(set(keys)) == 1


def test_retries_give_up() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if request.url.path == "/api/v1/usage":
            return envelope(None, 429, "rate limit: 2 tasks at once", **{"Retry-After": "3600"})
        return envelope(None, 503, "no model loaded: out of memory", **{"Retry-After": "0"})

    with mock_client(handler) as c:
        with pytest.raises(RateLimited) as limited:
            c.usage()  # a Retry-After over a minute is not slept through
        assert limited.value.retry_after == 3600 and len(calls) == 1
        with pytest.raises(Unavailable):
            c.models()
        assert len(calls) == 1 + 1 + c.max_retries


def test_error_fields_and_non_envelope_errors() -> None:
    def error(status: int, message: str) -> Any:
        return error_from_response(envelope(None, status, message))

    assert error(400, "reference_image_urls[1]: could not be fetched").field == "reference_image_urls[1]"
    assert error(400, "body: malformed JSON (x)").field == "body"
    assert error(429, "rate limit: 5 submits per minute").field is None
    assert error(401, "missing API key: send Authorization: Bearer <key>").field is None
    plain = error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert (type(plain).__name__, plain.status, plain.message) == ("ServerError", 502, "<html>bad gateway</html>")


def test_download_data_uris_and_paths(tmp_path: Path) -> None:
    png = encoded(picture(8, 8))
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    done = Prediction.from_dict(prediction_json(outputs=[uri, uri], input={"output_format": "png"}))
    with mock_client(lambda request: envelope(None, 500, "unused")) as c:
        assert c.download(done, tmp_path / "x.png") == [tmp_path / "x_0.png", tmp_path / "x_1.png"]
        assert (tmp_path / "x_1.png").read_bytes() == png
        assert c.download(done, tmp_path) == [tmp_path / f"{PID}_{i}.png" for i in range(2)]
        with pytest.raises(InputError):
            c.download(done, [tmp_path / "only-one.png"])
