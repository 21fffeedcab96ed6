"""Prompt refinement: a short prompt rewritten into a detailed one by an OpenAI-compatible chat endpoint.

The operator names the endpoint (`HIDREAM_REFINE_URL`: a base URL such as http://127.0.0.1:8080/v1, or its
full .../chat/completions address), the model (`HIDREAM_REFINE_MODEL`; left out of the request when unset,
which servers of one model accept), a key (`HIDREAM_REFINE_KEY`, sent as a Bearer token) and a timeout
(`HIDREAM_REFINE_TIMEOUT_S`). One chat completion per prompt, with this module's own system prompt, asking
for a JSON object `{"prompt": "..."}`. A refinement never fails a generation: a timeout, a transport or HTTP
error, or an answer that cannot be used (not such an object, an empty prompt, one over the prompt length or
with the model's control tokens) gives the user's prompt back with a warning that says why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from hidream.prompts import control_token_in
from hidream.rules import MAX_PROMPT, MODES

DEFAULT_TIMEOUT_S = 30.0

SYSTEM_PROMPT = """\
You prepare prompts for HiDream-O1, an image model that draws exactly what a prompt describes and \
knows nothing the prompt leaves out. Rewrite the user's request as one English paragraph the model \
can follow literally.

- Put the main subject and the intent first: who or what, its look, colours, materials, pose.
- Then the composition (framing, camera angle, where each element sits, foreground and background), \
the place, the time of day and the weather, the lighting, the style (photograph, painting, 3D render, \
illustration...) and a few technical terms that fit it (lens, depth of field, texture).
- Replace anything the model would have to look up or infer (a named person, artwork, landmark, poem, \
formula, abstract idea) with what it looks like.
- Text to appear in the image goes in double quotes, word for word, with its font, colour and position.
- Keep every fact the user gave; invent only what makes the picture concrete, never what contradicts it.
- Usually 60 to 200 words: shorter for simple requests. Plain sentences, not a list of tags.

The mode tells you what the prompt is for:
- text-to-image: the prompt describes the whole picture.
- edit: the prompt is an instruction for changing one given image. Keep it an instruction: say precisely \
what changes and that everything else stays as it is; do not describe the image from scratch.
- personalization: the prompt places subjects from several given images (the first image, the second...) \
in a new picture. Refer to them by their order and keep their identity; describe the new scene around them.

Answer with a JSON object and nothing else: {"prompt": "<the rewritten prompt>"}\
"""


@dataclass(frozen=True)
class RefinerConfig:
    """Where and how to ask for a refinement."""

    url: str
    model: str | None = None
    key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def endpoint(self) -> str:
        """The chat-completions address: the URL as given when it ends so, else the base URL + /chat/completions."""
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"


ENV = {"url": "HIDREAM_REFINE_URL", "model": "HIDREAM_REFINE_MODEL", "key": "HIDREAM_REFINE_KEY",
       "timeout_s": "HIDREAM_REFINE_TIMEOUT_S"}


def config_from_env(environ: Mapping[str, str]) -> RefinerConfig | None:
    """The refiner the HIDREAM_REFINE_* variables name (as `hidream serve` reads them), or None without a URL;
    ValueError naming HIDREAM_REFINE_TIMEOUT_S when it is not a positive number."""
    url = environ.get(ENV["url"], "").strip()
    if not url:
        return None
    text = environ.get(ENV["timeout_s"], "").strip()
    try:
        timeout = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"{ENV['timeout_s']} must be a number of seconds above 0 (got {text!r})")
    return RefinerConfig(url, environ.get(ENV["model"]) or None, environ.get(ENV["key"]) or None, timeout)


@dataclass(frozen=True)
class Refinement:
    """What a refinement made of a prompt: `refined` None (and a `reason`) when it fell back."""

    prompt: str
    refined: str | None
    reason: str | None = None  # why it fell back, e.g. "the refiner answered HTTP 500"
    failure: str | None = None  # its kind: "timeout", "unreachable", "http" or "unusable"

    @property
    def warning(self) -> str | None:
        """What a prediction says when it fell back."""
        return f"refine_prompt: {self.reason}; the prompt was used as given" if self.reason else None

    @property
    def used(self) -> str:
        """The prompt to generate with."""
        return self.refined if self.refined is not None else self.prompt


class UnusableAnswer(ValueError):
    """The endpoint answered, but not with a prompt this service can use."""


def request_body(config: RefinerConfig, prompt: str, mode: str = "text-to-image") -> dict[str, Any]:
    """The chat-completions request for `prompt` in `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    body: dict[str, Any] = {
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": f"Mode: {mode}\nRequest: {prompt}"}],
        "temperature": 0.7,
        "stream": False,
    }
    if config.model:
        body["model"] = config.model
    return body


def headers(config: RefinerConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.key}"} if config.key else {}


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_answer(content: Any) -> str:
    """The refined prompt in an answer's text: a JSON object with a "prompt" string, alone, in a ``` fence
    or amid other text. UnusableAnswer saying what is wrong otherwise, or when the prompt breaks the
    prompt rules (blank, over MAX_PROMPT characters, the model's control tokens)."""
    if not isinstance(content, str) or not content.strip():
        raise UnusableAnswer("the refiner's answer is empty")
    text = content.strip()
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1).strip()] if fenced else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        start = candidate.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except ValueError:
                value = None
            if isinstance(value, dict) and isinstance(value.get("prompt"), str):
                return _checked(value["prompt"])
            start = candidate.find("{", start + 1)
    raise UnusableAnswer('the refiner\'s answer is not a JSON object with a "prompt" string')


