"""Reference-image fetching: address checks before any connection, redirects, caps, decoding.

Only loopback traffic: the server binds 127.0.0.1, and every test that expects a rejection also
forbids `httpx.AsyncClient.send`, so a wrong acceptance fails loudly instead of connecting anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image

from hidream.service.errors import BadRequest
from hidream.service.fetch import (
    FetchPolicy,
    check_image,
    decode_data_uri,
    fetch_image,
    is_public_address,
    _pinned_request,
)

if TYPE_CHECKING:  # the fixture's type (conftest is not imported: tests/ has two conftest modules)
    from conftest import ImageServer

FIELD = "reference_image_urls[1]"
LOOPBACK_OK = FetchPolicy(timeout_s=2.0, allow_networks=("127.0.0.1/32",))


def _encode(fmt: str, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 60) if mode == "RGB" else 0).save(buf, format=fmt)
    return buf.getvalue()


PNG, WEBP = _encode("PNG"), _encode("WEBP")


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to send a request fails the test (the check must come before connecting)."""

    async def forbidden(self: httpx.AsyncClient, request: httpx.Request, **kwargs: object) -> None:
        raise AssertionError(f"tried to connect to {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", forbidden)


async def _no_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolver called for {host}")


def _fetch(url: str, policy: FetchPolicy = LOOPBACK_OK, resolver=None) -> bytes:
    return asyncio.run(fetch_image(url, policy, FIELD, resolver))


def _rejected(url: str, policy: FetchPolicy = LOOPBACK_OK, resolver=None) -> str:
    with pytest.raises(BadRequest) as info:
        _fetch(url, policy, resolver)
    message = info.value.message
    assert message.startswith(f"{FIELD}: "), message
    assert info.value.status == 400
    return message


# --- successful fetches -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "fmt", "ctype"), [
    ("/ok.png", "PNG", "image/png"), ("/ok.jpg", "JPEG", "image/jpeg"), ("/ok.webp", "WEBP", "image/webp"),
])
def test_fetch_allowed_loopback(image_server: ImageServer, path: str, fmt: str, ctype: str) -> None:
    body = _fetch(image_server.url(path))
    info = check_image(body, LOOPBACK_OK, FIELD)
    assert (info.format, info.width, info.height, info.content_type) == (fmt, 32, 24, ctype)


def test_redirect_followed(image_server: ImageServer) -> None:
    assert _fetch(image_server.url("/redirect-ok")) == image_server.png


def test_redirect_to_allowlisted_name(image_server: ImageServer) -> None:
    # localhost resolves to loopback only; with loopback allow-listed, the redirect target is fine.
    policy = FetchPolicy(timeout_s=2.0, allow_networks=("127.0.0.1/32", "::1/128"))
    assert _fetch(image_server.url("/redirect-loopback-name"), policy) == image_server.png


# --- address checks, before any connection ------------------------------------------------------


def test_loopback_rejected_without_allowlist(image_server: ImageServer) -> None:
    before = image_server.count()
    message = _rejected(image_server.url("/ok.png"), FetchPolicy())
    assert f"http://127.0.0.1:{image_server.port}/ok.png" in message
    assert "resolves to 127.0.0.1, a loopback address, which is not allowed" in message
    message = _rejected(f"http://localhost:{image_server.port}/ok.png", FetchPolicy())
    assert "loopback address" in message
    message = _rejected(f"http://2130706433:{image_server.port}/ok.png", FetchPolicy())  # 127.0.0.1 as a number
    assert "loopback address" in message
    assert image_server.count() == before


def test_resolver_answer_checked(no_connect: None) -> None:
    async def evil(host: str, port: int) -> list[str]:
        assert (host, port) == ("evil.example", 80)
        return ["127.0.0.1"]

    assert "resolves to 127.0.0.1, a loopback address" in _rejected("http://evil.example/x.png", FetchPolicy(), evil)


def test_every_resolved_address_checked(no_connect: None) -> None:
    async def mixed(host: str, port: int) -> list[str]:
        return ["127.0.0.1", "10.0.0.1"]

    message = _rejected("http://mixed.example/x.png", LOOPBACK_OK, mixed)
    assert "resolves to 10.0.0.1, a private address" in message


