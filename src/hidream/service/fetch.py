"""Reference images for generation requests: `data:` URIs and http(s) URLs fetched safely; files (LoRAs) too.

A URL is fetched only if every address its host resolves to is public (or inside the operator's
allow-list); the connection goes to a validated IP itself (the original name travels in the `Host`
header and as the TLS SNI / certificate name), so DNS cannot change the answer between the check
and the connect. Redirects are followed by hand and every hop is checked again. Every failure is a
`BadRequest` whose message starts with the request field and names the URL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from hidream.service.errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for reference images; `allow_networks` are CIDRs allowed even if non-public."""

    timeout_s: float = 10.0  # connect and read, and the whole download
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_redirects: int = 3
    allow_networks: tuple[str, ...] = ()  # e.g. ("127.0.0.1/32",)

    def __post_init__(self) -> None:
        for cidr in self.allow_networks:
            ipaddress.ip_network(cidr, strict=False)  # ValueError on a bad operator setting

    def allows(self, ip: IPAddress) -> bool:
        """True if `ip` (or the IPv4 address it maps) is public or inside `allow_networks`."""
        if is_public_address(ip):
            return True
        candidates = [ip] + ([ip.ipv4_mapped] if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else [])
        nets = [ipaddress.ip_network(c, strict=False) for c in self.allow_networks]
        return any(a.version == n.version and a in n for a in candidates for n in nets)


@dataclass(frozen=True)
class ImageInfo:
    """What `check_image` found: the format and size of a decoded image."""

    format: str  # "PNG" | "JPEG" | "WEBP"
    width: int
    height: int
    content_type: str  # image/png, image/jpeg, image/webp


def _short(url: str, limit: int = 200) -> str:
    return url if len(url) <= limit else url[:limit] + "..."


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; IPv6 carrying an IPv4 address is judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
        if ip.ipv4_mapped is not None:
            return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _kind(ip: IPAddress) -> str:
    """A word for why `ip` is not public, e.g. "a loopback address"."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return _kind(inner)
    for attr, words in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    ):
        if getattr(ip, attr):
            return words
    return "a non-public address"


def check_image(data: bytes, policy: FetchPolicy, field: str) -> ImageInfo:
    """Decode `data` fully as a PNG, JPEG or WebP image within the size and pixel caps."""
    if len(data) > policy.max_bytes:
        raise BadRequest(f"{field}: image is {len(data)} bytes, over the {policy.max_bytes}-byte limit")
    try:
        with Image.open(io.BytesIO(data), formats=list(_FORMATS)) as img:
            fmt, (width, height) = img.format or "", img.size
            if fmt not in _FORMATS:
                raise BadRequest(f"{field}: not a PNG, JPEG or WebP image")
            if width <= 0 or height <= 0:
                raise BadRequest(f"{field}: image has no pixels ({width}x{height})")
            if width * height > policy.max_pixels:
                raise BadRequest(
                    f"{field}: image is {width}x{height} = {width * height} pixels, "
                    f"over the {policy.max_pixels}-pixel limit"
                )
            img.load()
    except BadRequest:
        raise
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"{field}: image is over the pixel limit ({exc})") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(f"{field}: not a PNG, JPEG or WebP image") from None
    except Exception as exc:  # truncated or corrupt data: Pillow raises OSError, ValueError, SyntaxError...
        raise BadRequest(f"{field}: image could not be decoded ({exc})") from None
    return ImageInfo(format=fmt, width=width, height=height, content_type=_FORMATS[fmt])


def decode_data_uri(uri: str, policy: FetchPolicy, field: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI (not yet checked as an image)."""
    if not uri[:5].lower() == "data:" or "," not in uri:
        raise BadRequest(f"{field}: not a data URI (expected data:image/...;base64,...)")
    header, payload = uri[5:].split(",", 1)
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or "text/plain"
    if not media.startswith("image/"):
        raise BadRequest(f"{field}: data URI has media type {_short(media, 60)}, which is not an image")
    if "base64" not in params[1:]:
        raise BadRequest(f"{field}: data URI must be base64-encoded (data:image/...;base64,...)")
    if len(payload) > (policy.max_bytes + 2) // 3 * 4 + 4:
        raise BadRequest(f"{field}: data URI is over the {policy.max_bytes}-byte limit")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: data URI is not valid base64") from None
    if len(data) > policy.max_bytes:
        raise BadRequest(f"{field}: data URI is {len(data)} bytes, over the {policy.max_bytes}-byte limit")
    return data


