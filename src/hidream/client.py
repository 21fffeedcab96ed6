"""A Python client for the HiDream image API (this service, or any server speaking the same wire format).

Submit a generation, follow it live, download the images (against ``scripts/demo``; the key is the one it
printed on its first start)::

    import os
    from hidream.client import Client

    with Client("http://127.0.0.1:8000", os.environ["HIDREAM_API_KEY"]) as client:
        quick = {"image_size": "512x512", "num_inference_steps": 8}  # leave out for the recipe's 50 steps
        fox = client.generate("a red fox in fresh snow", seed=7, **quick)
        fox = client.wait(fox)                 # a progress bar; the server's event stream, else polling
        fox.raise_for_status()                 # PredictionFailed if it failed (or was canceled)
        [path] = client.download(fox, "out/")  # out/<id>.png
        print(path, fox.input["seed"])

        # editing takes one image, personalization 2 to 10: paths, bytes, PIL images or URLs (local
        # images are uploaded first, URLs passed on as they are)
        stormy = client.edit("make the sky stormy", path, wait=True, **quick)
        duo = client.personalize("the two of them having tea", [path, client.download(stormy, "out/")[0]],
                                 output_format="webp", wait=True, progress=False, **quick)
        print(client.download(duo, "out/duo.webp"), client.usage()["amount_usd"])

On the receiving end of a webhook (``webhook_url=...`` on a submit)::

    from hidream.client import verify_webhook, WebhookVerificationError

    secret = client.webhook_secret()     # once; per API key ("whsec_...")
    try:
        prediction = verify_webhook(raw_body_bytes, request_headers, secret)
    except WebhookVerificationError:
        ...                              # answer 400; a genuine delivery is retried
    # at-least-once: deduplicate on prediction["id"] (also the HiDream-Webhook-Id header)

Retries: calls are retried (``max_retries`` times, exponential backoff) on 429 and 503, honouring the
server's ``Retry-After``, and on connection errors. A submit is retried only because it always carries an
``Idempotency-Key`` header: the client makes one (a random UUID) for each submit call unless you pass your
own, so a submit retried after a dropped connection returns the prediction the first attempt created instead
of creating (and charging) a second one. Pass your own ``idempotency_key`` to make a submit safe to repeat
across processes: the server returns the same prediction for the same key and the same body within 24 hours
(and a 409 for the same key with another body; note that local reference images are uploaded again on each
call, which changes the body: upload them once with :meth:`Client.upload` and pass the URLs).

Everything this module raises on purpose is a :class:`ClientError` (but a ``TypeError`` for an argument of
the wrong type); errors the server answered with are :class:`ApiError` (``status``, ``message``, ``field``),
one subclass per status (:class:`BadRequest`, :class:`AuthenticationError`, :class:`NotFound`,
:class:`Conflict`, :class:`RateLimited`, ...).

The webhook helpers (:func:`sign_webhook`, :func:`webhook_headers`, :func:`webhook_body`,
:func:`verify_webhook`) use only the standard library.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import email.utils
import hashlib
import hmac
import io
import json
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TextIO, TypedDict, Union
from urllib.parse import quote

import httpx

from hidream import __version__

if TYPE_CHECKING:
    from typing import Unpack

    from PIL.Image import Image as PILImage

__all__ = [
    "ApiConnectionError", "ApiError", "AuthenticationError", "BadRequest", "Client", "ClientError", "Conflict",
    "DEFAULT_MODEL", "InputError", "NotFound", "Page", "PayloadTooLarge", "Prediction", "PredictionFailed",
    "Progress", "ProgressEvent", "RateLimited", "ServerError", "ServerEvent", "SubmitOptions", "Unavailable",
    "WaitTimeout", "WebhookBody", "WebhookVerificationError", "iter_sse", "sign_webhook", "verify_webhook",
    "webhook_body", "webhook_headers",
]

DEFAULT_MODEL = "hidream-o1-image"
TERMINAL_STATUSES = frozenset({"completed", "failed"})
CANCELED = "canceled"  # the `error` of a canceled prediction

WEBHOOK_ID_HEADER = "HiDream-Webhook-Id"
WEBHOOK_TIMESTAMP_HEADER = "HiDream-Webhook-Timestamp"
WEBHOOK_SIGNATURE_HEADER = "HiDream-Webhook-Signature"
WEBHOOK_ATTEMPT_HEADER = "HiDream-Webhook-Attempt"

_GENERATE = "/api/v1/model/generateImage"
_UPLOAD = "/api/v1/model/uploadMedia"
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_FIELD = re.compile(r"^([A-Za-z_][\w.-]*(?:\[\d+\](?:\.[A-Za-z_]\w*)?)*): ")  # `seed: `, `loras[0].path: `
_MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is raised to the caller rather than slept through
_STREAM_READ_TIMEOUT_S = 30.0  # the server sends a keep-alive comment every ~15 s

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, "PILImage"]
"""A reference image: a local path, encoded bytes (PNG, JPEG, WebP), a PIL image, or an http(s)/data: URL."""


# --- errors -------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of every error this module raises on purpose."""


