"""What every router shares: one `ApiContext` per app, the API-key dependency and the response envelope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from hidream.service.errors import Unauthorized
from hidream.service.fetch import FetchPolicy
from hidream.service.predictions import Renderer
from hidream.service.settings import Settings
from hidream.service.storage import Storage, UrlSigner
from hidream.service.store import TERMINAL, Limits, Store
from hidream.service.worker import Worker

AUTH_HINT = "send Authorization: Bearer <key>"


@dataclass(frozen=True)
class ApiContext:
    """The app's long-lived parts, built once by `create_app` and handed to every route."""

    settings: Settings
    store: Store
    storage: Storage
    worker: Worker | None
    signer: UrlSigner
    policy: FetchPolicy
    renderer: Renderer
    limits: Limits

    @classmethod
    def build(cls, settings: Settings, store: Store, storage: Storage, worker: Worker | None) -> ApiContext:
        signer = UrlSigner(settings.signing_secret(), settings.base_url, settings.url_ttl_s)
        policy = FetchPolicy(timeout_s=settings.fetch_timeout_s, max_bytes=settings.max_upload_bytes,
                             max_pixels=settings.max_upload_pixels, allow_networks=settings.fetch_allow)
        return cls(settings, store, storage, worker, signer, policy, Renderer(settings, store, storage, signer),
                   Limits(settings.rate_per_minute, settings.max_concurrent))

    def key_for_header(self, authorization: str | None) -> str:
        """The API key id of an `Authorization` header's value; Unauthorized saying what is wrong with it."""
        if authorization is None or not authorization.strip():
            raise Unauthorized(f"missing API key: {AUTH_HINT}")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            said = "the scheme is missing" if not token else f"the scheme is {scheme[:20]!r}, not Bearer"
            raise Unauthorized(f"Authorization: {said}: {AUTH_HINT}")
        if not token.strip():
            raise Unauthorized(f"Authorization: no key after Bearer: {AUTH_HINT}")
        key_id = self.store.key_for_token(token.strip())
        if key_id is None:
            raise Unauthorized("invalid or revoked API key")
        return key_id


def context_of(request: Request) -> ApiContext:
    return request.app.state.ctx


async def context(request: Request) -> ApiContext:
    """The `Ctx` dependency (async: FastAPI runs a plain def dependency in the thread pool, a hop per request)."""
    return context_of(request)


Ctx = Annotated[ApiContext, Depends(context)]
# Documents the scheme in /openapi.json; the header itself is read by `api_key`, which says what is wrong.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


def api_key(ctx: Ctx, request: Request, _scheme: Annotated[Any, Depends(_bearer)]) -> str:
    """The id of the request's API key (the routes that need one take `Key`)."""
    return ctx.key_for_header(request.headers.get("authorization"))


Key = Annotated[str, Depends(api_key)]


def envelope(data: Any, status: int = 200, message: str = "success", **extra: Any) -> JSONResponse:
    """Every native response: `{"code", "message", "data"}` (plus `extra` keys at the top level)."""
    return JSONResponse({"code": status, "message": message, "data": data, **extra}, status_code=status)