@pytest.mark.parametrize(("host", "kind"), [
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("[::1]", "loopback"),
    ("[fe80::1]", "link-local"),
    ("[::ffff:127.0.0.1]", "loopback"),
    ("[::ffff:10.0.0.1]", "private"),
    ("100.64.0.1", "non-public"),
    ("240.0.0.1", "reserved"),
])
def test_non_public_literals_rejected(no_connect: None, host: str, kind: str) -> None:
    message = _rejected(f"http://{host}/x.png", FetchPolicy(), _no_resolve)
    assert f"http://{host}/x.png" in message
    assert f"{kind} address, which is not allowed" in message


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://127.0.0.1/x.png", "not an http or https URL"),
    ("file:///etc/passwd", "not an http or https URL"),
    ("not a url", "not an http or https URL"),
    ("http:///x.png", "has no host"),
    ("http://user:pw@127.0.0.1/", "must not contain credentials"),
])
def test_bad_urls_rejected(no_connect: None, url: str, why: str) -> None:
    assert why in _rejected(url, LOOPBACK_OK, _no_resolve)


def test_long_url_truncated_in_message(no_connect: None) -> None:
    message = _rejected("http://10.0.0.1/" + "a" * 500, FetchPolicy(), _no_resolve)
    assert len(message) < 400 and "..." in message


# --- redirects ----------------------------------------------------------------------------------


def test_redirect_target_rechecked(image_server: ImageServer) -> None:
    message = _rejected(image_server.url("/redirect-private"))
    assert "redirected to http://10.0.0.1/x.png" in message
    assert "10.0.0.1, a private address, which is not allowed" in message


def test_redirect_loop(image_server: ImageServer) -> None:
    before = image_server.count()
    assert "too many redirects" in _rejected(image_server.url("/redirect-loop"))
    assert image_server.count() - before == 4  # the request and 3 redirects


# --- responses ----------------------------------------------------------------------------------


def test_not_an_image(image_server: ImageServer) -> None:
    message = _rejected(image_server.url("/text"))
    assert image_server.url("/text") in message and "not a PNG, JPEG or WebP image" in message


def test_http_error_status(image_server: ImageServer) -> None:
    assert _rejected(image_server.url("/missing")) == f"{FIELD}: {image_server.url('/missing')} returned HTTP 404"


def test_size_cap(image_server: ImageServer) -> None:
    cap = len(image_server.png) + 100  # /big serves that PNG and 5000 more bytes
    message = _rejected(image_server.url("/big"), FetchPolicy(timeout_s=2.0, max_bytes=cap,
                                                               allow_networks=("127.0.0.1/32",)))
    assert f"over the {cap}-byte limit" in message


def test_timeout(image_server: ImageServer) -> None:
    message = _rejected(image_server.url("/slow"), FetchPolicy(timeout_s=0.5, allow_networks=("127.0.0.1/32",)))
    assert image_server.url("/slow") in message and "timed out" in message


def test_pixel_cap(image_server: ImageServer) -> None:
    policy = FetchPolicy(timeout_s=2.0, max_pixels=1_000_000, allow_networks=("127.0.0.1/32",))
    message = _rejected(image_server.url("/bomb"), policy)
    assert "8000x8000" in message and "over the 1000000-pixel limit" in message


def test_truncated(image_server: ImageServer) -> None:
    message = _rejected(image_server.url("/truncated"))
    assert image_server.url("/truncated") in message and "could not be decoded" in message


# --- request construction -----------------------------------------------------------------------


def test_pinned_request_uses_ip_host_header_and_sni() -> None:
    async def build() -> tuple[httpx.Request, httpx.Request]:
        async with httpx.AsyncClient() as client:
            https = _pinned_request(client, httpx.URL("https://images.example.com/a.png?x=1"),
                                    ipaddress.ip_address("93.184.216.34"))
            http = _pinned_request(client, httpx.URL("http://images.example.com:8080/a.png"),
                                   ipaddress.ip_address("2606:2800:220:1::1"))
            return https, http

    https, http = asyncio.run(build())
    assert str(https.url) == "https://93.184.216.34/a.png?x=1"
    assert https.headers["Host"] == "images.example.com"
    assert https.extensions["sni_hostname"] == "images.example.com"
    assert str(http.url) == "http://[2606:2800:220:1::1]:8080/a.png"
    assert http.headers["Host"] == "images.example.com:8080"
    assert "sni_hostname" not in http.extensions


# --- check_image and data URIs ------------------------------------------------------------------