class InputError(ClientError, ValueError):
    """An argument the client cannot send (an unreadable file, a list of the wrong length, ...)."""


class ApiConnectionError(ClientError):
    """The server could not be reached, or the connection broke (after the retries, if any)."""


class ApiError(ClientError):
    """The server answered with an error status.

    Attributes:
        status: the HTTP status.
        message: the server's message, e.g. ``"num_inference_steps: must be an integer from 1 to 100 (got 0)"``.
        field: the input at fault when the message starts with ``"<field>: "`` (``"num_inference_steps"``,
            ``"reference_image_urls[1]"``, ``"Idempotency-Key"``), else None.
        retry_after: seconds from the ``Retry-After`` header, when the server sent one.
    """

    def __init__(self, status: int, message: str, field: str | None = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, message={self.message!r}, field={self.field!r})"


class BadRequest(ApiError):
    """400: invalid input; ``field`` names it."""


class AuthenticationError(ApiError):
    """401: no API key, or a wrong or revoked one."""


class NotFound(ApiError):
    """404: an unknown prediction (or another key's), or an expired file link."""


class Conflict(ApiError):
    """409: an Idempotency-Key reused with a different request body."""


class PayloadTooLarge(ApiError):
    """413: the body or the upload is over the server's limit."""


class RateLimited(ApiError):
    """429: the key's rate or concurrency limit, or a full queue; ``retry_after`` says when to try again."""


class ServerError(ApiError):
    """5xx: a failure on the server's side."""


class Unavailable(ServerError):
    """503: no model loaded, shutting down, or the database is away; ``retry_after`` when given."""


_ERRORS: dict[int, type[ApiError]] = {400: BadRequest, 401: AuthenticationError, 404: NotFound, 409: Conflict,
                                      413: PayloadTooLarge, 429: RateLimited, 503: Unavailable}


class PredictionFailed(ClientError):
    """A prediction ended ``failed`` (``canceled`` tells a cancellation apart) or is not completed yet."""

    def __init__(self, prediction: Prediction) -> None:
        if prediction.status == "failed":
            why = "was canceled" if prediction.canceled else f"failed: {prediction.error or 'no reason given'}"
        else:
            why = f"is not completed (status {prediction.status})"
        super().__init__(f"prediction {prediction.id} {why}")
        self.prediction = prediction

    @property
    def canceled(self) -> bool:
        return self.prediction.canceled


class WaitTimeout(ClientError, TimeoutError):
    """:meth:`Client.wait` ran out of time; ``prediction`` is the last state seen (it keeps running)."""

    def __init__(self, prediction: Prediction | None, prediction_id: str, timeout: float) -> None:
        super().__init__(f"prediction {prediction_id} still not done after {timeout:g} s")
        self.prediction = prediction


class WebhookVerificationError(ClientError, ValueError):
    """A webhook request whose signature, timestamp or body does not check out: reject it (e.g. with a 400)."""


