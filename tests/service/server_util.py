"""Helpers for the end-to-end tests: real `hidream` processes on loopback, an httpx client, polling.

Every process is started through a `Processes` set whose `stop_all()` a fixture finalizer calls, so a
failing test never leaves a server behind (terminate, wait, then kill).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

KEY_LINE = re.compile(r"created the first API key \(shown once, keep it\): (hd-\S+)")
TERMINAL = ("completed", "failed")


def free_port() -> int:
    """A loopback port nobody listens on now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(home: Path, model: Path | None, **settings: Any) -> dict[str, str]:
    """The environment of a `hidream` process: ours minus any HIDREAM_* variable, plus these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIDREAM_")}
    env.update({"HIDREAM_HOME": str(home), "HIDREAM_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    # One torch thread per process: the tests run several processes on a small machine, and intra-op
    # threads that spin-wait for cores held by another process slow a step down many times over.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if model is not None:
        env["HIDREAM_MODEL"] = str(model)
    for name, value in settings.items():
        env["HIDREAM_" + name.upper()] = str(value)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """`hidream ARGS` to completion, output captured."""
    return subprocess.run([sys.executable, "-m", "hidream.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class Proc:
    """One `hidream` process; stdout and stderr go to a log file (a pipe could fill and block it)."""

    popen: subprocess.Popen
    log: Path
    port: int | None
    env: dict[str, str]
    _key: str | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.env.get("HIDREAM_TLS_CERT") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an https client of this process trusts: its own certificate (self-signed in the tests)."""
        cert = self.env.get("HIDREAM_TLS_CERT")
        return ssl.create_default_context(cafile=cert) if cert else True

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def first_key(self) -> str | None:
        """The key printed on a first start (None when this start printed none)."""
        m = KEY_LINE.search(self.output())
        return m.group(1) if m else None

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if not self.alive():
                raise AssertionError(f"process exited ({self.popen.returncode}) before printing {text!r}:\n"
                                     f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def wait_ready(self, worker: bool = True, timeout: float = 90) -> None:
        """Until /healthz answers (and, with an in-process worker, the model is loaded)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            if not self.alive():
                raise AssertionError(f"server exited ({self.popen.returncode}) while starting:\n"
                                     f"{self.output()[-3000:]}")
            try:
                r = httpx.get(self.base_url + "/healthz", timeout=2, verify=self.verify)
                last = r.json()
                state = last["data"]["worker"]
                if r.status_code == 200 and (state in ("idle", "running") if worker else state is None):
                    return
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout} s (last /healthz: {last}):\n"
                                     f"{self.output()[-3000:]}")
            time.sleep(0.1)

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 40) -> None:
        """terminate, wait, kill: the process is gone when this returns."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)


class Processes:
    """Starts `hidream serve` / `hidream worker` processes and stops every one of them in `stop_all`."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def _start(self, args: list[str], env: dict[str, str], port: int | None, name: str) -> Proc:
        log = self.logs_dir / f"{len(self.procs):02d}-{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "hidream.cli", *args], env=env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = Proc(popen, log, port, env)
        self.procs.append(proc)
        return proc

    def serve(self, env: dict[str, str], port: int | None = None, worker: bool = True,
              wait: bool = True) -> Proc:
        """`hidream serve` on 127.0.0.1 and a free port (or `port`), ready when this returns."""
        port = port or free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)] + ([] if worker else ["--no-worker"])
        proc = self._start(args, env, port, "serve")
        if wait:
            proc.wait_ready(worker=worker)
        return proc

    def worker(self, env: dict[str, str], wait: bool = True) -> Proc:
        """`hidream worker`, ready (model loaded) when this returns."""
        proc = self._start(["worker"], env, None, "worker")
        if wait:
            proc.wait_for_output("ready for")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            try:
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGCONT)  # a test may have frozen it with SIGSTOP
                proc.stop()
            except Exception:  # keep going: every process must be stopped
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGKILL)


def client(base_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def ok(response: httpx.Response) -> Any:
    """`data` of a 200 envelope (with the body in the assertion message otherwise)."""
    assert response.status_code == 200, f"{response.status_code}: {response.text[:2000]}"
    body = response.json()
    assert body["code"] == 200 and body["message"] == "success", body
    return body["data"]


class LoopbackHTTP:
    """A threaded HTTP server with `handler` on 127.0.0.1 and a free port, serving until close()."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def error_of(response: httpx.Response, status: int) -> str:
    """The message of an error envelope with `status` (and `data` null)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert body["code"] == status and body["data"] is None, body
    return body["message"]


def poll(c: httpx.Client, url: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120,
         interval: float = 0.05, seen: list[dict] | None = None) -> dict[str, Any]:
    """GET a prediction until its status is one of `until`; every snapshot goes to `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        pred = ok(c.get(url))
        if seen is not None:
            seen.append(pred)
        if pred["status"] in until:
            return pred
        assert pred["status"] in ("created", "processing", "completed", "failed"), pred["status"]
        if pred["status"] in TERMINAL:
            raise AssertionError(f"prediction ended {pred['status']} (error {pred['error']!r}), wanted {until}")
        if time.monotonic() > deadline:
            raise AssertionError(f"prediction still {pred['status']} after {timeout} s: {pred}")
        time.sleep(interval)


def parse_ts(value: str) -> datetime:
    """An API timestamp: ISO 8601, UTC, with a Z."""
    assert isinstance(value, str) and value.endswith("Z"), value
    return datetime.fromisoformat(value)


@pytest.fixture
def procs(tmp_path):
    """Processes a test starts; all stopped when it ends, whatever happened."""
    p = Processes(tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop_all()


class ChatServer:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 (POST /v1/chat/completions) that plays a
    prompt refiner, recording each request's body and headers (their names in lower case).

    What it answers depends on the user message's text: `[500]` an HTTP 500, `[slow]` a delay of 3 s (or until
    `stop`), `[text]` prose that is no JSON, `[fenced]` the JSON in a ```json fence after some words, `[shape]`
    a body that is no chat completion, `[control]` a prompt with the model's control token, `[empty]` an empty
    prompt; anything else `{"prompt": "Refined: <the request>, in soft morning light"}`.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                with srv.lock:
                    srv.requests.append({"path": self.path, "body": body,
                                         "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": "no such route"}})
                user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
                request = user.partition("Request: ")[2]
                if "[500]" in user:
                    return self._json(500, {"error": {"message": "the model crashed"}})
                if "[slow]" in user:
                    srv.stop.wait(3.0)
                if "[shape]" in user:
                    return self._json(200, {"result": "a refined prompt"})
                content = {
                    "[text]": "Here is a nicer prompt: a fox at dawn.",
                    "[fenced]": 'Sure.\n```json\n{"prompt": "Refined: a fox, fenced"}\n```',
                    "[control]": json.dumps({"prompt": "a fox <|im_end|> at dawn"}),
                    "[empty]": json.dumps({"prompt": "   "}),
                }.get(next((k for k in ("[text]", "[fenced]", "[control]", "[empty]") if k in user), ""),
                      json.dumps({"prompt": f"Refined: {request}, in soft morning light"}))
                try:
                    self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                                     "model": body.get("model", "served"),
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                except OSError:  # the client gave up (timed out) meanwhile
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="chat-server", daemon=True)
        self.thread.start()

    def last(self) -> dict[str, Any]:
        with self.lock:
            return self.requests[-1]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
