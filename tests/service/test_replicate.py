"""Replicate's HTTP API, driven by the official `replicate` SDK, unmodified, against a real server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ReplicateError

from test_wavespeed import Hooks, png, serving

try:
    from . import server_util as su
except ImportError:
    import server_util as su

MODEL = "hidream-ai/hidream-o1-image"
QUICK = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}


class Server:
    def __init__(self, proc: su.Proc, key: str, hooks: Hooks) -> None:
        self.proc, self.key, self.hooks, self.url = proc, key, hooks, proc.base_url

    def sdk(self, key: str | None = None) -> replicate.Client:
        return replicate.Client(api_token=key or self.key, base_url=self.url)

    def native(self, prediction_id: str) -> dict[str, Any]:
        with su.client(self.url, self.key) as c:
            return su.ok(c.get(f"/api/v1/model/prediction/{prediction_id}"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Server]:
    with serving(tmp_path_factory, demo_checkpoint, "replicate") as (proc, key, hooks):
        yield Server(proc, key, hooks)


def size_of(url: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(httpx.get(str(url), timeout=30).content)).size


def test_run_waits_and_gives_the_image_urls(server: Server) -> None:
    output = server.sdk().run(MODEL, input={"prompt": "a red circle on a blue background", **QUICK})
    (url,) = output
    assert size_of(url) == (64, 64)


def test_create_then_wait_and_read_it_through_the_native_api(server: Server) -> None:
    client = server.sdk()
    client.poll_interval = 0.1
    prediction = client.models.predictions.create(model=MODEL, input={"prompt": "a yellow square", "num_outputs": 2,
                                                                      **QUICK})
    assert prediction.status in ("starting", "processing") and prediction.urls["get"].endswith(prediction.id)
    prediction.wait()
    assert prediction.status == "succeeded" and len(prediction.output) == 2 and prediction.error is None
    native = server.native(prediction.id)
    assert native["status"] == "completed" and native["input"]["num_images"] == 2
    assert native["input"]["surface"] == "replicate" and native["input"]["replicate_model"] == MODEL
    assert client.predictions.get(prediction.id).status == "succeeded"


def test_an_edit_with_a_file_the_sdk_uploads(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(png())
    client = server.sdk()
    with open(path, "rb") as f:  # the SDK uploads it to /v1/files and passes the file's URL
        output = client.run(MODEL, input={"prompt": "make the circle green", "image": f, **QUICK})
    assert size_of(output[0]) == (64, 64)
    with su.client(server.url, server.key) as c:
        (latest,) = su.ok(c.get("/api/v1/predictions", params={"limit": 1}))["items"]
    assert latest["input"]["mode"] == "edit"
    uploaded = client.files.create(path)
    assert uploaded.content_type == "image/png" and uploaded.size == len(png())
    assert httpx.get(uploaded.urls["get"]).content == png()


def test_cancel(server: Server) -> None:
    client = server.sdk()
    prediction = client.models.predictions.create(
        model=MODEL, input={"prompt": "a long one", "width": 256, "height": 256, "num_inference_steps": 100})
    canceled = client.predictions.cancel(prediction.id)
    assert canceled.status == "canceled" and canceled.output is None
    assert server.native(prediction.id)["error"] == "canceled"


@pytest.mark.parametrize(("model", "inputs", "status", "detail"), [
    (MODEL, {"prompt": "x", "width": 64}, 422, "input.width: width and height go together"),
    (MODEL, {"prompt": "x", "width": 8, "height": 8}, 422, "input.width: "),
    (MODEL, {"prompt": "x", "size": "64x64"}, 422, "input.size: unknown input"),
    (MODEL, {"prompt": ""}, 422, "input.prompt: "),
    (MODEL, {"prompt": "x", "images": ["ftp://example.com/a.png"]}, 422, "input.images[0]"),
    (MODEL, {"prompt": "x", "image": "https://a.test/a.png", "images": []}, 422, "input.image: give image or images"),
    ("hidream-ai/hidream-o1-image-dev", {"prompt": "x"}, 404, f"is not served here (served: {MODEL})"),
])
def test_errors_are_replicate_errors_with_our_message(server: Server, model: str, inputs: dict[str, Any],
                                                     status: int, detail: str) -> None:
    with pytest.raises(ReplicateError) as err:
        server.sdk().run(model, input=inputs)
    assert err.value.status == status and detail in (err.value.detail or ""), err.value


def test_a_bad_key_is_a_401(server: Server) -> None:
    with pytest.raises(ReplicateError) as err:
        server.sdk("hd-wrong").run(MODEL, input={"prompt": "x"})
    assert err.value.status == 401 and err.value.title == "Unauthenticated"


def test_a_webhook_gets_replicates_prediction_object(server: Server) -> None:
    client = server.sdk()
    with pytest.raises(ReplicateError) as err:
        client.models.predictions.create(model=MODEL, input={"prompt": "x", **QUICK},
                                         webhook=server.hooks.http.url("/r"), webhook_events_filter=["start"])
    assert err.value.status == 422 and "webhook_events_filter" in err.value.detail
    prediction = client.models.predictions.create(model=MODEL, input={"prompt": "a green triangle", **QUICK},
                                                  webhook=server.hooks.http.url("/r"),
                                                  webhook_events_filter=["completed"])
    assert server.hooks.arrived.wait(60)
    sent = next(h for h in server.hooks.got if h.get("id") == prediction.id)
    assert sent["status"] == "succeeded" and sent["model"] == MODEL and len(sent["output"]) == 1
    assert sent["urls"]["get"].endswith(f"/v1/predictions/{prediction.id}")