async def _default_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _parse_url(url: str, field: str, schemes: tuple[str, ...] = ("http", "https")) -> httpx.URL:
    """Parse and vet the form of `url` (scheme, host, no credentials)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BadRequest(f"{field}: {_short(url)} is not a valid URL ({exc})") from None
    if parsed.scheme not in schemes:
        raise BadRequest(f"{field}: {_short(url)} is not an {' or '.join(schemes)} URL")
    if not parsed.host:
        raise BadRequest(f"{field}: {_short(url)} has no host")
    if parsed.userinfo:
        raise BadRequest(f"{field}: {_short(url)} must not contain credentials")
    return parsed


async def _validated_addresses(
    url: httpx.URL, policy: FetchPolicy, field: str, resolver: Resolver, shown: str
) -> list[IPAddress]:
    """Every address `url`'s host resolves to, all of them checked against the policy."""
    host = url.raw_host.decode("ascii")
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            found = await resolver(host, url.port or (443 if url.scheme == "https" else 80))
        except (OSError, UnicodeError) as exc:
            raise BadRequest(f"{field}: {shown} could not be resolved ({exc})") from None
        try:
            ips = [ipaddress.ip_address(a) for a in found]
        except ValueError as exc:
            raise BadRequest(f"{field}: {shown} could not be resolved ({exc})") from None
        if not ips:
            raise BadRequest(f"{field}: {shown} could not be resolved (no addresses)")
    for ip in ips:
        if not policy.allows(ip):
            raise BadRequest(f"{field}: {shown} resolves to {ip}, {_kind(ip)}, which is not allowed")
    return ips


IMAGE_HEADERS = {"Accept": "image/png, image/jpeg, image/webp", "Accept-Encoding": "identity"}
FILE_HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity"}


def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, ip: IPAddress, method: str = "GET",
                    headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Request:
    """A request for `url` sent to `ip` itself, with the original Host header and TLS server name."""
    headers = dict(IMAGE_HEADERS if headers is None else headers)
    host = url.raw_host.decode("ascii")
    try:
        ipaddress.ip_address(host)
        return client.build_request(method, url, headers=headers, content=content)  # an IP literal already
    except ValueError:
        pass
    headers["Host"] = host if url.port is None else f"{host}:{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return client.build_request(method, url.copy_with(host=str(ip)), headers=headers, content=content,
                                extensions=extensions)


def _peer(response: httpx.Response) -> IPAddress | None:
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("server_addr") if stream is not None else None
    if not addr:
        return None
    try:
        return ipaddress.ip_address(str(addr[0]).split("%")[0])
    except ValueError:
        return None


