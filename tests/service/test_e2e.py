"""End to end: real `hidream serve` / `hidream worker` / `hidream keys` processes, HTTP over loopback.

Each server runs on the session's demo checkpoint (random weights) on the CPU, binds 127.0.0.1 on a
free port and is always stopped by a fixture finalizer. Sizes are small except where a test needs a
task that runs for a few seconds (a crash or a shutdown in the middle of it).
"""

from __future__ import annotations

import base64
import io
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, select

from hidream.service.tables import tasks, usage

try:  # tests/service as a package or as a plain directory on sys.path
    from . import server_util as su
except ImportError:
    import server_util as su

MODEL = "hidream-o1-image"
PRICE = 0.044
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
GENERATE = "/api/v1/model/generateImage"
# Small and quick: 256x256 (the smallest custom size), two steps.
SMALL = {"model": MODEL, "prompt": "a lighthouse on a cliff at dusk", "image_size": "256x256",
         "num_inference_steps": 2}
# A task that runs for a few seconds on the demo model here (to crash or stop a server in the middle of it):
# about 0.05 s a step at 768x768 with one thread here (more under load).
SLOW = {"model": MODEL, "prompt": "a slow one", "image_size": "768x768", "num_inference_steps": 40}

pytestmark = pytest.mark.timeout(240)


# --- helpers ------------------------------------------------------------------------------------------------


def picture(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small, non-uniform picture encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def output_bytes(c: httpx.Client, pred: dict[str, Any], fmt: str) -> list[bytes]:
    """The bytes of each output: decoded from data URIs, else downloaded from the (signed) URLs."""
    out = []
    for url in pred["outputs"]:
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            assert head == f"data:{MIME[fmt]};base64", head
            out.append(base64.b64decode(payload, validate=True))
        else:
            assert url.startswith("http://127.0.0.1:"), url
            r = httpx.get(url, timeout=30)  # no key: the signed URL alone gives the file
            assert r.status_code == 200, (url, r.status_code, r.text[:300])
            assert r.headers["content-type"] == MIME[fmt], r.headers
            out.append(r.content)
    return out


def check_completed(c: httpx.Client, pred: dict[str, Any], req: dict[str, Any]) -> list[Image.Image]:
    """Everything a completed prediction promises; returns its images."""
    assert pred["status"] == "completed", pred
    assert pred["error"] == ""
    n = req.get("num_images", 1)
    fmt = req.get("output_format", "png")
    inp = pred["input"]
    assert (inp["width"], inp["height"]) == expected_size(req["image_size"])
    assert inp["seed"] == req["seed"]
    assert inp["num_images"] == n and inp["output_format"] == fmt
    assert len(pred["outputs"]) == n
    assert len(set(pred["outputs"])) == n
    assert pred["has_nsfw_contents"] == [False] * n
    assert pred["timings"]["inference"] > 0, pred["timings"]
    assert pred["progress"] is None  # only while processing
    created, started, completed = (su.parse_ts(pred[k]) for k in ("created_at", "started_at", "completed_at"))
    assert created <= started <= completed, (created, started, completed)
    images = []
    for data in output_bytes(c, pred, fmt):
        img = decode(data)
        assert img.format == PIL_FORMAT[fmt]
        assert img.size == (inp["width"], inp["height"])
        images.append(img)
    return images


def expected_size(image_size: str) -> tuple[int, int]:
    """(width, height) of the requests these tests send: a custom "WxH" (multiples of 32) or `square`."""
    if image_size == "square":
        return 1024, 1024
    w, _, h = image_size.partition("x")
    return int(w), int(h)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def check_submitted(pred: dict[str, Any], base_url: str, req: dict[str, Any], mode: str) -> None:
    """The prediction the submit call returns: queued, its input resolved and echoed."""
    assert len(pred["id"]) >= 32 and all(ch in "0123456789abcdef" for ch in pred["id"]), pred["id"]
    assert pred["model"] == MODEL
    assert pred["status"] in ("created", "processing", "completed"), pred
    assert pred["urls"]["get"] == f"{base_url}/api/v1/model/prediction/{pred['id']}"
    assert su.parse_ts(pred["created_at"])
    inp = pred["input"]
    assert inp["mode"] == mode
    assert inp["seed"] == req["seed"]
    assert (inp["width"], inp["height"]) == expected_size(req["image_size"])
    assert len(inp["reference_image_urls"]) == len(req.get("reference_image_urls", []))
    if pred["status"] != "completed":
        assert pred["outputs"] == [] and pred["has_nsfw_contents"] == []


def db_engine(home: Path):
    return create_engine(f"sqlite:///{home / 'hidream.db'}")


def task_row(home: Path, task_id: str) -> dict[str, Any]:
    eng = db_engine(home)
    try:
        with eng.connect() as conn:
            return dict(conn.execute(select(tasks).where(tasks.c.id == task_id)).mappings().one())
    finally:
        eng.dispose()


def usage_rows(home: Path, task_id: str) -> list[dict[str, Any]]:
    eng = db_engine(home)
    try:
        with eng.connect() as conn:
            return [dict(r) for r in conn.execute(select(usage).where(usage.c.task_id == task_id)).mappings()]
    finally:
        eng.dispose()


def submit(c: httpx.Client, req: dict[str, Any]) -> dict[str, Any]:
    return su.ok(c.post(GENERATE, json=req))


def wait_processing(c: httpx.Client, url: str, timeout: float = 60) -> dict[str, Any]:
    """Poll until the task runs (and, if the progress extension shows it, until a step is done)."""
    pred = su.poll(c, url, until=("processing",), timeout=timeout, interval=0.02)
    deadline = time.monotonic() + 2
    while pred["status"] == "processing" and not (pred["progress"] or {}).get("step") \
            and time.monotonic() < deadline:
        time.sleep(0.02)
        pred = su.ok(c.get(url))
    assert pred["status"] == "processing", f"the slow task was not slow enough here: {pred}"
    return pred


# --- fixtures -----------------------------------------------------------------------------------------------


@dataclass
class Running:
    proc: su.Proc
    key: str
    home: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.proc.base_url


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path):
    """One `hidream serve` (API + in-process worker) for the tests that need no restart."""
    home = tmp_path_factory.mktemp("e2e-home")
    procs = su.Processes(home.parent / (home.name + "-logs"))
    try:
        env = su.service_env(home, demo_checkpoint)
        proc = procs.serve(env)
        key = proc.first_key()
        assert key and key.startswith("hd-"), proc.output()
        yield Running(proc, key, home, env)
    finally:
        procs.stop_all()


