"""fal's queue and run protocols, driven by the official `fal-client` SDK, unmodified, against a real https server
(a certificate the test makes, trusted through SSL_CERT_FILE). The SDK reads its hosts from the environment
when it is imported, so it runs in a process of its own, which reports what it saw as JSON."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from test_tls import self_signed
from test_wavespeed import png, serving

try:
    from . import server_util as su
except ImportError:
    import server_util as su

T2I, EDIT = "fal-ai/hidream-o1-image", "fal-ai/hidream-o1-image/edit"
QUICK = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 9}

DRIVER = r'''
import json, sys, time
import fal_client

T2I, EDIT, QUICK, ref, hook = json.loads(sys.argv[1])
out = {}

def failure(call):
    try:
        call()
    except fal_client.client.FalClientHTTPError as err:
        return {"status": err.status_code, "message": str(err)}
    return None

out["subscribe"] = fal_client.subscribe(T2I, arguments={"prompt": "a red circle", **QUICK})
out["run_sync_mode"] = fal_client.run(T2I, arguments={"prompt": "a blue square", "sync_mode": True,
                                                      "output_format": "jpeg", **QUICK})
out["edit"] = fal_client.subscribe(EDIT, arguments={"prompt": "make it green", "image_url": fal_client.encode_file(ref),
                                                    **QUICK})
handle = fal_client.submit(T2I, arguments={"prompt": "a long one", "image_size": {"width": 256, "height": 256},
                                           "num_inference_steps": 100})
handle.cancel()
for _ in range(100):
    status = handle.status()
    if type(status).__name__ == "Completed":
        break
    time.sleep(0.1)
out["canceled"] = {"request_id": handle.request_id, "status": type(status).__name__, "error": status.error,
                   "result": failure(handle.get)}
out["hooked"] = fal_client.submit(T2I, arguments={"prompt": "a green triangle", **QUICK}, webhook_url=hook).request_id
out["errors"] = {
    "size": failure(lambda: fal_client.run(T2I, arguments={"prompt": "x", "image_size": "banana"})),
    "unknown": failure(lambda: fal_client.run(T2I, arguments={"prompt": "x", "width": 64})),
    "edit_without_images": failure(lambda: fal_client.run(EDIT, arguments={"prompt": "x"})),
    "app": failure(lambda: fal_client.run("fal-ai/flux/dev", arguments={"prompt": "x"})),
}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def fal(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """A https server with a worker, and what the SDK saw of it (plus the server, the hooks and the key)."""
    home = tmp_path_factory.mktemp("fal-files")
    cert, key = self_signed(home)
    with serving(tmp_path_factory, demo_checkpoint, "fal", tls_cert=cert, tls_key=key) as (proc, token, hooks):
        ref = home / "ref.png"
        ref.write_bytes(png())
        env = su.service_env(home, None) | {
            "FAL_KEY": token, "SSL_CERT_FILE": str(cert),
            "FAL_RUN_HOST": f"127.0.0.1:{proc.port}/fal/run", "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{proc.port}/fal/queue"}
        args = json.dumps([T2I, EDIT, QUICK, str(ref), hooks.http.url("/fal")])
        done = subprocess.run([sys.executable, "-c", DRIVER, args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (done.stdout, done.stderr[-4000:], proc.output()[-3000:])
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        yield {"seen": seen, "proc": proc, "token": token, "cert": cert, "hooks": hooks}


def native(fal: dict[str, Any], prediction_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=fal["proc"].base_url, verify=fal["proc"].verify, timeout=30,
                      headers={"Authorization": f"Bearer {fal['token']}"}) as c:
        return su.ok(c.get(f"/api/v1/model/prediction/{prediction_id}"))


def picture(fal: dict[str, Any], url: str) -> Image.Image:
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return Image.open(io.BytesIO(httpx.get(url, verify=fal["proc"].verify, timeout=30).content))


def test_subscribe_run_and_sync_mode(fal: dict[str, Any]) -> None:
    seen = fal["seen"]
    (image,) = seen["subscribe"]["images"]
    assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png")
    assert image["url"].startswith("https://127.0.0.1:") and picture(fal, image["url"]).size == (64, 64)
    assert seen["subscribe"]["seed"] == 9 and seen["subscribe"]["has_nsfw_concepts"] == [False]
    (inline,) = seen["run_sync_mode"]["images"]
    assert inline["url"].startswith("data:image/jpeg;base64,") and picture(fal, inline["url"]).format == "JPEG"


def test_an_edit_with_an_encoded_file_and_the_native_view(fal: dict[str, Any]) -> None:
    (image,) = fal["seen"]["edit"]["images"]
    assert picture(fal, image["url"]).size == (64, 64)
    with httpx.Client(base_url=fal["proc"].base_url, verify=fal["proc"].verify, timeout=30,
                      headers={"Authorization": f"Bearer {fal['token']}"}) as c:
        items = su.ok(c.get("/api/v1/predictions", params={"limit": 100}))["items"]
    edits = [p for p in items if p["input"]["mode"] == "edit"]
    assert edits and edits[0]["input"]["surface"] == "fal" and edits[0]["input"]["fal_app"] == "fal-ai/hidream-o1-image"


def test_cancel(fal: dict[str, Any]) -> None:
    canceled = fal["seen"]["canceled"]
    assert canceled["status"] == "Completed" and canceled["error"] == "canceled"
    assert canceled["result"]["status"] == 400 and "canceled" in canceled["result"]["message"]
    assert native(fal, canceled["request_id"])["error"] == "canceled"


def test_errors_name_the_field_in_fals_shape(fal: dict[str, Any]) -> None:
    errors = fal["seen"]["errors"]
    for name, field_ in (("size", "image_size"), ("unknown", "width"), ("edit_without_images", "image_urls")):
        assert errors[name]["status"] == 422, (name, errors[name])
        assert f"'loc': ['body', '{field_}']" in errors[name]["message"], (name, errors[name])
    assert errors["app"]["status"] == 404 and f"(served: {T2I}, {EDIT})" in errors["app"]["message"]


def test_the_webhook_gets_fals_message(fal: dict[str, Any]) -> None:
    hooks = fal["hooks"]
    assert hooks.arrived.wait(60)
    (sent,) = [h for h in hooks.got if h.get("request_id") == fal["seen"]["hooked"]]
    assert sent["status"] == "OK" and sent["payload"]["images"][0]["width"] == 64 and sent["error"] is None


def test_fals_key_scheme_and_a_wrong_key(fal: dict[str, Any]) -> None:
    url = f"{fal['proc'].base_url}/fal/queue/{T2I}"
    for header, status in ((f"Key {fal['token']}", 200), ("Key hd-wrong", 401), (None, 401)):
        headers = {"Authorization": header} if header else {}
        r = httpx.post(url, json={"prompt": "x", **QUICK}, headers=headers, verify=fal["proc"].verify, timeout=30)
        assert r.status_code == status, r.text
        if status == 200:
            assert set(r.json()) >= {"request_id", "status_url", "response_url", "cancel_url", "queue_position"}
        else:
            assert "API key" in r.json()["detail"]