def _check_headers(response: httpx.Response, policy: FetchPolicy, field: str, shown: str) -> None:
    """Refuse an encoded body, or one whose announced length is over the cap, before reading any of it."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequest(f"{field}: {shown} uses Content-Encoding {encoding[:40]}, which is not supported")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise BadRequest(f"{field}: {shown} is {int(length)} bytes, over the {policy.max_bytes}-byte limit")


async def _read_body(response: httpx.Response, policy: FetchPolicy, field: str, shown: str) -> bytes:
    _check_headers(response, policy, field, shown)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise BadRequest(f"{field}: {shown} is over the {policy.max_bytes}-byte limit")
    return bytes(body)


async def _save_body(response: httpx.Response, policy: FetchPolicy, field: str, shown: str,
                     dest: Path) -> tuple[str, int]:
    """Stream the body into `dest` within the size cap; (sha256 hex, bytes). Hashing and writing run off the
    event loop, a megabyte at a time."""
    _check_headers(response, policy, field, shown)
    digest, size, pending = hashlib.sha256(), 0, bytearray()

    def write(file, chunk: bytes) -> None:
        digest.update(chunk)
        file.write(chunk)

    with dest.open("wb") as file:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > policy.max_bytes:
                raise BadRequest(f"{field}: {shown} is over the {policy.max_bytes}-byte limit")
            pending += chunk
            if len(pending) >= 1 << 20:
                await asyncio.to_thread(write, file, bytes(pending))
                pending.clear()
        await asyncio.to_thread(write, file, bytes(pending))
    return digest.hexdigest(), size


@asynccontextmanager
async def _followed(url: str, policy: FetchPolicy, field: str, resolver: Resolver, headers: dict[str, str],
                    schemes: tuple[str, ...] = ("http", "https")) -> AsyncIterator[tuple[httpx.Response, str]]:
    """The 2xx response at the end of `url`'s redirects (every hop's address checked, and the peer's), unread,
    with how to name it in messages (`URL (redirected to URL2)`)."""
    current, current_text = _parse_url(url, field, schemes), url
    timeout = httpx.Timeout(policy.timeout_s)
    for hop in range(policy.max_redirects + 1):
        shown = _short(url) if hop == 0 else f"{_short(url)} (redirected to {_short(current_text)})"
        ips = await _validated_addresses(current, policy, field, resolver, shown)
        # A fresh client per hop: no pooled connection is ever shared between host names.
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            response, error = None, None
            for ip in ips:
                try:
                    response = await client.send(_pinned_request(client, current, ip, headers=headers), stream=True)
                    break
                except httpx.ConnectError as exc:
                    error = exc
            if response is None:
                raise BadRequest(f"{field}: {shown} could not be fetched ({error})")
            try:
                peer = _peer(response)
                if peer is not None and (peer not in ips or not policy.allows(peer)):
                    raise BadRequest(f"{field}: {shown} connected to {peer}, {_kind(peer)}, which is not allowed")
                if response.status_code in _REDIRECTS and "Location" in response.headers:
                    if hop == policy.max_redirects:
                        raise BadRequest(f"{field}: {_short(url)} made too many redirects (over {policy.max_redirects})")
                    try:
                        target = current.join(response.headers["Location"])
                    except (httpx.InvalidURL, ValueError) as exc:
                        raise BadRequest(f"{field}: {shown} redirected to an invalid URL ({exc})") from None
                    current_text = str(target)
                    try:
                        current = _parse_url(current_text, field, schemes)
                    except BadRequest as exc:
                        raise BadRequest(f"{exc.message} (redirected from {_short(url)})") from None
                    continue
                if not 200 <= response.status_code < 300:
                    raise BadRequest(f"{field}: {shown} returned HTTP {response.status_code}")
                yield response, shown
                return
            finally:
                await response.aclose()
    raise AssertionError("unreachable")


async def _fetch(url: str, policy: FetchPolicy, field: str, resolver: Resolver) -> bytes:
    async with _followed(url, policy, field, resolver, IMAGE_HEADERS) as (response, shown):
        body = await _read_body(response, policy, field, shown)
    try:  # decoding is CPU work: keep it off the event loop
        await asyncio.to_thread(check_image, body, policy, field)
    except BadRequest as exc:
        raise BadRequest(f"{field}: {shown}: {exc.message.removeprefix(f'{field}: ')}") from None
    return body


async def fetch_image(url: str, policy: FetchPolicy, field: str, resolver: Resolver | None = None) -> bytes:
    """Download the image at `url` under `policy`; `BadRequest` naming `field` and the URL on any failure."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy, field, resolver or _default_resolver)
    except (TimeoutError, httpx.TimeoutException):
        raise BadRequest(f"{field}: {_short(url)} timed out after {policy.timeout_s:g} s") from None
    except httpx.InvalidURL as exc:  # not an HTTPError: httpx raises it for a redirect's unparsable Location
        raise BadRequest(f"{field}: {_short(url)} answered with an invalid URL ({exc})") from None
    except httpx.HTTPError as exc:
        raise BadRequest(f"{field}: {_short(url)} could not be fetched ({type(exc).__name__}: {exc})") from None