procs = su.procs  # the fixture: processes stopped when the test ends


# --- 1. submit, poll, download ------------------------------------------------------------------------------


def test_generate_poll_download_each_mode(shared_server: Running) -> None:
    c = su.client(shared_server.url, shared_server.key)
    before = su.ok(c.get("/api/v1/usage"))
    models = su.ok(c.get("/api/v1/models"))
    assert [m["id"] for m in models] == [MODEL] and models[0]["price_per_image_usd"] == PRICE

    ref = picture(96, 64, "PNG", seed=1)
    r = c.post("/api/v1/model/uploadMedia", files={"file": ("ref.png", ref, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    upload_url = body["url"]
    assert body["data"]["url"] == upload_url
    assert upload_url.startswith(shared_server.url + "/files/uploads/")

    refs3 = [data_uri(picture(64, 64, "PNG", seed=2)), data_uri(picture(80, 48, "JPEG", seed=3), "image/jpeg"),
             data_uri(picture(48, 80, "WEBP", seed=4), "image/webp")]
    jobs = {  # name: (request, mode)
        "t2i": (SMALL | {"seed": 1234, "num_images": 2, "output_format": "png"}, "text-to-image"),
        "t2i_next_seed": (SMALL | {"seed": 1235, "output_format": "png"}, "text-to-image"),
        "edit_data_uri": (SMALL | {"seed": 7, "output_format": "jpeg", "reference_image_urls": [data_uri(ref)]},
                          "edit"),
        "edit_upload": (SMALL | {"seed": 8, "output_format": "jpeg", "reference_image_urls": [upload_url]},
                        "edit"),
        "personalize": (SMALL | {"seed": 9, "output_format": "webp", "reference_image_urls": refs3},
                        "personalization"),
    }
    submitted = {}
    for name, (req, mode) in jobs.items():
        pred = submit(c, req)
        check_submitted(pred, shared_server.url, req, mode)
        submitted[name] = pred

    snapshots: list[dict] = []
    images = {}
    for name, pred in submitted.items():
        done = su.poll(c, pred["urls"]["get"], seen=snapshots)  # the absolute URL the API gave
        assert done["id"] == pred["id"] and done["created_at"] == pred["created_at"]
        images[name] = check_completed(c, done, jobs[name][0])

    # The `progress` extension may or may not be seen at these sizes; when it is, it is well formed.
    for snap in snapshots:
        if snap["status"] == "processing" and snap["progress"] is not None:
            assert 0 <= snap["progress"]["step"] <= snap["progress"]["total"], snap["progress"]
        elif snap["status"] != "processing":
            assert snap["progress"] is None, snap

    # num_images 2: seeds seed and seed + 1, two different images; the second is the seed + 1 image.
    first, second = (pixels(i) for i in images["t2i"])
    assert np.abs(first - second).mean() > 5, "the two images of one request are the same"
    alone = pixels(images["t2i_next_seed"][0])
    assert np.abs(second - alone).max() <= 2, "image 1 of seed s is not the image of seed s + 1"

    listed = su.ok(c.get("/api/v1/predictions", params={"limit": 100}))
    assert {p["id"] for p in submitted.values()} <= {p["id"] for p in listed["items"]}

    after = su.ok(c.get("/api/v1/usage"))
    charged = sum(req.get("num_images", 1) for req, _ in jobs.values())
    assert after["images"] - before["images"] == charged == 6
    assert after["amount_usd"] - before["amount_usd"] == pytest.approx(charged * PRICE)
    assert sum(d["images"] for d in after["days"]) == after["images"]
    for pred in submitted.values():
        n = pred["input"]["num_images"]
        rows = usage_rows(shared_server.home, pred["id"])
        assert sorted(r["image_index"] for r in rows) == list(range(n))
        assert all(r["amount_micro_usd"] == 44_000 for r in rows)


# --- 2. sync mode and base64 output -------------------------------------------------------------------------


def test_sync_mode_and_base64_output(shared_server: Running) -> None:
    c = su.client(shared_server.url, shared_server.key)
    before = su.ok(c.get("/api/v1/usage"))
    ref = data_uri(picture(64, 96, "PNG", seed=5))
    cases = [
        (SMALL | {"seed": 42, "num_images": 2, "enable_sync_mode": True, "enable_base64_output": True},
         "data:image/png;base64,"),
        (SMALL | {"seed": 43, "output_format": "webp", "enable_sync_mode": True, "enable_base64_output": True,
                  "reference_image_urls": [ref]}, "data:image/webp;base64,"),
        (SMALL | {"seed": 44, "output_format": "jpeg", "enable_sync_mode": True}, "http://127.0.0.1:"),
        # A preset: `square` is 1024x1024 (one step keeps it quick).
        (SMALL | {"seed": 46, "image_size": "square", "num_inference_steps": 1, "enable_sync_mode": True,
                  "enable_base64_output": True}, "data:image/png;base64,"),
    ]
    for req, prefix in cases:
        pred = su.ok(c.post(GENERATE, json=req, timeout=120))
        assert pred["status"] == "completed", pred  # the response itself is the final prediction
        assert all(o.startswith(prefix) for o in pred["outputs"]), pred["outputs"]
        check_completed(c, pred, req)
        again = su.ok(c.get(pred["urls"]["get"]))
        assert again["status"] == "completed"
        if req.get("enable_base64_output"):
            assert again["outputs"] == pred["outputs"]
    # Asynchronous with base64: the outputs are data URIs once completed (URLs are never shown).
    req = SMALL | {"seed": 45, "enable_base64_output": True}
    pred = submit(c, req)
    done = su.poll(c, pred["urls"]["get"])
    assert all(o.startswith("data:image/png;base64,") for o in done["outputs"])
    check_completed(c, done, req)

    after = su.ok(c.get("/api/v1/usage"))
    assert after["images"] - before["images"] == 6
    assert after["amount_usd"] - before["amount_usd"] == pytest.approx(6 * PRICE)


# --- 3. a crash in the middle of a task ---------------------------------------------------------------------


def test_kill_9_mid_task_then_restart_completes_once(procs: su.Processes, tmp_path: Path,
                                                     demo_checkpoint: Path) -> None:
    home = tmp_path / "home"
    env = su.service_env(home, demo_checkpoint, lease_s=2)
    first = procs.serve(env)
    key = first.first_key()
    assert key, first.output()
    c = su.client(first.base_url, key)
    # Two images of 50 steps at 512x512: the kill comes right after the first step is reported.
    req = SLOW | {"seed": 11, "num_images": 2, "image_size": "512x512", "num_inference_steps": 50}
    task = submit(c, req)
    wait_processing(c, task["urls"]["get"])
    first.signal(signal.SIGKILL)
    assert first.wait_exit(10) == -signal.SIGKILL
    row = task_row(home, task["id"])
    assert row["status"] == "processing" and row["attempts"] == 1, row

    second = procs.serve(env)  # same home and database, a new port
    assert second.first_key() is None and "created the first API key" not in second.output()
    c2 = su.client(second.base_url, key)  # the key printed by the first start still works
    done = su.poll(c2, f"{second.base_url}/api/v1/model/prediction/{task['id']}", timeout=150)
    assert done["status"] == "completed", done
    check_completed(c2, done, req)
    time.sleep(0.5)  # nothing happens to it afterwards
    assert su.ok(c2.get(f"/api/v1/model/prediction/{task['id']}"))["completed_at"] == done["completed_at"]

    u = su.ok(c2.get("/api/v1/usage"))
    assert u["images"] == 2 and u["amount_usd"] == pytest.approx(2 * PRICE)
    rows = usage_rows(home, task["id"])
    assert sorted(r["image_index"] for r in rows) == [0, 1], rows
    row = task_row(home, task["id"])
    assert row["attempts"] == 2 and row["status"] == "completed", row
    assert row["lease_owner"] is None


# --- 4. a restart loses nothing -----------------------------------------------------------------------------


def test_tasks_queued_without_worker_survive_restart(procs: su.Processes, tmp_path: Path,
                                                     demo_checkpoint: Path) -> None:
    home = tmp_path / "home"
    env = su.service_env(home, demo_checkpoint)
    api = procs.serve(env, worker=False)  # `serve --no-worker`: API only
    key = api.first_key()
    assert key, api.output()
    c = su.client(api.base_url, key)
    reqs = [SMALL | {"seed": 100 + i, "output_format": fmt} for i, fmt in enumerate(("png", "jpeg", "webp"))]
    ids = [submit(c, r)["id"] for r in reqs]
    time.sleep(0.3)
    assert [su.ok(c.get(f"/api/v1/model/prediction/{i}"))["status"] for i in ids] == ["created"] * 3
    api.signal(signal.SIGTERM)
    api.wait_exit(35)

    server = procs.serve(env, port=api.port)  # same port, now with a worker
    assert server.first_key() is None
    c = su.client(server.base_url, key)
    for task_id, req in zip(ids, reqs, strict=True):
        done = su.poll(c, f"/api/v1/model/prediction/{task_id}")
        check_completed(c, done, req)
    assert su.ok(c.get("/api/v1/usage"))["images"] == 3


# --- 5. graceful shutdown -----------------------------------------------------------------------------------


def test_sigterm_mid_task_requeues_it(procs: su.Processes, tmp_path: Path, demo_checkpoint: Path) -> None:
    home = tmp_path / "home"
    env = su.service_env(home, demo_checkpoint)
    server = procs.serve(env)
    key = server.first_key()
    c = su.client(server.base_url, key)
    req = SLOW | {"seed": 21}
    task = submit(c, req)
    wait_processing(c, task["urls"]["get"])
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    server.wait_exit(35)  # raises TimeoutExpired if it hangs
    assert time.monotonic() - started < 35
    assert "back in the queue" in server.output()
    row = task_row(home, task["id"])
    assert row["status"] == "created" and row["attempts"] == 0, row
    assert row["lease_owner"] is None and row["outputs"] == []
    assert usage_rows(home, task["id"]) == []

    again = procs.serve(env)
    c = su.client(again.base_url, key)
    done = su.poll(c, f"/api/v1/model/prediction/{task['id']}", timeout=150)
    check_completed(c, done, req)
    assert task_row(home, task["id"])["attempts"] == 1
    assert len(usage_rows(home, task["id"])) == 1
    assert su.ok(c.get("/api/v1/usage"))["images"] == 1


# --- 6. a separate worker process ---------------------------------------------------------------------------


def test_separate_worker_process(procs: su.Processes, tmp_path: Path, demo_checkpoint: Path) -> None:
    home = tmp_path / "home"
    env = su.service_env(home, demo_checkpoint)
    api = procs.serve(env, worker=False)
    key = api.first_key()
    c = su.client(api.base_url, key)
    assert su.ok(httpx.get(api.base_url + "/healthz"))["worker"] is None
    worker = procs.worker(env)  # same HIDREAM_HOME: same database and storage
    req = SMALL | {"seed": 31, "num_images": 2, "output_format": "webp",
                   "reference_image_urls": [data_uri(picture(64, 64, "PNG", seed=6))]}
    task = submit(c, req)
    done = su.poll(c, task["urls"]["get"])
    check_completed(c, done, req)  # the API serves the files the worker wrote
    assert su.ok(c.get("/api/v1/usage"))["images"] == 2
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(35) == 0, worker.output()[-2000:]
    assert api.alive()


# --- 7. hidream keys ----------------------------------------------------------------------------------------


def test_keys_create_list_revoke(shared_server: Running) -> None:
    env = shared_server.env
    created = su.run_cli(["keys", "create", "--name", "e2e-key"], env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.split()[0]
    assert token.startswith("hd-") and len(token) >= 40, created.stdout
    c = su.client(shared_server.url, token)
    assert c.get("/api/v1/models").status_code == 200

    listed = su.run_cli(["keys", "list"], env)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if "e2e-key" in ln)
    assert token[:10] in line and "active" in line
    assert token not in listed.stdout and shared_server.key not in listed.stdout
    assert shared_server.key[:10] in listed.stdout  # the first key is listed too

    revoked = su.run_cli(["keys", "revoke", token[:10]], env)
    assert revoked.returncode == 0, revoked.stderr
    r = c.get("/api/v1/models")
    assert r.status_code == 401 and r.json()["code"] == 401 and r.json()["data"] is None
    assert su.client(shared_server.url, shared_server.key).get("/api/v1/models").status_code == 200

    listed = su.run_cli(["keys", "list"], env)
    line = next(ln for ln in listed.stdout.splitlines() if "e2e-key" in ln)
    assert "revoked" in line
    again = su.run_cli(["keys", "revoke", token[:10]], env)
    assert again.returncode == 2 and "no active key" in again.stderr


# --- 8. a model that fails to load --------------------------------------------------------------------------


def test_model_that_fails_to_load_is_not_served_silently(procs: su.Processes, tmp_path: Path) -> None:
    """Either `serve` exits non-zero, or it answers 503 to a submit and keeps nothing of it."""
    home = tmp_path / "home"
    server = procs.serve(su.service_env(home, tmp_path / "no-such-checkpoint"), wait=False)
    deadline = time.monotonic() + 60
    state = None
    while server.alive() and state != "stopped" and time.monotonic() < deadline:
        try:
            health = httpx.get(server.base_url + "/healthz", timeout=2)
            # a worker without a model makes the service unhealthy (503, naming why)
            state = "stopped" if health.status_code == 503 and "no model loaded" in health.json()["message"] \
                else health.json()["data"]["worker"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            state = None
        time.sleep(0.1)
    if not server.alive():
        assert server.popen.returncode != 0, server.output()
        assert "no such checkpoint" in server.output()
        return
    assert state == "stopped", server.output()[-2000:]
    c = su.client(server.base_url, server.first_key())
    r = c.post(GENERATE, json=SMALL | {"seed": 1})
    assert r.status_code == 503 and r.json()["data"] is None, r.text[:500]
    eng = db_engine(home)
    try:
        with eng.connect() as conn:
            assert conn.execute(select(tasks.c.id)).all() == []
    finally:
        eng.dispose()
