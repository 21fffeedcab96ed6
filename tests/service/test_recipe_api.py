"""The sampling extensions of generateImage: scheduler, timesteps and the noise settings.

Bad values are a 400 naming the field that leaves nothing behind; good ones reach the engine through the
task's input and the worker's GenerationRequest.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from hidream.service import schemas
from hidream.service.worker import build_request

if TYPE_CHECKING:
    from conftest import Service

pytestmark = pytest.mark.usefixtures("loopback_only")

MODEL = "hidream-o1-image"
FOUR = [999, 857, 515, 110]


def data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 60)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rejected(svc: Service, field: str, **fields: Any) -> str:
    before = svc.leftovers()
    resp = svc.submit(**fields)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["code"] == 400 and body["data"] is None
    assert body["message"].startswith(f"{field}: "), body["message"]
    assert svc.leftovers() == before  # no task, no usage, no reference file
    return body["message"]


def accepted(svc: Service, **fields: Any) -> dict[str, Any]:
    resp = svc.submit(**fields)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


@pytest.mark.parametrize(("fields", "field", "fragment"), [
    ({"scheduler": "ddim"}, "scheduler", "unipc, flash or euler"),
    ({"scheduler": 3}, "scheduler", "unipc, flash or euler"),
    ({"timesteps": []}, "timesteps", "1 to 100"),
    ({"timesteps": "999,857"}, "timesteps", "strictly decreasing integers"),
    ({"timesteps": [999, 999]}, "timesteps", "strictly decreasing"),
    ({"timesteps": [1001]}, "timesteps[0]", "from 1 to 1000"),
    ({"timesteps": [999, 0]}, "timesteps[1]", "from 1 to 1000"),
    ({"timesteps": [999.0]}, "timesteps[0]", "integers"),
    ({"timesteps": list(range(1000, 899, -1))}, "timesteps", "1 to 100"),
    ({"timesteps": FOUR, "num_inference_steps": 28}, "num_inference_steps", "number of timesteps (4)"),
    ({"noise_scale": 0}, "noise_scale", "above 0"),
    ({"noise_scale": 101}, "noise_scale", "at most 100"),
    ({"noise_scale": "8"}, "noise_scale", "a number"),
    ({"noise_scale_end": -0.5, "scheduler": "flash"}, "noise_scale_end", "from 0 to 100"),
    ({"noise_clip_std": 10.5, "scheduler": "flash"}, "noise_clip_std", "from 0 to 10"),
    # the full model samples with unipc: flash's noise settings would do nothing
    ({"noise_clip_std": 2.5}, "noise_clip_std", "only by the flash scheduler (this request samples with unipc)"),
    ({"noise_scale_end": 4.0, "scheduler": "euler"}, "noise_scale_end", "samples with euler"),
])
def test_bad_sampling_fields_are_400_and_leave_nothing(service: Service, fields: dict[str, Any], field: str,
                                                        fragment: str) -> None:
    message = rejected(service, field, **fields)
    assert fragment in message, message


@pytest.mark.parametrize("value", [b"NaN", b"Infinity"])
def test_noise_not_finite(service: Service, value: bytes) -> None:
    before = service.leftovers()
    body = b'{"model": "hidream-o1-image", "prompt": "x", "scheduler": "flash", "noise_scale": ' + value + b"}"
    resp = service.client.post("/api/v1/model/generateImage", content=body,
                               headers={**service.h1, "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["message"].startswith("noise_scale: "), resp.text
    assert service.leftovers() == before


def test_a_dev_edit_takes_flash_noise_only_with_flash(make_service: Callable[..., Service]) -> None:
    svc = make_service(variant="dev")
    ref = {"reference_image_urls": [data_uri()], "image_size": "64x64"}
    assert "samples with euler" in rejected(svc, "noise_clip_std", noise_clip_std=2.5, **ref)
    inp = accepted(svc, scheduler="flash", noise_clip_std=2.5, **ref)["input"]
    assert (inp["scheduler"], inp["noise_clip_std"], inp["mode"]) == ("flash", 2.5, "edit")
    accepted(svc, noise_clip_std=2.5, image_size="64x64")  # Dev text-to-image samples with flash


def test_inputs_echo_the_extensions_only_when_given(service: Service) -> None:
    plain = accepted(service)["input"]
    assert not set(schemas.EXTENSIONS) & set(plain)  # a prediction without them looks as it did
    inp = accepted(service, timesteps=FOUR, scheduler="flash", noise_scale=8, noise_scale_end=4.0,
                   noise_clip_std=0)["input"]
    assert inp["timesteps"] == FOUR and inp["num_inference_steps"] == 4  # the steps follow the list
    assert (inp["scheduler"], inp["noise_scale"], inp["noise_scale_end"], inp["noise_clip_std"]) == \
        ("flash", 8.0, 4.0, 0.0)
    assert accepted(service, timesteps=FOUR, num_inference_steps=4)["input"]["num_inference_steps"] == 4


def test_openapi_documents_the_extensions(service: Service) -> None:
    spec = service.client.get("/openapi.json").json()
    props = spec["components"]["schemas"]["GenerateImageRequest"]["properties"]
    (timesteps,) = [k for k in props["timesteps"]["anyOf"] if k.get("type") == "array"]
    assert (timesteps["minItems"], timesteps["maxItems"]) == (1, 100)
    assert (timesteps["items"]["minimum"], timesteps["items"]["maximum"]) == (1, 1000)
    (scheduler,) = [k for k in props["scheduler"]["anyOf"] if k.get("type") == "string"]
    assert scheduler["enum"] == ["unipc", "flash", "euler"]
    (clip,) = [k for k in props["noise_clip_std"]["anyOf"] if k.get("type") == "number"]
    assert (clip["minimum"], clip["maximum"]) == (0, 10)
    (scale,) = [k for k in props["noise_scale"]["anyOf"] if k.get("type") == "number"]
    assert (scale["exclusiveMinimum"], scale["maximum"]) == (0, 100)
    params = service.client.get("/api/v1/models", headers=service.h1).json()["data"][0]["parameters"]
    assert params["scheduler"]["enum"] == ["unipc", "flash", "euler"]
    assert params["noise_scale"]["scheduler_defaults"] == {"flash": 7.5, "unipc": 8.0, "euler": 8.0}


def test_the_worker_passes_them_to_the_engine(make_service: Callable[..., Service], demo_checkpoint) -> None:
    """Submit on a Dev service, then run the stored task's request on the demo checkpoint as Dev."""
    from hidream.engine.pipeline import Engine

    svc = make_service(variant="dev")
    accepted(svc, prompt="make it blue", reference_image_urls=[data_uri()], image_size="64x64",
             scheduler="flash", timesteps=FOUR, seed=3)
    task = svc.store.claim("w1", [MODEL], 30)
    references = [svc.storage.get(key) for key in task["references"]]
    request = build_request(task, references)
    assert (request.scheduler, list(request.timesteps), request.steps) == ("flash", FOUR, 4)
    assert (request.noise_scale, request.noise_scale_end, request.noise_clip_std) == (None, None, None)
    result = Engine.load(demo_checkpoint, device="cpu", variant="dev").generate(request)
    # a Dev flash edit: the flash noise (7.5, 7.5, clip 2.5), not the Euler recipe's
    assert (result.scheduler, result.steps, result.timesteps) == ("flash", 4, tuple(FOUR))
    assert (result.noise_scale, result.noise_scale_end, result.noise_clip_std) == (7.5, 7.5, 2.5)


def test_old_tasks_without_the_extensions_still_run() -> None:
    task = {"input": {"prompt": "x", "width": 64, "height": 64, "keep_original_aspect": False,
                      "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 1, "num_images": 1}}
    request = build_request(task, [])
    assert (request.scheduler, request.timesteps, request.noise_scale) == (None, None, None)
