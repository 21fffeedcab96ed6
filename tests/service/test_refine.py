"""Prompt refinement (`hidream.refine`, `refine_prompt`, `POST /api/v1/prompt/refine`, `--refine`) against a real
local HTTP server that speaks the chat-completions shape (`ChatServer` in conftest.py), its failures included."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import openai
import pytest

from hidream import refine
from hidream.refine import RefinerConfig, UnusableAnswer, config_from_env, parse_answer
from hidream.service.worker import build_request

from test_api import assert_ok, data_uri, png_bytes, rejected  # tests/service/test_api.py

if TYPE_CHECKING:  # the fixtures' types (conftest is not imported: tests/ has two conftest modules)
    from conftest import Service
    from server_util import ChatServer

QUICK = 1.0  # the refiner timeout of these tests: [slow] answers after 3 s


def config(chat: ChatServer, **changes: Any) -> RefinerConfig:
    return replace(RefinerConfig(chat.url, model="refiner-7b", key="sk-local", timeout_s=QUICK), **changes)


# --- the refiner on its own -----------------------------------------------------------------------------------


def test_the_fake_endpoint_speaks_the_chat_completions_shape(chat_server: ChatServer) -> None:
    client = openai.OpenAI(base_url=chat_server.url, api_key="sk-local", max_retries=0)
    answer = client.chat.completions.create(model="refiner-7b", messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": "Mode: text-to-image\nRequest: a fox"}])
    assert answer.choices[0].message.content == '{"prompt": "Refined: a fox, in soft morning light"}'
    assert chat_server.last()["headers"]["authorization"] == "Bearer sk-local"


def test_refine_sends_our_system_prompt_the_mode_the_model_and_the_key(chat_server: ChatServer) -> None:
    result = refine.refine(config(chat_server), "a fox", "edit")
    assert (result.prompt, result.refined, result.warning) == ("a fox", "Refined: a fox, in soft morning light", None)
    assert result.used == result.refined
    sent = chat_server.last()
    assert sent["path"] == "/v1/chat/completions" and sent["headers"]["authorization"] == "Bearer sk-local"
    body = sent["body"]
    assert body["model"] == "refiner-7b" and body["stream"] is False
    assert body["messages"][0] == {"role": "system", "content": refine.SYSTEM_PROMPT}
    assert body["messages"][1] == {"role": "user", "content": "Mode: edit\nRequest: a fox"}
    # no model and no key configured: neither is sent; the full address works as the URL too
    refine.refine(config(chat_server, model=None, key=None, url=chat_server.url + "/chat/completions/"), "a cat")
    sent = chat_server.last()
    assert "model" not in sent["body"] and "authorization" not in sent["headers"]
    assert sent["path"] == "/v1/chat/completions"
    with pytest.raises(ValueError, match="mode must be one of"):
        refine.request_body(config(chat_server), "a fox", "video")


@pytest.mark.parametrize(("prompt", "failure", "reason"), [
    ("a fox [500]", "http", "the refiner answered HTTP 500"),
    ("a fox [slow]", "timeout", f"the refiner did not answer within {QUICK:g} s"),
    ("a fox [text]", "unusable", 'not a JSON object with a "prompt" string'),
    ("a fox [shape]", "unusable", "not a chat completion"),
    ("a fox [control]", "unusable", "control token <|im_end|>"),
    ("a fox [empty]", "unusable", "the refiner's prompt is empty"),
])
def test_every_failure_falls_back_to_the_prompt_with_a_warning(chat_server: ChatServer, prompt: str, failure: str,
                                                                reason: str) -> None:
    for result in (refine.refine(config(chat_server), prompt),
                   asyncio.run(refine.refine_async(config(chat_server), prompt))):
        assert result.refined is None and result.used == prompt and result.failure == failure
        assert reason in result.reason
        assert result.warning == f"refine_prompt: {result.reason}; the prompt was used as given"


def test_an_endpoint_that_is_not_there_falls_back(chat_server: ChatServer) -> None:
    gone = RefinerConfig("http://127.0.0.1:9/v1", timeout_s=QUICK)  # the discard port: nothing listens
    result = refine.refine(gone, "a fox")
    assert result.refined is None and result.failure == "unreachable" and "could not be reached" in result.reason
    assert refine.refine(config(chat_server), "a fox [fenced]").refined == "Refined: a fox, fenced"


def test_parse_answer_takes_the_json_object_wherever_it_is() -> None:
    assert parse_answer('{"prompt": " a fox "}') == "a fox"
    assert parse_answer('Here you go: {"prompt": "a fox", "notes": {"x": 1}} hope it helps') == "a fox"
    assert parse_answer('{"note": "first"} then {"prompt": "second"}') == "second"
    assert parse_answer('```\n{"prompt": "fenced"}\n```') == "fenced"
    for bad in ("", "   ", None, "a fox", '{"prompt": 5}', '["prompt"]', '{"prompt": "' + "x" * 5001 + '"}'):
        with pytest.raises(UnusableAnswer):
            parse_answer(bad)


def test_config_from_env() -> None:
    assert config_from_env({}) is None
    got = config_from_env({"HIDREAM_REFINE_URL": "http://h/v1", "HIDREAM_REFINE_MODEL": "m",
                           "HIDREAM_REFINE_KEY": "k", "HIDREAM_REFINE_TIMEOUT_S": "5"})
    assert got == RefinerConfig("http://h/v1", "m", "k", 5.0) and got.endpoint == "http://h/v1/chat/completions"
    assert config_from_env({"HIDREAM_REFINE_URL": "http://h/v1"}).timeout_s == refine.DEFAULT_TIMEOUT_S
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="HIDREAM_REFINE_TIMEOUT_S must be"):
            config_from_env({"HIDREAM_REFINE_URL": "http://h/v1", "HIDREAM_REFINE_TIMEOUT_S": bad})


# --- through the API ------------------------------------------------------------------------------------------


@pytest.fixture
def refining(make_service: Callable[..., Service], chat_server: ChatServer) -> Service:
    return make_service(refine_url=chat_server.url, refine_model="refiner-7b", refine_timeout_s=QUICK)


def test_refine_prompt_keeps_both_texts_and_the_worker_draws_the_refined_one(refining: Service,
                                                                            chat_server: ChatServer) -> None:
    data = assert_ok(refining.submit(prompt="a red fox", refine_prompt=True))
    inp = data["input"]
    assert inp["prompt"] == "a red fox" and inp["refined_prompt"] == "Refined: a red fox, in soft morning light"
    assert inp["refine_prompt"] is True and data["warnings"] == []
    assert chat_server.last()["body"]["messages"][1]["content"] == "Mode: text-to-image\nRequest: a red fox"
    task = refining.store.get_task(data["id"])
    assert build_request(task, []).prompt == inp["refined_prompt"]
    # an edit is refined as an edit instruction
    ref = data_uri(png_bytes((64, 64)))
    assert_ok(refining.submit(prompt="make it blue", refine_prompt=True, reference_image_urls=[ref]))
    assert chat_server.last()["body"]["messages"][1]["content"] == "Mode: edit\nRequest: make it blue"
    # without refine_prompt: no call, and the input looks as it always did
    before = chat_server.count()
    inp = assert_ok(refining.submit(prompt="a red fox"))["input"]
    assert chat_server.count() == before and not {"refine_prompt", "refined_prompt"} & set(inp)
    assert build_request(refining.store.get_task(assert_ok(refining.submit())["id"]), []).prompt == \
        "a red fox in the snow"


@pytest.mark.parametrize("prompt", ["a fox [500]", "a fox [slow]", "a fox [text]"])
def test_a_failing_refiner_never_fails_the_prediction(refining: Service, prompt: str) -> None:
    data = assert_ok(refining.submit(prompt=prompt, refine_prompt=True))
    assert data["status"] == "created" and "refined_prompt" not in data["input"]
    assert data["input"]["refine_prompt"] is True
    (warning,) = data["warnings"]
    assert warning.startswith("refine_prompt: the refiner") and warning.endswith("the prompt was used as given")
    assert build_request(refining.store.get_task(data["id"]), []).prompt == prompt
    read = assert_ok(refining.client.get(data["urls"]["get"].removeprefix(refining.settings.base_url),
                                         headers=refining.h1))
    assert read["warnings"] == [warning] and "warnings" not in read["input"]


def test_refine_prompt_without_a_refiner_is_a_400_that_leaves_nothing(service: Service,
                                                                      chat_server: ChatServer) -> None:
    before, calls = service.leftovers(), chat_server.count()
    rejected(service, 400, "refine_prompt", refine_prompt=True)
    assert "HIDREAM_REFINE_URL" in service.submit(refine_prompt=True).json()["message"]
    assert service.leftovers() == before and chat_server.count() == calls
    rejected(service, 400, "refine_prompt", refine_prompt="yes")


def test_a_request_refused_for_its_input_costs_no_refinement(refining: Service, chat_server: ChatServer) -> None:
    calls = chat_server.count()
    rejected(refining, 400, "image_size", refine_prompt=True, image_size="10x10")
    rejected(refining, 400, "reference_image_urls[0]", refine_prompt=True, reference_image_urls=["hello"])
    assert chat_server.count() == calls


def test_a_rate_limited_request_costs_no_refinement(make_service: Callable[..., Service],
                                                   chat_server: ChatServer) -> None:
    svc = make_service(refine_url=chat_server.url, refine_timeout_s=QUICK, rate_per_minute=1)
    assert_ok(svc.submit(refine_prompt=True))
    calls = chat_server.count()
    resp = svc.submit(refine_prompt=True)
    assert resp.status_code == 429 and "rate limit" in resp.json()["message"], resp.text
    assert chat_server.count() == calls


def test_the_models_route_says_whether_refinement_is_available(service: Service, refining: Service) -> None:
    for svc, available in ((service, False), (refining, True)):
        (model,) = assert_ok(svc.client.get("/api/v1/models", headers=svc.h1))
        assert model["parameters"]["refine_prompt"] == {"type": "boolean", "default": False, "extension": True,
                                                        "available": available}


def test_the_refine_route(refining: Service, service: Service) -> None:
    def post(svc: Service, body: Any, headers: dict[str, str] | None = None):
        return svc.client.post("/api/v1/prompt/refine", json=body, headers=svc.h1 if headers is None else headers)

    data = assert_ok(post(refining, {"prompt": "a fox", "mode": "personalization"}))
    assert data == {"prompt": "a fox", "refined_prompt": "Refined: a fox, in soft morning light",
                    "mode": "personalization"}
    assert assert_ok(post(refining, {"prompt": "a cat"}))["mode"] == "text-to-image"
    for body, status, fragment in [
        ({"prompt": "a fox [500]"}, 502, "the refiner answered HTTP 500"),
        ({"prompt": "a fox [slow]"}, 504, "did not answer within 1 s"),
        ({"prompt": "a fox [text]"}, 502, 'not a JSON object with a "prompt" string'),
        ({"prompt": " "}, 400, "prompt: must be a string of 1 to 5,000 characters"),
        ({"prompt": "a fox", "mode": "video"}, 400, "mode: must be one of text-to-image, edit, personalization"),
        ({"prompt": "a fox", "steps": 5}, 400, "steps: unknown field (allowed: prompt, mode)"),
        ({}, 400, "prompt: is required"),
    ]:
        resp = post(refining, body)
        assert resp.status_code == status and fragment in resp.json()["message"], (body, resp.json())
    resp = post(service, {"prompt": "a fox"})
    assert resp.status_code == 503 and "no prompt refiner" in resp.json()["message"]
    assert post(refining, {"prompt": "a fox"}, headers={}).status_code == 401


# --- through the CLI ------------------------------------------------------------------------------------------


def test_generate_refine_draws_the_refined_prompt(chat_server: ChatServer, demo_checkpoint, tmp_path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from hidream.cli import main

    def generate(prompt: str, name: str, *extra: str) -> tuple[int, str, bytes]:
        out = tmp_path / name
        code = main(["generate", prompt, "--model", str(demo_checkpoint), "--size", "64x64", "--steps", "1",
                     "--seed", "3", "-q", "-o", str(out), *extra])
        err = capsys.readouterr().err
        return code, err, Image.open(out).tobytes() if out.exists() else b""

    monkeypatch.delenv("HIDREAM_REFINE_URL", raising=False)
    code, err, _ = generate("a fox", "none.png", "--refine")
    assert code == 2 and "error: --refine: needs a prompt refiner: set HIDREAM_REFINE_URL" in err, err
    monkeypatch.setenv("HIDREAM_REFINE_URL", chat_server.url)
    monkeypatch.setenv("HIDREAM_REFINE_TIMEOUT_S", "soon")
    code, err, _ = generate("a fox", "bad.png", "--refine")
    assert code == 2 and "HIDREAM_REFINE_TIMEOUT_S must be a number of seconds" in err, err
    monkeypatch.setenv("HIDREAM_REFINE_TIMEOUT_S", str(QUICK))

    code, err, refined = generate("a fox", "refined.png", "--refine")
    assert code == 0 and "refined prompt: Refined: a fox, in soft morning light" in err, err
    assert generate("Refined: a fox, in soft morning light", "direct.png")[2] == refined  # what was drawn
    code, err, fallback = generate("a fox [500]", "fallback.png", "--refine")
    assert code == 0 and "warning: refine_prompt: the refiner answered HTTP 500" in err, err
    assert generate("a fox [500]", "plain.png")[2] == fallback


def test_the_openai_routes_pass_refine_prompt_and_give_revised_prompt(make_service: Callable[..., Service],
                                                                      chat_server: ChatServer) -> None:
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from hidream.service.routes.openai import images_response

    refining = make_service(refine_url=chat_server.url, refine_timeout_s=QUICK, sync_timeout_s=0.2)
    resp = refining.client.post("/v1/images/generations", headers=refining.h1,
                                json={"prompt": "a fox", "size": "256x256", "refine_prompt": True})
    # no worker here: the request times out naming its prediction, which carries the refinement
    assert resp.status_code == 504, resp.text
    (row,) = [t for t in (refining.store.get_task(i) for i in _task_ids(refining)) if t["input"]["prompt"] == "a fox"]
    assert row["input"]["refined_prompt"] == "Refined: a fox, in soft morning light"
    done = row | {"status": "completed", "completed_at": datetime(2026, 1, 1, tzinfo=UTC), "outputs": ["k/0.png"]}
    api = SimpleNamespace(renderer=SimpleNamespace(one=lambda r: {"outputs": ["http://x/0.png"]}))
    out = images_response(api, done, "url")
    assert out["data"] == [{"url": "http://x/0.png", "revised_prompt": "Refined: a fox, in soft morning light"}]
    plain = done | {"input": {k: v for k, v in done["input"].items() if k != "refined_prompt"}}
    assert images_response(api, plain, "url")["data"] == [{"url": "http://x/0.png"}]


def _task_ids(svc: Service) -> list[str]:
    from sqlalchemy import select

    from hidream.service.tables import tasks

    with svc.store.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(tasks.c.id))]