def error_from_response(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` subclass for an error response (its envelope's message, else its text)."""
    try:
        body = response.json()
        message = str(body["message"]) if isinstance(body, dict) and body.get("message") else ""
    except ValueError:
        message = ""
    message = message or response.text[:500].strip() or response.reason_phrase or f"HTTP {response.status_code}"
    match = _FIELD.match(message)
    status = response.status_code
    cls = _ERRORS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, message, match.group(1) if match else None,
               retry_after=_retry_after(response.headers.get("Retry-After")))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- data types ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a running prediction is: ``step`` of ``total`` (over all its images), ``eta_s`` if known."""

    step: int
    total: int
    eta_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Progress | None:
        if not data or data.get("total") is None:
            return None
        eta = data.get("eta_s")
        return cls(int(data.get("step") or 0), int(data["total"]), None if eta is None else float(eta))


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Prediction:
    """A prediction as the API returns it; ``raw`` keeps the whole object, fields this class does not name included.

    ``status`` goes ``created`` -> ``processing`` -> ``completed`` or ``failed``; a canceled prediction is
    ``failed`` with ``error == "canceled"``. ``outputs`` are URLs (or ``data:`` URIs) once completed.
    ``webhook`` is None, or ``{"url", "state", "attempts"}`` when one was requested. ``warnings``: what did
    not go as asked though the prediction went on (a prompt refiner that failed).
    """

    id: str
    status: str
    model: str
    input: dict[str, Any]
    outputs: list[str]
    error: str
    progress: Progress | None
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    urls: dict[str, str]
    timings: dict[str, Any]
    webhook: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        """Parse a prediction object (tolerant: a field the server left out takes an empty value)."""
        return cls(
            id=str(data["id"]), status=str(data.get("status", "")), model=str(data.get("model", "")),
            input=dict(data.get("input") or {}), outputs=list(data.get("outputs") or []),
            error=str(data.get("error") or ""), progress=Progress.from_dict(data.get("progress")),
            created_at=_timestamp(data.get("created_at")), started_at=_timestamp(data.get("started_at")),
            completed_at=_timestamp(data.get("completed_at")), urls=dict(data.get("urls") or {}),
            timings=dict(data.get("timings") or {}), webhook=data.get("webhook"), raw=dict(data),
            warnings=[str(w) for w in data.get("warnings") or []],
        )

    @property
    def done(self) -> bool:
        """True once ``completed`` or ``failed``: nothing about it changes any more."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"

    @property
    def canceled(self) -> bool:
        return self.status == "failed" and self.error == CANCELED

    def raise_for_status(self) -> Prediction:
        """This prediction if it completed; else raise :class:`PredictionFailed`."""
        if not self.succeeded:
            raise PredictionFailed(self)
        return self


@dataclass(frozen=True)
class Page:
    """One page of :meth:`Client.list`: pass ``next_cursor`` back for the next (None on the last page)."""

    items: list[Prediction]
    next_cursor: str | None


@dataclass(frozen=True)
class ProgressEvent:
    """An update :meth:`Client.wait` passes to a progress callback.

    Attributes:
        prediction_id: the prediction it is about.
        status: its status at this point.
        step, total, eta_s: the progress (None when unknown; ``step == total`` once completed).
        preview: on a preview event (stream only, every few steps, when the callback is a callable): a
            low-resolution ``data:image/jpeg;base64,...`` of the current estimate; else None.
        prediction: the whole prediction, on the final event and on every polled event; else None.
        source: ``"stream"`` (the server's event stream) or ``"poll"`` (GET requests).
    """

    prediction_id: str
    status: str
    step: int | None = None
    total: int | None = None
    eta_s: float | None = None
    preview: str | None = None
    prediction: Prediction | None = None
    source: str = "stream"

    @classmethod
    def of(cls, prediction: Prediction, source: str) -> ProgressEvent:
        """The event that describes a prediction as fetched."""
        p = prediction.progress
        step, total, eta = (p.step, p.total, p.eta_s) if p else (None, None, None)
        if prediction.succeeded and total is None and "num_inference_steps" in prediction.input:
            total = int(prediction.input["num_inference_steps"]) * int(prediction.input.get("num_images", 1))
        if prediction.succeeded and total is not None:
            step = total
        return cls(prediction.id, prediction.status, step, total, eta, None, prediction, source)


@dataclass(frozen=True)
class ServerEvent:
    """One Server-Sent Event: its ``event`` name and its ``data`` (decoded from JSON when it is JSON)."""

    event: str
    data: Any


class SubmitOptions(TypedDict, total=False):
    """Keyword options of :meth:`Client.generate`, :meth:`Client.edit`, :meth:`Client.personalize`.

    Left out, each takes the server's default.

    - ``model``: a model id (default ``"hidream-o1-image"``).
    - ``image_size``: a preset (``"square_hd"``, ``"square"``, ``"landscape_4_3"``, ...), ``"WxH"``, or
      ``(width, height)``.
    - ``seam_smoothing``: ``True`` (the defaults) or ``{"start": 0.8, "end": 1.0, "passes": 2}``: average the late
      steps over patch grids shifted by part of a patch, against grid seams.
    - ``cache``: ``"fast"`` for step caching (all but the first decoder layer skipped on the steps where it
      barely changes: quicker, approximate); ``"off"`` (the default) runs every layer.
    - ``layout_boxes``: one ``(x1, y1, x2, y2)`` box per reference (fractions of the output): where each goes.
    - ``refine_prompt``: rewrite the prompt with the service's prompt refiner first (``prediction.input`` keeps
      ``prompt`` and gives ``refined_prompt``; a refiner that fails leaves the prompt as is, in ``warnings``).
    - ``snap_to_native``: generate at the native size nearest the aspect asked for (``image_size``, or the
      reference's with ``keep_original_aspect``), as the official code does; ``prediction.input`` has the size made.
    - ``num_inference_steps``, ``guidance_scale``: sampler settings (default: the served recipe's).
    - ``seed``: 0 to 2**32-1 (default: random; the seed used is in ``prediction.input["seed"]``).
    - ``output_format``: ``"png"``, ``"jpeg"`` or ``"webp"``. ``num_images``: 1 to 4 (image i uses seed + i).
    - ``base64_output``: outputs as ``data:`` URIs instead of URLs.
    - ``webhook_url``: POST the final prediction there, signed (see :func:`verify_webhook`).
    - ``loras``: LoRAs for this request: names ``GET /api/v1/loras`` lists (or https URLs where the service takes
      them), each a name, a ``(name, scale)`` pair or a ``{"path": name, "scale": scale}`` dict (scale 1.0 if absent).
    - ``idempotency_key``: your own Idempotency-Key (default: a fresh UUID per call).
    - ``wait``: wait for the end (:meth:`Client.wait` with ``progress``) before returning.
    - ``progress``: with ``wait``: True for a progress bar on stderr, False for none, or a callable.
    """

    model: str
    image_size: str | tuple[int, int] | None
    snap_to_native: bool
    refine_prompt: bool
    layout_boxes: Sequence[Sequence[float]] | None
    seam_smoothing: bool | Mapping[str, Any] | None
    cache: str
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int | None
    output_format: str
    num_images: int
    base64_output: bool
    webhook_url: str | None
    loras: Sequence[str | tuple[str, float] | Mapping[str, Any]]
    idempotency_key: str | None
    wait: bool
    progress: bool | Callable[[ProgressEvent], None]


ProgressOption = bool | Callable[[ProgressEvent], None] | None


# --- webhooks (standard library only) -----------------------------------------------------------------------


WebhookBody = Union[bytes, str, Mapping[str, Any]]
"""A webhook body to sign: the raw bytes (or their text), or the prediction object itself (see :func:`webhook_body`)."""


def webhook_body(prediction: Mapping[str, Any]) -> bytes:
    """The body the server sends for a prediction object: compact JSON (``separators=(",", ":")``, non-ASCII
    characters escaped), keys in the object's order."""
    return json.dumps(dict(prediction), separators=(",", ":")).encode("ascii")


def _body_bytes(body: WebhookBody) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, Mapping):
        return webhook_body(body)
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"body: bytes, str or a prediction mapping (got {type(body).__name__})")


def sign_webhook(body: WebhookBody, secret: str, timestamp: int) -> str:
    """The ``HiDream-Webhook-Signature`` value for a body sent at ``timestamp`` (unix seconds).

    ``v1=`` followed by the hex HMAC-SHA256, keyed with the secret's UTF-8 bytes, of
    ``f"{timestamp}.{body}"`` where ``body`` is the raw body exactly as sent. ``body`` is those bytes, their
    text (encoded as UTF-8), or a prediction object (a dict), which is signed as the server sends it
    (:func:`webhook_body`).
    """
    message = str(int(timestamp)).encode("ascii") + b"." + _body_bytes(body)
    return "v1=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def webhook_headers(body: WebhookBody, secret: str, webhook_id: str, attempt: int = 1,
                    timestamp: int | None = None) -> dict[str, str]:
    """Every header of a webhook delivery of ``body`` (as :func:`sign_webhook` takes it; timestamp: now unless
    given). Send ``webhook_body(prediction)`` as the body when ``body`` is a prediction object."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {"Content-Type": "application/json", WEBHOOK_ID_HEADER: webhook_id, WEBHOOK_TIMESTAMP_HEADER: str(ts),
            WEBHOOK_SIGNATURE_HEADER: sign_webhook(body, secret, ts), WEBHOOK_ATTEMPT_HEADER: str(attempt)}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value whatever the case of its name in ``headers``."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str,
                   tolerance_s: float | None = 300, *, now: float | None = None) -> dict[str, Any]:
    """Check a webhook request and return the prediction object it carries.

    Args:
        body: the raw request body, exactly as received (bytes, or its text): not parsed JSON, whose
            re-serialization need not give back the bytes that were signed.
        headers: the request headers, any mapping; names are matched case-insensitively.
        secret: the key's webhook secret (``whsec_...``, from :meth:`Client.webhook_secret`).
        tolerance_s: reject a timestamp further than this from now (replay protection); None disables it.
        now: the current unix time (for tests; default ``time.time()``).

    Raises:
        WebhookVerificationError: a header is missing or malformed, the timestamp is out of tolerance, no
            ``v1`` signature matches (compared in constant time), or the body is not a JSON object.
        TypeError: ``body`` is not bytes or str (e.g. the already parsed JSON): a mistake in the receiver,
            not a bad request.
    """
    if not isinstance(body, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"body: pass the raw request body (bytes or str) exactly as received, not "
                        f"{'the parsed JSON' if isinstance(body, Mapping) else type(body).__name__}")
    timestamp = _header(headers, WEBHOOK_TIMESTAMP_HEADER)
    signatures = _header(headers, WEBHOOK_SIGNATURE_HEADER)
    if not timestamp or not signatures:
        raise WebhookVerificationError(f"missing {WEBHOOK_TIMESTAMP_HEADER} or {WEBHOOK_SIGNATURE_HEADER} header")
    try:
        ts = int(timestamp.strip())
    except ValueError:
        raise WebhookVerificationError(f"{WEBHOOK_TIMESTAMP_HEADER}: not unix seconds ({timestamp[:40]!r})") from None
    current = time.time() if now is None else now
    if tolerance_s is not None and abs(current - ts) > tolerance_s:
        raise WebhookVerificationError(f"{WEBHOOK_TIMESTAMP_HEADER}: {ts} is more than {tolerance_s:g} s from now")
    expected = sign_webhook(body, secret, ts).encode("ascii")
    offered = [s.encode("utf-8", "replace") for s in re.split(r"[\s,]+", signatures) if s.startswith("v1=")]
    if not any(hmac.compare_digest(expected, sig) for sig in offered):  # compare all: constant time per entry
        raise WebhookVerificationError("signature mismatch: not signed with this secret, or the body was altered")
    try:
        data = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except ValueError:
        raise WebhookVerificationError("body: not JSON") from None
    if not isinstance(data, dict):
        raise WebhookVerificationError("body: not a JSON object")
    return data


# --- Server-Sent Events -------------------------------------------------------------------------------------


def iter_sse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Parse Server-Sent Events from lines (without their line ends), as ``httpx.Response.iter_lines`` gives.

    Comment lines (``: keep-alive``) are skipped; ``data:`` lines of one event are joined with newlines; an
    event is dispatched at a blank line; ``id`` and ``retry`` are ignored; an event with no ``event:`` field
    is a ``message``.
    """
    name = ""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield ServerEvent(name or "message", _json_or_text("\n".join(data)))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- images and files ---------------------------------------------------------------------------------------


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://", "data:"))


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _image_file(image: ImageInput) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of a local image to upload."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        mime = _mime(data)
        return "image" + {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(mime, ""), data, mime
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror or err})") from err
        return path.name, data, _mime(data)
    if callable(getattr(image, "save", None)) and type(image).__module__.startswith("PIL."):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "image.png", buf.getvalue(), "image/png"
    raise InputError(f"an image must be a path, bytes, a PIL image or a URL (got {type(image).__name__})")


def _data_uri_bytes(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    if not head.endswith(";base64"):
        raise InputError(f"output: a data: URI that is not base64 ({head[:40]!r})")
    return base64.b64decode(payload)


def _output_paths(prediction: Prediction, target: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                  ) -> builtins.list[Path]:
    """Where :meth:`Client.download` writes each output (see there)."""
    n = len(prediction.outputs)
    if not isinstance(target, (str, os.PathLike)):
        paths = [Path(p) for p in target]
        if len(paths) != n:
            raise InputError(f"{len(paths)} paths given for {n} outputs")
        return paths
    ext = _EXTENSIONS.get(str(prediction.input.get("output_format", "png")), ".png")
    path = Path(target).expanduser()
    if path.is_dir() or str(target).endswith(("/", os.sep)) or not path.suffix:
        return [path / (prediction.id + ext)] if n == 1 else [path / f"{prediction.id}_{i}{ext}" for i in range(n)]
    return [path] if n == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


# --- progress display ---------------------------------------------------------------------------------------


class _ProgressBar:
    """A tqdm bar fed with :class:`ProgressEvent`: step of total, rate, ETA (and the server's ETA if given).

    While the prediction waits in the queue the bar shows only that (``queued``); its clock starts when the
    prediction starts processing, so the rate and the ETA count processing time only, and starts again when
    the step count goes back (a task retried from the start). Steps already done when the bar first sees the
    prediction processing (a wait that joins a running prediction, or polling) are left out of the rate.
    """

    _WAITING_FORMAT = "{desc}"  # no step count, rate or clock while the prediction is not running yet

    def __init__(self, prediction_id: str, file: TextIO | None = None) -> None:
        from tqdm import tqdm

        self.label = prediction_id[:8]
        self.running = False
        self.bar = tqdm(total=None, unit="step", desc=f"{self.label} waiting", bar_format=self._WAITING_FORMAT,
                        file=file or sys.stderr, dynamic_ncols=True)

    def __call__(self, event: ProgressEvent) -> None:
        bar = self.bar
        status = "queued" if event.status == "created" else event.status
        bar.set_description_str(f"{self.label} {status}", refresh=False)
        if event.total is not None and event.total != bar.total:
            bar.total = event.total
        if event.step is not None or event.status == "processing":
            step = event.step or 0
            if not self.running:  # processing from now on: the rate and ETA count from here
                self.running = True
                bar.bar_format = None
                self._restart_clock(step)
            elif step < bar.n:  # the task was retried from the start
                self._restart_clock(step)
            bar.update(step - bar.n)
        if event.eta_s is not None:
            bar.set_postfix_str(f"server eta {event.eta_s:.0f}s", refresh=False)
        bar.refresh()

    def _restart_clock(self, step: int) -> None:
        """Elapsed time, rate and ETA measured from now on, the ``step`` steps done so far left out of the rate."""
        bar = self.bar
        bar.reset(total=bar.total)
        bar.n = bar.last_print_n = bar.initial = step

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _progress_sink(progress: ProgressOption, prediction_id: str) -> Iterator[Callable[[ProgressEvent], None]]:
    """A callable taking every event: a progress bar (True), nothing (False/None), or the caller's."""
    if callable(progress):
        yield progress
    elif progress:
        bar = _ProgressBar(prediction_id)
        try:
            yield bar
        finally:
            bar.close()
    else:
        yield lambda _event: None


# --- the client ---------------------------------------------------------------------------------------------


class Client:
    """A synchronous client for one server and one API key (a context manager: ``with Client(...) as c:``).

    Args:
        base_url: the server, e.g. ``"http://127.0.0.1:8000"``.
        api_key: the API key (``hd-...``), sent as ``Authorization: Bearer``.
        timeout: seconds for connecting and for each read of a request.
        max_retries: retries after a 429, a 503 or a connection error (0 disables them).
        backoff: the first retry's delay in seconds when the server gives no Retry-After; doubled at each
            retry (with jitter, 30 s at most). A Retry-After over 60 s is not waited for: the error is raised.
        transport: an httpx transport (for tests: ``httpx.MockTransport``).
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0, max_retries: int = 3,
                 backoff: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"base_url: must start with http:// or https:// (got {base_url!r})")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  headers={"User-Agent": f"hidream-client/{__version__}"})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (the client is unusable afterwards)."""
        self._http.close()

    # --- transport ---

    def _request(self, method: str, url: str, *, idempotent: bool = True, auth: bool = True,
                 headers: Mapping[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request, retrying 429/503 and (when ``idempotent``) connection errors; raise ApiError.

        Every call of this client is idempotent: reads and cancels by nature, submits through their
        Idempotency-Key, uploads because a repeated one only leaves an unused file.
        """
        all_headers = {**(self._auth if auth else {}), **(headers or {})}
        attempt = 0
        while True:
            try:
                response = self._http.request(method, url, headers=all_headers, **kwargs)
            except httpx.TransportError as err:
                if not idempotent or attempt >= self.max_retries:
                    raise ApiConnectionError(f"{method} {self._shown(url)}: {str(err) or type(err).__name__}") from err
                delay = self._backoff_delay(attempt)
            else:
                if response.status_code < 400:
                    return response
                error = error_from_response(response)
                retryable = isinstance(error, (RateLimited, Unavailable)) and attempt < self.max_retries
                if not retryable or (error.retry_after or 0) > _MAX_RETRY_AFTER_S:
                    raise error
                delay = self._backoff_delay(attempt) if error.retry_after is None else error.retry_after
            attempt += 1
            time.sleep(delay)

    def _backoff_delay(self, attempt: int) -> float:
        return min(30.0, self.backoff * 2.0**attempt) * random.uniform(0.5, 1.0)

    def _shown(self, url: str) -> str:
        return (url if url.startswith(("http://", "https://")) else self.base_url + url).split("?")[0]

    def _data(self, method: str, url: str, **kwargs: Any) -> Any:
        """The ``data`` of a successful envelope."""
        response = self._request(method, url, **kwargs)
        try:
            return response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, f"{self._shown(url)}: not an API response "
                                                 f"({response.text[:200]!r})") from None

    @staticmethod
    def _prediction_url(prediction: Prediction | str, suffix: str = "") -> str:
        pid = prediction.id if isinstance(prediction, Prediction) else prediction
        return f"/api/v1/model/prediction/{quote(pid, safe='')}{suffix}"

    # --- submitting ---

    def upload(self, image: ImageInput) -> str:
        """A URL the server accepts as a reference: http(s) and ``data:`` URLs as they are, else uploaded.

        A path, bytes or PIL image is sent to ``uploadMedia`` (PNG, JPEG or WebP; a PIL image as PNG).
        """
        if isinstance(image, str) and _is_url(image):
            return image
        name, data, mime = _image_file(image)
        data_ = self._data("POST", _UPLOAD, files={"file": (name, data, mime)})
        return str(data_["url"])

    def submit(self, prompt: str, *, references: Sequence[ImageInput] = (), keep_original_aspect: bool = False,
               **options: Unpack[SubmitOptions]) -> Prediction:
        """Submit a generation: 0 references is text-to-image, 1 edits, 2 to 10 personalize.

        Options are those of :class:`SubmitOptions`. Returns the prediction as submitted (``created``), or,
        with ``wait=True``, as it ended.
        """
        urls = [self.upload(image) for image in references]
        body = _submit_body(prompt, urls, keep_original_aspect, options)
        key = options.get("idempotency_key") or str(uuid.uuid4())
        prediction = Prediction.from_dict(self._data("POST", _GENERATE, json=body, headers={"Idempotency-Key": key},
                                                     idempotent=True))  # the key makes a retry safe
        if options.get("wait"):
            return self.wait(prediction, progress=options.get("progress", True))
        return prediction

    def generate(self, prompt: str, **options: Unpack[SubmitOptions]) -> Prediction:
        """Text-to-image. Options: :class:`SubmitOptions` (``image_size``, ``seed``, ``wait``, ...)."""
        return self.submit(prompt, **options)

    def edit(self, prompt: str, image: ImageInput, *, keep_original_aspect: bool = False,
             **options: Unpack[SubmitOptions]) -> Prediction:
        """Edit one image (a path, bytes, PIL image or URL) as the prompt says.

        ``keep_original_aspect`` gives the output the image's aspect ratio. Options: :class:`SubmitOptions`.
        """
        return self.submit(prompt, references=[image], keep_original_aspect=keep_original_aspect, **options)

    def personalize(self, prompt: str, images: Sequence[ImageInput], **options: Unpack[SubmitOptions]) -> Prediction:
        """Subject-driven generation from 2 to 10 images (paths, bytes, PIL images or URLs).

        Options: :class:`SubmitOptions`.
        """
        if not 2 <= len(images) <= 10:
            raise InputError(f"images: personalize takes 2 to 10 images (got {len(images)}); edit() takes one")
        return self.submit(prompt, references=images, **options)

    # --- reading ---

    def get(self, prediction: Prediction | str) -> Prediction:
        """The prediction as it is now (by object or id)."""
        return Prediction.from_dict(self._data("GET", self._prediction_url(prediction)))

    def list(self, limit: int = 20, cursor: str | None = None) -> Page:
        """One page of this key's predictions, newest first (``limit`` 1 to 100)."""
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        data = self._data("GET", "/api/v1/predictions", params=params)
        return Page([Prediction.from_dict(p) for p in data["items"]], data.get("next_cursor"))

    def iter_predictions(self, page_size: int = 100) -> Iterator[Prediction]:
        """Every prediction of this key, newest first, fetching pages as needed."""
        cursor: str | None = None
        while True:
            page = self.list(page_size, cursor)
            yield from page.items
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def refine_prompt(self, prompt: str, mode: str = "text-to-image") -> str:
        """The service's prompt refiner's rewrite of `prompt` for `mode` (``"text-to-image"``, ``"edit"`` or
        ``"personalization"``); ApiError 503 when it has none, 502 or 504 when the refiner failed."""
        return str(self._data("POST", "/api/v1/prompt/refine", json={"prompt": prompt, "mode": mode})["refined_prompt"])

    def models(self) -> builtins.list[dict[str, Any]]:
        """The served models: ``id``, ``aliases``, ``parameters`` (types, defaults, ranges), ``price_per_image_usd``."""
        return builtins.list(self._data("GET", "/api/v1/models"))

    def usage(self) -> dict[str, Any]:
        """Images and amount charged to this key: ``{"images", "amount_usd", "days": [...]}``."""
        return dict(self._data("GET", "/api/v1/usage"))

    def webhook_secret(self) -> str:
        """This key's webhook signing secret (``whsec_...``), for :func:`verify_webhook`."""
        return str(self._data("GET", "/api/v1/webhook/secret")["secret"])

    def cancel(self, prediction: Prediction | str) -> Prediction:
        """Cancel a prediction: a queued one fails at once, a running one at its next step.

        Returns the prediction (usually already ``failed`` with error ``canceled``; one that had already
        ended is returned unchanged). Nothing is charged for a canceled prediction.
        """
        return Prediction.from_dict(self._data("POST", self._prediction_url(prediction, "/cancel")))

    # --- waiting ---

    def stream(self, prediction: Prediction | str, *, previews: bool = False,
               read_timeout: float | None = None) -> Generator[ServerEvent, None, None]:
        """The prediction's live events (``status``, ``progress``, ``preview``, ``done``) until it ends.

        Raises :class:`ApiError` when the server refuses the stream (404 for an unknown id, or a server
        without the stream), :class:`ApiConnectionError` when the connection fails or drops.
        """
        timeout = httpx.Timeout(self.timeout, read=read_timeout or max(self.timeout, _STREAM_READ_TIMEOUT_S))
        try:
            with self._http.stream("GET", self._prediction_url(prediction, "/stream"), headers=self._auth,
                                   params={"previews": str(previews).lower()}, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response)
                yield from iter_sse(response.iter_lines())
        except httpx.TransportError as err:
            raise ApiConnectionError(f"event stream: {str(err) or type(err).__name__}") from err

    def wait(self, prediction: Prediction | str, *, timeout: float | None = None, stream: bool = True,
             progress: ProgressOption = True, poll_interval: float = 0.5) -> Prediction:
        """Wait until the prediction is ``completed`` or ``failed`` and return it (it does not raise on failure:
        call :meth:`Prediction.raise_for_status`).

        Args:
            prediction: a Prediction or an id.
            timeout: seconds; then :class:`WaitTimeout` (the prediction keeps running). None waits as long
                as it takes.
            stream: follow the server's event stream; when the server has none (404/405) or the connection
                drops, go on by polling. False polls from the start.
            progress: True shows a progress bar on stderr (step/total, rate, ETA); a callable receives each
                :class:`ProgressEvent` instead (with previews, when the server sends them); False, nothing.
            poll_interval: seconds between GETs when polling.
        """
        if isinstance(prediction, Prediction) and prediction.done:
            return prediction
        pid = prediction.id if isinstance(prediction, Prediction) else prediction
        deadline = None if timeout is None else time.monotonic() + timeout
        with _progress_sink(progress, pid) as emit:
            final = self._wait_stream(pid, deadline, emit, previews=callable(progress)) if stream else None
            source = "stream"
            if final is None:
                final, source = self._wait_poll(pid, deadline, timeout, emit, poll_interval), "poll"
            emit(ProgressEvent.of(final, source))
            return final

    def _wait_stream(self, pid: str, deadline: float | None, emit: Callable[[ProgressEvent], None],
                     previews: bool) -> Prediction | None:
        """Follow the stream to its ``done`` event; None to fall back to polling (no stream, a drop, time up)."""
        read_timeout = None if deadline is None else max(0.1, min(deadline - time.monotonic(),
                                                                  _STREAM_READ_TIMEOUT_S))
        try:
            with contextlib.closing(self.stream(pid, previews=previews, read_timeout=read_timeout)) as events:
                return self._follow(pid, events, deadline, emit)
        except AuthenticationError:
            raise
        except (ApiError, ApiConnectionError):
            return None  # no stream here (404/405), or it broke: polling answers (and raises what is real)

    @staticmethod
    def _follow(pid: str, events: Iterator[ServerEvent], deadline: float | None,
                emit: Callable[[ProgressEvent], None]) -> Prediction | None:
        """Pass stream events on as ProgressEvents; the final prediction at ``done``, None if the time is up."""
        current = ProgressEvent(pid, "created")
        for event in events:
            data = event.data if isinstance(event.data, dict) else {}
            if event.event == "done" and "id" in data:
                return Prediction.from_dict(data)
            if event.event == "status":
                current = replace(current, status=str(data.get("status", current.status)), preview=None)
            elif event.event == "progress":
                current = replace(current, step=data.get("step"), total=data.get("total"),
                                  eta_s=data.get("eta_s"), preview=None)
            elif event.event == "preview":
                current = replace(current, preview=data.get("image"))
            if event.event in ("status", "progress", "preview"):
                emit(current)
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None  # the stream ended without `done`

    def _wait_poll(self, pid: str, deadline: float | None, timeout: float | None,
                   emit: Callable[[ProgressEvent], None], interval: float) -> Prediction:
        last: tuple[Any, ...] | None = None
        while True:
            prediction = self.get(pid)
            if prediction.done:
                return prediction
            event = ProgressEvent.of(prediction, "poll")
            if (event.status, event.step, event.total) != last:
                last = (event.status, event.step, event.total)
                emit(event)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(prediction, pid, timeout or 0.0)
                time.sleep(min(interval, remaining))
            else:
                time.sleep(interval)

    # --- results ---

    def download(self, prediction: Prediction | str,
                 target: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = ".") -> builtins.list[Path]:
        """Write a completed prediction's images to disk and return their paths.

        ``target``: a directory (an existing one, or a path ending in ``/`` or without a suffix; created if
        needed) gets ``<id>.<ext>``, or ``<id>_<i>.<ext>`` for several images; a file path is used for one
        image and becomes ``<stem>_<i><suffix>`` for several; a list gives one path per output. Output URLs
        are fetched without the API key (they are signed), ``data:`` outputs are decoded.

        Raises :class:`PredictionFailed` unless the prediction completed.
        """
        pred = prediction if isinstance(prediction, Prediction) and prediction.done else self.get(prediction)
        pred.raise_for_status()
        paths = _output_paths(pred, target)
        for url, path in zip(pred.outputs, paths, strict=True):
            data = _data_uri_bytes(url) if url.startswith("data:") else \
                self._request("GET", url, auth=not url.startswith(("http://", "https://"))).content
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return paths


def _submit_body(prompt: str, urls: Sequence[str], keep_original_aspect: bool,
                 options: SubmitOptions) -> dict[str, Any]:
    """The generateImage body: the options given, none of those left at None (the server's defaults)."""
    size = options.get("image_size")
    body: dict[str, Any] = {
        "model": options.get("model", DEFAULT_MODEL), "prompt": prompt,
        "image_size": f"{size[0]}x{size[1]}" if isinstance(size, tuple) else size,
        "num_inference_steps": options.get("num_inference_steps"), "guidance_scale": options.get("guidance_scale"),
        "seed": options.get("seed"), "output_format": options.get("output_format"),
        "num_images": options.get("num_images"), "webhook_url": options.get("webhook_url"),
    }
    body = {k: v for k, v in body.items() if v is not None}
    if urls:
        body["reference_image_urls"] = builtins.list(urls)
    if keep_original_aspect:
        body["keep_original_aspect"] = True
    if options.get("snap_to_native"):
        body["snap_to_native"] = True
    if options.get("refine_prompt"):
        body["refine_prompt"] = True
    if options.get("seam_smoothing"):
        seams = options["seam_smoothing"]
        body["seam_smoothing"] = {} if seams is True else dict(seams)
    if options.get("cache", "off") != "off":
        body["cache"] = options["cache"]
    if options.get("layout_boxes") is not None:
        body["layout_boxes"] = [builtins.list(box) for box in options["layout_boxes"]]
    if options.get("base64_output"):
        body["enable_base64_output"] = True
    if options.get("loras"):
        body["loras"] = [_lora_entry(item) for item in options["loras"]]
    return body


def _lora_entry(item: str | tuple[str, float] | Mapping[str, Any]) -> dict[str, Any]:
    """One of `loras` as the API takes it: {"path": ..., "scale": ...}."""
    if isinstance(item, str):
        return {"path": item}
    if isinstance(item, Mapping):
        return dict(item)
    path, scale = item
    return {"path": path, "scale": scale}