async def fetch_file(url: str, policy: FetchPolicy, field: str, dest: Path, *, schemes: tuple[str, ...] = ("https",),
                     total_timeout_s: float | None = None, resolver: Resolver | None = None) -> tuple[str, int]:
    """Download `url` into `dest` under `policy`'s address rules and size cap, within `total_timeout_s` (default:
    the policy's timeout); (sha256 hex, bytes). `BadRequest` naming `field` and the URL on any failure, with
    `dest` removed."""
    total = policy.timeout_s if total_timeout_s is None else total_timeout_s
    try:
        async with asyncio.timeout(total):
            async with _followed(url, policy, field, resolver or _default_resolver, FILE_HEADERS, schemes) as (
                    response, shown):
                return await _save_body(response, policy, field, shown, dest)
    except BaseException as exc:
        dest.unlink(missing_ok=True)
        if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
            raise BadRequest(f"{field}: {_short(url)} timed out after {total:g} s") from None
        if isinstance(exc, httpx.InvalidURL):
            raise BadRequest(f"{field}: {_short(url)} answered with an invalid URL ({exc})") from None
        if isinstance(exc, httpx.HTTPError):
            raise BadRequest(f"{field}: {_short(url)} could not be fetched ({type(exc).__name__}: {exc})") from None
        if isinstance(exc, OSError):
            raise BadRequest(f"{field}: {_short(url)} could not be stored ({exc.strerror or exc})") from None
        raise


async def check_target(url: str, policy: FetchPolicy, field: str, resolver: Resolver | None = None) -> None:
    """BadRequest naming `field` unless `url` is an http(s) URL whose every address the policy allows."""
    parsed = _parse_url(url, field)
    try:
        async with asyncio.timeout(policy.timeout_s):
            await _validated_addresses(parsed, policy, field, resolver or _default_resolver, _short(url))
    except TimeoutError:
        raise BadRequest(f"{field}: {_short(url)} could not be resolved in {policy.timeout_s:g} s") from None


async def post(url: str, body: bytes, headers: dict[str, str], policy: FetchPolicy, field: str,
               resolver: Resolver | None = None) -> int:
    """POST `body` to `url` under the same address rules as fetches; the response's status code.

    Redirects are not followed (a 3xx is returned as is). BadRequest when the address is not allowed,
    the connection fails or the answer does not come within the policy's timeout; the response body
    is not read.
    """
    try:
        async with asyncio.timeout(policy.timeout_s):
            parsed = _parse_url(url, field)
            ips = await _validated_addresses(parsed, policy, field, resolver or _default_resolver, _short(url))
            timeout = httpx.Timeout(policy.timeout_s)
            async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
                error: Exception | None = None
                for ip in ips:
                    try:
                        request = _pinned_request(client, parsed, ip, "POST", headers, body)
                        response = await client.send(request, stream=True)
                    except httpx.ConnectError as exc:
                        error = exc
                        continue
                    try:
                        peer = _peer(response)
                        if peer is not None and (peer not in ips or not policy.allows(peer)):
                            raise BadRequest(f"{field}: connected to {peer}, {_kind(peer)}, which is not allowed")
                        return response.status_code
                    finally:
                        await response.aclose()
                raise BadRequest(f"{field}: {_short(url)} could not be reached ({error})")
    except (TimeoutError, httpx.TimeoutException):
        raise BadRequest(f"{field}: {_short(url)} did not answer within {policy.timeout_s:g} s") from None
    except httpx.InvalidURL as exc:  # a 3xx whose Location does not parse: httpx raises even without following
        raise BadRequest(f"{field}: {_short(url)} answered with a redirect to an invalid URL ({exc})") from None
    except httpx.HTTPError as exc:
        raise BadRequest(f"{field}: {_short(url)} failed ({type(exc).__name__}: {exc})") from None