def _checked(prompt: str) -> str:
    refined = prompt.strip()
    if not refined:
        raise UnusableAnswer("the refiner's prompt is empty")
    if len(refined) > MAX_PROMPT:
        raise UnusableAnswer(f"the refiner's prompt is {len(refined):,} characters, over the {MAX_PROMPT:,} a "
                             "prompt may have")
    if (token := control_token_in(refined)) is not None:
        raise UnusableAnswer(f"the refiner's prompt contains the model's control token {token}")
    return refined


def content_of(response: httpx.Response) -> str:
    """The first choice's message text of a chat-completions response; UnusableAnswer for any other shape."""
    try:
        data = response.json()
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UnusableAnswer("the refiner's response is not a chat completion (choices[0].message.content)") \
            from None
    return parse_answer(content)


def _fallback(prompt: str, why: str, failure: str) -> Refinement:
    return Refinement(prompt, None, why, failure)


def _unreached(config: RefinerConfig, prompt: str, err: httpx.HTTPError) -> Refinement:
    if isinstance(err, httpx.TimeoutException):
        return _fallback(prompt, f"the refiner did not answer within {config.timeout_s:g} s", "timeout")
    return _fallback(prompt, f"the refiner could not be reached ({type(err).__name__}: {err})", "unreachable")


def _interpret(prompt: str, response: httpx.Response) -> Refinement:
    if response.status_code != 200:
        return _fallback(prompt, f"the refiner answered HTTP {response.status_code}", "http")
    try:
        return Refinement(prompt, content_of(response))
    except UnusableAnswer as err:
        return _fallback(prompt, str(err), "unusable")


def refine(config: RefinerConfig, prompt: str, mode: str = "text-to-image",
           client: httpx.Client | None = None) -> Refinement:
    """The refinement of `prompt` (blocking); never raises for what the endpoint does."""
    body = request_body(config, prompt, mode)
    own = client is None
    client = client or httpx.Client()
    try:
        try:
            response = client.post(config.endpoint, json=body, headers=headers(config), timeout=config.timeout_s)
        except httpx.HTTPError as err:
            return _unreached(config, prompt, err)
        return _interpret(prompt, response)
    finally:
        if own:
            client.close()


async def refine_async(config: RefinerConfig, prompt: str, mode: str = "text-to-image",
                       client: httpx.AsyncClient | None = None) -> Refinement:
    """`refine` for an event loop."""
    body = request_body(config, prompt, mode)
    own = client is None
    client = client or httpx.AsyncClient()
    try:
        try:
            response = await client.post(config.endpoint, json=body, headers=headers(config),
                                         timeout=config.timeout_s)
        except httpx.HTTPError as err:
            return _unreached(config, prompt, err)
        return _interpret(prompt, response)
    finally:
        if own:
            await client.aclose()
