"""End to end over HTTP against a real `hidream serve` on the demo checkpoint: the progress stream (SSE) with
previews, cancel, Idempotency-Key, per-key rate limits (set with `hidream keys`), and signed webhooks with
retries against a receiver on loopback that answers, fails, hangs and redirects."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

try:  # tests/service as a package or as a plain directory on sys.path
    from . import server_util as su
except ImportError:
    import server_util as su

MODEL = "hidream-o1-image"
GENERATE = "/api/v1/model/generateImage"
SMALL = {"model": MODEL, "prompt": "a lighthouse", "image_size": "256x256", "num_inference_steps": 2}
# A few seconds on the demo model here: long enough to watch, stream and cancel.
SLOW = {"model": MODEL, "prompt": "a slow one", "image_size": "768x768", "num_inference_steps": 40}
PREVIEW_EVERY = 4
WEBHOOK_TIMEOUT_S = 1.0
GIVE_UP_S = 3.0

pytestmark = pytest.mark.timeout(240)


# --- a webhook receiver ----------------------------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Records every POST. /ok answers 204; /flaky 500 the first time, then 200; /slow never answers in time;
    /redirect sends a 302 to another loopback address; /fail always 500."""

    got: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.got.append(Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    seen = sum(1 for d in receiver.got if d.path == self.path)
                if self.path == "/slow":
                    receiver.release.wait(WEBHOOK_TIMEOUT_S * 3)
                status = {"/ok": 204, "/flaky": 500 if seen == 1 else 200, "/fail": 500,
                          "/redirect": 302}.get(self.path, 404)
                try:
                    self.send_response(status)
                    if status == 302:
                        self.send_header("Location", f"http://127.0.0.2:{receiver.port}/ok")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting
                    pass

        self.http = su.LoopbackHTTP(Handler)
        self.port = self.http.port

    def url(self, path: str) -> str:
        return self.http.url(path)

    def for_path(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.got if d.path == path]

    def close(self) -> None:
        self.release.set()
        self.http.close()


# --- the server ---------------------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: su.Proc
    key: str
    env: dict[str, str]
    receiver: Receiver

    def client(self, key: str | None = None) -> httpx.Client:
        return su.client(self.proc.base_url, key or self.key)

    def new_key(self, *flags: str) -> str:
        done = su.run_cli(["keys", "create", "--name", "another", *flags], self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("integrations")
    receiver = Receiver()
    receiver.start()
    procs = su.Processes(home / "logs")
    env = su.service_env(home / "home", demo_checkpoint, fetch_allow="127.0.0.1/32", preview_every=PREVIEW_EVERY,
                         webhook_retry_s=0.2, webhook_timeout_s=WEBHOOK_TIMEOUT_S, webhook_give_up_s=GIVE_UP_S)
    try:
        proc = procs.serve(env)
        yield Server(proc, proc.first_key(), env, receiver)
    finally:
        procs.stop_all()
        receiver.close()


def submit(c: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    return su.ok(c.post(GENERATE, json=body, headers=headers))


def wait_processing(c: httpx.Client, pred: dict[str, Any]) -> dict[str, Any]:
    return su.poll(c, pred["urls"]["get"], until=("processing",), interval=0.02)


def events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs of an SSE response; comment lines are skipped."""
    name, data = None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line == "":
            if name is not None:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))


# --- progress stream ----------------------------------------------------------------------------------------------


def test_the_stream_gives_status_progress_previews_and_ends_with_the_prediction(server: Server) -> None:
    with server.client() as c:
        pred = submit(c, SLOW | {"seed": 1})
        got = []
        with c.stream("GET", f"/api/v1/model/prediction/{pred['id']}/stream") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            got = list(events(r))
        final = su.ok(c.get(pred["urls"]["get"]))
    names = [n for n, _ in got]
    assert names[0] == "status" and names[-1] == "done", names
    statuses = [d["status"] for n, d in got if n == "status"]
    assert statuses[-1] == "completed" and "processing" in statuses
    steps = [d for n, d in got if n == "progress"]
    assert len(steps) >= 2, names
    assert all(d["total"] == 40 for d in steps)
    assert [d["step"] for d in steps] == sorted({d["step"] for d in steps})  # each step once, increasing
    assert all(d["eta_s"] is None or d["eta_s"] >= 0 for d in steps)
    assert any(d["eta_s"] is not None and d["eta_s"] > 0 for d in steps if d["step"] < 40)
    previews = [d for n, d in got if n == "preview"]
    assert previews, names
    for d in previews:
        assert d["step"] % PREVIEW_EVERY == 0 and d["step"] < 40
        head, _, payload = d["image"].partition(",")
        assert head == "data:image/jpeg;base64"
        img = Image.open(io.BytesIO(base64.b64decode(payload)))
        assert img.format == "JPEG" and max(img.size) == 256  # 768x768 shrunk to the preview size
    done = got[-1][1]
    assert done["status"] == "completed" and done["id"] == pred["id"]
    assert done["outputs"] and [u.split("?")[0] for u in done["outputs"]] == \
        [u.split("?")[0] for u in final["outputs"]]


def test_the_stream_can_leave_out_previews(server: Server) -> None:
    with server.client() as c:
        pred = submit(c, SLOW | {"num_inference_steps": 12})
        with c.stream("GET", f"/api/v1/model/prediction/{pred['id']}/stream", params={"previews": "false"}) as r:
            names = [n for n, _ in events(r)]
    assert "preview" not in names and names[-1] == "done"


def test_a_stream_client_that_leaves_does_not_stop_the_prediction(server: Server) -> None:
    with server.client() as c:
        pred = submit(c, SLOW | {"num_inference_steps": 20})
        with c.stream("GET", f"/api/v1/model/prediction/{pred['id']}/stream") as r:
            for name, data in events(r):
                if name == "progress":
                    break  # hang up mid-run
        final = su.poll(c, pred["urls"]["get"])
    assert final["status"] == "completed", final


def test_the_stream_of_another_keys_or_an_unknown_prediction_is_404(server: Server) -> None:
    other = server.new_key()
    with server.client() as c, server.client(other) as c2:
        pred = submit(c, SMALL)
        assert "not found" in su.error_of(c2.get(f"/api/v1/model/prediction/{pred['id']}/stream"), 404)
        assert "not found" in su.error_of(c.get(f"/api/v1/model/prediction/{'0' * 32}/stream"), 404)
        r = httpx.get(f"{server.proc.base_url}/api/v1/model/prediction/{pred['id']}/stream")
        assert "API key" in su.error_of(r, 401)
        su.poll(c, pred["urls"]["get"])


# --- cancel -------------------------------------------------------------------------------------------------------


def usage_images(c: httpx.Client) -> int:
    return su.ok(c.get("/api/v1/usage"))["images"]


def test_cancel_stops_a_running_prediction_and_nothing_is_charged(server: Server) -> None:
    key = server.new_key()
    with server.client(key) as c:
        pred = wait_processing(c, submit(c, SLOW | {"num_inference_steps": 100}))
        r = c.post(f"/api/v1/model/prediction/{pred['id']}/cancel")
        data = su.ok(r)
        assert (data["status"], data["error"]) == ("failed", "canceled"), data
        assert data["outputs"] == [] and data["progress"] is None
        assert su.ok(c.get(pred["urls"]["get"]))["error"] == "canceled"
        assert usage_images(c) == 0
        # The worker goes on serving.
        after = su.poll(c, submit(c, SMALL)["urls"]["get"])
        assert after["status"] == "completed"
        assert usage_images(c) == 1


def test_cancel_of_a_queued_prediction_means_it_never_runs(server: Server) -> None:
    with server.client() as c:
        busy = wait_processing(c, submit(c, SLOW | {"num_inference_steps": 100}))
        queued = submit(c, SMALL)
        data = su.ok(c.post(f"/api/v1/model/prediction/{queued['id']}/cancel"))
        assert (data["status"], data["error"], data["started_at"]) == ("failed", "canceled", None)
        su.ok(c.post(f"/api/v1/model/prediction/{busy['id']}/cancel"))
        time.sleep(0.5)  # give a (wrong) worker the chance to pick the canceled one up
        again = su.ok(c.get(queued["urls"]["get"]))
        assert (again["status"], again["started_at"]) == ("failed", None)


def test_cancel_of_a_finished_or_another_keys_prediction(server: Server) -> None:
    other = server.new_key()
    with server.client() as c, server.client(other) as c2:
        done = su.poll(c, submit(c, SMALL)["urls"]["get"])
        r = c.post(f"/api/v1/model/prediction/{done['id']}/cancel")
        assert r.status_code == 200
        assert r.json()["message"] == "prediction already completed; nothing to cancel"
        assert r.json()["data"]["status"] == "completed" and r.json()["data"]["outputs"] == done["outputs"]
        assert "not found" in su.error_of(c2.post(f"/api/v1/model/prediction/{done['id']}/cancel"), 404)
        assert "not found" in su.error_of(c.post(f"/api/v1/model/prediction/{'f' * 32}/cancel"), 404)


# --- idempotency --------------------------------------------------------------------------------------------------


def test_an_idempotency_key_returns_the_same_prediction_and_charges_once(server: Server) -> None:
    key = server.new_key()
    with server.client(key) as c:
        first = submit(c, SMALL, **{"Idempotency-Key": "order-42"})
        again = submit(c, SMALL, **{"Idempotency-Key": "order-42"})
        assert again["id"] == first["id"] and again["input"]["seed"] == first["input"]["seed"]
        su.poll(c, first["urls"]["get"])
        sync = submit(c, SMALL | {"enable_sync_mode": True}, **{"Idempotency-Key": "order-43"})
        assert sync["status"] == "completed"
        replay = submit(c, SMALL | {"enable_sync_mode": True}, **{"Idempotency-Key": "order-43"})
        assert replay["id"] == sync["id"] and replay["status"] == "completed"
        msg = su.error_of(c.post(GENERATE, json=SMALL | {"prompt": "another"}, headers={"Idempotency-Key": "order-42"}),
                       409)
        assert msg.startswith("Idempotency-Key: was used with a different request")
        msg = su.error_of(c.post(GENERATE, json=SMALL, headers={"Idempotency-Key": "x" * 256}), 400)
        assert msg.startswith("Idempotency-Key: must be 1 to 255")
        items = su.ok(c.get("/api/v1/predictions"))["items"]
        assert sorted(p["id"] for p in items) == sorted([first["id"], sync["id"]])
        assert usage_images(c) == 2


# --- rate limits --------------------------------------------------------------------------------------------------


def test_rate_limits_per_key_from_the_keys_command(server: Server) -> None:
    key = server.new_key("--rate", "2")
    prefix = key[:10]
    with server.client(key) as c:
        submit(c, SMALL)
        submit(c, SMALL)
        r = c.post(GENERATE, json=SMALL)
        assert su.error_of(r, 429).startswith("rate limit: 2 submits per minute")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        listed = su.run_cli(["keys", "list"], server.env).stdout
        assert "rate: 2 submits/min; concurrent: no limit (service default)" in listed
        done = su.run_cli(["keys", "limits", prefix, "--rate", "0", "--concurrent", "1"], server.env)
        assert done.returncode == 0 and "rate: no limit; concurrent: 1 tasks" in done.stdout, done
        for p in su.ok(c.get("/api/v1/predictions"))["items"]:
            su.poll(c, p["urls"]["get"])
        slow = submit(c, SLOW | {"num_inference_steps": 100})
        r = c.post(GENERATE, json=SMALL)
        assert "1 tasks queued or running" in su.error_of(r, 429) and int(r.headers["retry-after"]) >= 1
        su.ok(c.post(f"/api/v1/model/prediction/{slow['id']}/cancel"))
        su.poll(c, submit(c, SMALL)["urls"]["get"])
    bad = su.run_cli(["keys", "limits", "nope", "--rate", "1"], server.env)
    assert bad.returncode == 2 and "no key with id or prefix 'nope'" in bad.stderr


# --- webhooks -----------------------------------------------------------------------------------------------------


def wait_webhook(c: httpx.Client, pred: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        now = su.ok(c.get(pred["urls"]["get"]))
        if now["webhook"] and now["webhook"]["state"] in ("delivered", "failed"):
            return now
        assert time.monotonic() < deadline, now
        time.sleep(0.1)


def test_a_webhook_is_signed_and_carries_the_prediction(server: Server) -> None:
    with server.client() as c:
        secret = su.ok(c.get("/api/v1/webhook/secret"))["secret"]
        pred = submit(c, SMALL | {"webhook_url": server.receiver.url("/ok")})
        assert pred["webhook"] == {"url": server.receiver.url("/ok"), "state": "waiting", "attempts": []}
        assert "webhook_url" not in pred["input"]
        final = wait_webhook(c, pred)
    assert final["webhook"]["state"] == "delivered"
    [attempt] = final["webhook"]["attempts"]
    assert attempt["status_code"] == 204 and attempt["error"] == "" and attempt["duration_ms"] >= 0
    [got] = [d for d in server.receiver.for_path("/ok") if d.headers["hidream-webhook-id"] == pred["id"]]
    ts = got.headers["hidream-webhook-timestamp"]
    assert abs(int(ts) - time.time()) < 300
    expected = hmac.new(secret.encode(), ts.encode() + b"." + got.body, hashlib.sha256).hexdigest()
    assert got.headers["hidream-webhook-signature"] == f"v1={expected}"
    assert got.headers["hidream-webhook-attempt"] == "1"
    assert got.headers["content-type"] == "application/json"
    body = json.loads(got.body)
    assert body["id"] == pred["id"] and body["status"] == "completed" and len(body["outputs"]) == 1
    other = server.new_key()
    with server.client(other) as c2:  # each key signs with its own secret
        assert su.ok(c2.get("/api/v1/webhook/secret"))["secret"] != secret


def test_a_failing_receiver_gets_the_webhook_again_until_it_answers(server: Server) -> None:
    with server.client() as c:
        pred = submit(c, SMALL | {"webhook_url": server.receiver.url("/flaky")})
        final = wait_webhook(c, pred)
    assert final["webhook"]["state"] == "delivered"
    assert [(a["status_code"], a["error"]) for a in final["webhook"]["attempts"]] == [(500, "HTTP 500"), (200, "")]
    got = server.receiver.for_path("/flaky")
    assert [d.headers["hidream-webhook-attempt"] for d in got] == ["1", "2"]
    assert {d.headers["hidream-webhook-id"] for d in got} == {pred["id"]}  # the receiver's idempotency key


def test_a_failed_or_canceled_prediction_is_posted_too(server: Server) -> None:
    with server.client() as c:
        busy = wait_processing(c, submit(c, SLOW | {"num_inference_steps": 100}))
        queued = submit(c, SMALL | {"webhook_url": server.receiver.url("/ok")})
        su.ok(c.post(f"/api/v1/model/prediction/{queued['id']}/cancel"))
        su.ok(c.post(f"/api/v1/model/prediction/{busy['id']}/cancel"))
        wait_webhook(c, queued)
    [got] = [d for d in server.receiver.for_path("/ok") if d.headers["hidream-webhook-id"] == queued["id"]]
    body = json.loads(got.body)
    assert (body["status"], body["error"]) == ("failed", "canceled")


def test_receivers_that_hang_or_redirect_are_retried_then_given_up(server: Server) -> None:
    with server.client() as c:
        slow = submit(c, SMALL | {"webhook_url": server.receiver.url("/slow")})
        moved = submit(c, SMALL | {"webhook_url": server.receiver.url("/redirect")})
        failing = submit(c, SMALL | {"webhook_url": server.receiver.url("/fail")})
        results = {name: wait_webhook(c, p) for name, p in (("slow", slow), ("moved", moved), ("fail", failing))}
    for name, final in results.items():
        hook = final["webhook"]
        assert hook["state"] == "failed", (name, hook)
        assert len(hook["attempts"]) >= 2, (name, hook)  # retried before giving up
        assert [a["at"] for a in hook["attempts"]] == sorted(a["at"] for a in hook["attempts"])
    assert all("did not answer within 1 s" in a["error"] and a["status_code"] is None
               for a in results["slow"]["webhook"]["attempts"])
    assert all(a["status_code"] == 302 and "redirects are not followed" in a["error"]
               for a in results["moved"]["webhook"]["attempts"])
    assert all(a["status_code"] == 500 for a in results["fail"]["webhook"]["attempts"])
    # The redirect's target (another loopback address, not allowed) was never contacted.
    assert not [d for d in server.receiver.got if d.path == "/ok" and d.headers["hidream-webhook-id"] == moved["id"]]


@pytest.mark.parametrize(("url", "rule"), [
    ("http://10.1.2.3/hook", "resolves to 10.1.2.3, a private address, which is not allowed"),
    ("http://127.0.0.2:9/hook", "resolves to 127.0.0.2, a loopback address, which is not allowed"),
    ("ftp://example.com/hook", "is not an http or https URL"),
    ("not a url", "is not an http or https URL"),
])
def test_a_webhook_url_the_rules_forbid_is_a_400_that_leaves_nothing(server: Server, url: str, rule: str) -> None:
    key = server.new_key()
    with server.client(key) as c:
        msg = su.error_of(c.post(GENERATE, json=SMALL | {"webhook_url": url}), 400)
        assert msg.startswith("webhook_url: ") and rule in msg, msg
        assert su.ok(c.get("/api/v1/predictions"))["items"] == []


# --- across replicas ----------------------------------------------------------------------------------------------


def test_stream_cancel_and_idempotency_work_through_another_replica(server: Server, tmp_path: Path) -> None:
    """A second API process (no worker) on the same database: its stream sees the first one's worker's progress,
    its cancel stops that worker's task, and an Idempotency-Key used on one replica is known to the other."""
    procs = su.Processes(tmp_path / "logs")
    try:
        replica = procs.serve(server.env, worker=False)
        with server.client() as c, su.client(replica.base_url, server.key) as c2:
            pred = submit(c, SLOW | {"num_inference_steps": 100}, **{"Idempotency-Key": "replica-1"})
            again = submit(c2, SLOW | {"num_inference_steps": 100}, **{"Idempotency-Key": "replica-1"})
            assert again["id"] == pred["id"]
            seen = []
            with c2.stream("GET", f"/api/v1/model/prediction/{pred['id']}/stream", params={"previews": "false"}) as r:
                for name, data in events(r):
                    seen.append(name)
                    # once: progress sent before the worker stopped may still be on its way to this reader
                    if name == "progress" and data["step"] >= 2 and "cancel" not in seen:
                        seen.append("cancel")
                        canceled = su.ok(c2.post(f"/api/v1/model/prediction/{pred['id']}/cancel"))
                        assert (canceled["status"], canceled["error"]) == ("failed", "canceled"), canceled
            assert seen[-1] == "done" and "progress" in seen
            assert su.ok(c.get(pred["urls"]["get"]))["error"] == "canceled"
    finally:
        procs.stop_all()