def test_check_image_direct() -> None:
    assert check_image(WEBP, FetchPolicy(), FIELD).format == "WEBP"
    gif = _encode("GIF")
    with pytest.raises(BadRequest, match="not a PNG, JPEG or WebP image"):
        check_image(gif, FetchPolicy(), FIELD)
    with pytest.raises(BadRequest, match="over the 10-byte limit"):
        check_image(PNG, FetchPolicy(max_bytes=10), FIELD)


def test_data_uri_ok() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    data = decode_data_uri(uri, FetchPolicy(), FIELD)
    assert data == PNG and check_image(data, FetchPolicy(), FIELD).format == "PNG"


@pytest.mark.parametrize(("uri", "why"), [
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png;base64,***not base64***", "not valid base64"),
    ("data:image/png;base64,aGVsbG8", "not valid base64"),
    ("data:image/png,%89PNG", "must be base64"),
    ("http://x/y.png", "not a data URI"),
])
def test_data_uri_rejected(uri: str, why: str) -> None:
    with pytest.raises(BadRequest) as info:
        decode_data_uri(uri, FetchPolicy(), FIELD)
    assert info.value.message.startswith(f"{FIELD}: ") and why in info.value.message


def test_data_uri_size_cap() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with pytest.raises(BadRequest, match="over the 20-byte limit"):
        decode_data_uri(uri, FetchPolicy(max_bytes=20), FIELD)
    # Decodes within the cap but is not an image: the image check reports it.
    with pytest.raises(BadRequest, match="not a PNG, JPEG or WebP image"):
        check_image(decode_data_uri("data:image/png;base64,aGVsbG8=", FetchPolicy(), FIELD), FetchPolicy(), FIELD)


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("2001:4860:4860::8888", True),
    ("127.0.0.1", False),
    ("10.1.2.3", False),
    ("172.31.255.255", False),
    ("192.168.0.1", False),
    ("169.254.169.254", False),
    ("100.64.0.1", False),
    ("0.0.0.0", False),
    ("224.0.0.1", False),
    ("255.255.255.255", False),
    ("240.0.0.1", False),
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    ("fc00::1", False),
    ("ff02::1", False),
    ("::ffff:127.0.0.1", False),
    ("::ffff:8.8.8.8", True),
    ("2002:0a00:0001::", False),  # 6to4 of 10.0.0.1
    ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
])
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


# --- the connected peer and TLS -----------------------------------------------------------------


def test_connected_peer_is_checked(image_server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import hidream.service.fetch as fetch

    seen: list[object] = []
    real_peer = fetch._peer

    def spy(response: httpx.Response) -> object:
        seen.append(real_peer(response))
        return seen[-1]

    monkeypatch.setattr(fetch, "_peer", spy)
    assert _fetch(image_server.url("/ok.png")) == image_server.png
    assert seen == [ipaddress.ip_address("127.0.0.1")]  # httpx exposes the peer, and it was checked

    monkeypatch.setattr(fetch, "_peer", lambda response: ipaddress.ip_address("10.9.9.9"))
    message = _rejected(image_server.url("/ok.png"))
    assert "connected to 10.9.9.9, a private address, which is not allowed" in message


def _openssl(tmp: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_connects_to_ip_but_verifies_name(image_server: ImageServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The TLS server name and certificate check use the URL's host, although the socket goes to the IP.

    It serves over TLS, so it starts a second server of the shared one's class (and stops it).
    """
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(tmp_path, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca")
    _openssl(tmp_path, "req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=images.test")
    (tmp_path / "ext").write_text("subjectAltName=DNS:images.test\n")
    _openssl(tmp_path, "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "srv.pem", "-days", "1", "-extfile", "ext")
    tls_names: list[str | None] = []
    srv = type(image_server)()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    context.sni_callback = lambda sock, name, ctx: tls_names.append(name)
    srv.httpd.socket = context.wrap_socket(srv.httpd.socket, server_side=True)
    srv.start()
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    real_init = httpx.AsyncClient.__init__

    def init(self: httpx.AsyncClient, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **{**kwargs, "verify": client_context})

    monkeypatch.setattr(httpx.AsyncClient, "__init__", init)

    async def to_loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    try:
        assert _fetch(f"https://images.test:{srv.port}/ok.png", resolver=to_loopback) == srv.png
        assert tls_names == ["images.test"]
        message = _rejected(f"https://other.test:{srv.port}/ok.png", resolver=to_loopback)
        assert "could not be fetched" in message and "other.test" in message
    finally:
        srv.close()
