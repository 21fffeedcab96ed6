"""S3-compatible storage (HIDREAM_STORAGE_URL=s3://bucket/prefix) against moto's standalone S3 server.

Network rule: only loopback. The moto server binds 127.0.0.1 on a free port; every client is given that
endpoint and dummy credentials (so boto3 never looks for credentials elsewhere, e.g. an instance
metadata service). moto does not enforce the expiry of presigned URLs, which S3 and MinIO do, so the
test server adds that one check (`s3_expiry`); everything else is moto's.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hidream.cli import main
from hidream.service.app import create_app
from hidream.service.errors import NotFound, ServiceError
from hidream.service.settings import Settings
from hidream.service.storage import LocalStorage, S3Storage, open_storage
from hidream.service.store import Store
from hidream.service.worker import Worker

BUCKET = "hidream-test"
REGION = "us-east-1"
MODEL = "hidream-o1-image"
BASE_URL = "http://127.0.0.1:8000"


def png(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()


def s3_expiry(app: Any) -> Any:
    """WSGI middleware: S3's "Request has expired" (403) for a presigned URL past X-Amz-Date + X-Amz-Expires."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "X-Amz-Expires" in query and "X-Amz-Date" in query:
            signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            if time.time() > signed.timestamp() + int(query["X-Amz-Expires"][0]):
                body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                        b"<Message>Request has expired</Message></Error>")
                start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(body)))])
                return [body]
        return app(environ, start_response)

    return wrapped


@dataclass
class S3:
    endpoint: str
    client: Any  # a boto3 client with full access, for the tests' own checks

    def settings(self, home: Path, prefix: str, **changes: Any) -> Settings:
        values: dict[str, Any] = dict(
            home=home, database_url=f"sqlite:///{home}/db.sqlite", storage_url=f"s3://{BUCKET}/{prefix}",
            s3_endpoint_url=self.endpoint, s3_region=REGION, s3_access_key_id="test",
            s3_secret_access_key="test", fetch_allow=())
        return Settings(**(values | changes))

    def keys(self, prefix: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
        return sorted(o["Key"] for o in listed.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254 for credentials
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            wsgi = server._server  # werkzeug's server: its handlers call `.app`
            wsgi.app = s3_expiry(wsgi.app)
            host, port = server.get_host_and_port()
            assert host == "127.0.0.1"
            endpoint = f"http://127.0.0.1:{port}"
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="test",
                aws_secret_access_key="test")
            client.create_bucket(Bucket=BUCKET)
            yield S3(endpoint, client)
        finally:
            server.stop()


def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the storage ----------------------------------------------------------------------------------------------


def test_round_trip_under_the_prefix(s3: S3, tmp_path: Path) -> None:
    p = prefix()
    storage = open_storage(s3.settings(tmp_path, p))
    assert isinstance(storage, S3Storage) and (storage.bucket, storage.prefix) == (BUCKET, p)
    assert s3.keys(p) == []  # the start-up write probe left nothing behind
    storage.put("outputs/abc/0.png", PNG)
    storage.put("uploads/def.webp", b"webp bytes")
    assert s3.keys(p) == [f"{p}/outputs/abc/0.png", f"{p}/uploads/def.webp"]
    assert storage.get("outputs/abc/0.png") == PNG and s3.read(f"{p}/outputs/abc/0.png") == PNG
    head = s3.client.head_object(Bucket=BUCKET, Key=f"{p}/outputs/abc/0.png")
    assert head["ContentType"] == "image/png"
    assert s3.client.head_object(Bucket=BUCKET, Key=f"{p}/uploads/def.webp")["ContentType"] == "image/webp"
    storage.put("outputs/abc/0.png", b"replaced")
    assert storage.get("outputs/abc/0.png") == b"replaced"
    storage.delete("outputs/abc/0.png")
    storage.delete("outputs/abc/0.png")  # deleting twice is no error
    assert s3.keys(p) == [f"{p}/uploads/def.webp"]


def test_a_missing_or_malformed_key_is_not_found(s3: S3, tmp_path: Path) -> None:
    storage = open_storage(s3.settings(tmp_path, prefix()))
    with pytest.raises(NotFound):
        storage.get("outputs/nothing/0.png")
    with pytest.raises(NotFound):
        storage.get("../escape.png")


def test_public_url_is_presigned_and_expires(s3: S3, tmp_path: Path) -> None:
    p = prefix()
    storage = open_storage(s3.settings(tmp_path, p, url_ttl_s=2))
    storage.put("outputs/abc/0.png", PNG)
    url = storage.public_url("outputs/abc/0.png")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}" == s3.endpoint and parts.path == f"/{BUCKET}/{p}/outputs/abc/0.png"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["2"]
    assert query["X-Amz-Credential"][0].startswith("test/")
    # Anyone holding the URL can download, with no credentials ...
    got = httpx.get(url)
    assert got.status_code == 200 and got.content == PNG and got.headers["content-type"] == "image/png"
    # ... and no one without the signature.
    assert httpx.get(f"{s3.endpoint}/{BUCKET}/{p}/outputs/abc/0.png").status_code == 403
    # X-Amz-Date has whole seconds, so a TTL of 2 s leaves 1 to 2 s: wait past it.
    time.sleep(3.1)
    late = httpx.get(url)
    assert late.status_code == 403 and b"expired" in late.content


def test_local_storage_has_no_public_url(tmp_path: Path) -> None:
    storage = open_storage(Settings(home=tmp_path))
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path / "storage"
    assert storage.public_url("outputs/abc/0.png") is None
    for url in (str(tmp_path / "elsewhere"), f"file://{tmp_path / 'elsewhere'}"):
        local = open_storage(Settings(home=tmp_path, storage_url=url))
        assert isinstance(local, LocalStorage) and local.root == tmp_path / "elsewhere"


# --- refusing to start ----------------------------------------------------------------------------------------


def test_a_missing_bucket_is_refused(s3: S3, tmp_path: Path) -> None:
    settings = s3.settings(tmp_path, "p", storage_url="s3://no-such-bucket/p")
    with pytest.raises(ServiceError) as err:
        open_storage(settings)
    assert err.value.message.startswith("HIDREAM_STORAGE_URL: cannot use s3://no-such-bucket/p: ")
    assert "'no-such-bucket' does not exist" in err.value.message


def test_a_bucket_without_write_access_is_refused(s3: S3, tmp_path: Path) -> None:
    import json

    s3.client.create_bucket(Bucket="read-only")
    s3.client.put_bucket_policy(Bucket="read-only", Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                       "Resource": "arn:aws:s3:::read-only/*"}]}))
    with pytest.raises(ServiceError) as err:
        open_storage(s3.settings(tmp_path, "x", storage_url="s3://read-only/x"))
    assert err.value.message.startswith("HIDREAM_STORAGE_URL: cannot use s3://read-only/x: ")
    assert "writing a test object 'x/.hidream-probe-" in err.value.message and "access denied" in err.value.message


def test_an_unreachable_endpoint_is_refused_quickly(s3: S3, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        open_storage(s3.settings(tmp_path, "p", s3_endpoint_url=endpoint))
    assert time.monotonic() - started < 10
    assert err.value.message.startswith(f"HIDREAM_STORAGE_URL: cannot use s3://{BUCKET}/p: ")
    assert endpoint in err.value.message


@pytest.mark.parametrize(("changes", "says"), [
    ({"storage_url": "gs://bucket/p"}, "expected s3://bucket/optional/prefix"),
    ({"storage_url": "http://127.0.0.1:1/bucket"}, "expected s3://bucket/optional/prefix"),
    ({"storage_url": "s3:///p"}, "expected s3://bucket/optional/prefix"),
    ({"storage_url": "s3:bucket"}, "expected s3://bucket/optional/prefix"),
    ({"s3_secret_access_key": None}, "HIDREAM_S3_SECRET_ACCESS_KEY"),
])
def test_bad_configurations_name_the_variable(s3: S3, tmp_path: Path, changes: dict, says: str) -> None:
    with pytest.raises(ServiceError, match="^HIDREAM_STORAGE_URL: ") as err:
        open_storage(s3.settings(tmp_path, "p", **changes))
    assert says in err.value.message


def test_a_ttl_over_seven_days_is_refused(s3: S3, tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="^HIDREAM_URL_TTL_S: cannot use 604801 with s3://"):
        open_storage(s3.settings(tmp_path, "p", url_ttl_s=7 * 24 * 3600 + 1))


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_commands_refuse_to_start_on_a_bad_bucket(s3: S3, tmp_path: Path, command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIDREAM_", "AWS_"))}
    env |= {"HIDREAM_HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true", "HIDREAM_S3_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.run(
        [sys.executable, "-m", "hidream.cli", command, "--storage-url", "s3://missing-bucket",
         "--s3-endpoint-url", s3.endpoint, "--s3-region", REGION, "--s3-access-key-id", "test",
         *(["--port", "0"] if command == "serve" else [])],  # serve binds its port first: any free one
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: HIDREAM_STORAGE_URL: cannot use s3://missing-bucket: bucket 'missing-bucket' does not exist" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_main_in_process_says_why(s3: S3, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIDREAM_HOME", str(tmp_path))
    monkeypatch.setenv("HIDREAM_S3_SECRET_ACCESS_KEY", "test")  # a secret is never a flag's value (ps shows those)
    rc = main(["worker", "--storage-url", f"s3://{BUCKET}/p", "--s3-endpoint-url",
               f"http://127.0.0.1:{closed_port()}", "--s3-region", REGION, "--s3-access-key-id", "test"])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"error: HIDREAM_STORAGE_URL: cannot use s3://{BUCKET}/p: ")


# --- the API over S3 ------------------------------------------------------------------------------------------


@dataclass
class Result:
    images: list


class SolidEngine:
    """One solid image per requested image, at the requested size."""

    def generate(self, request, progress=None, should_cancel=None):
        for i in range(1, request.steps + 1):
            if progress is not None:
                progress(i, request.steps, lambda: None)
        return Result([Image.new("RGB", (request.width, request.height), (10 + i * 40, 90, 160))
                       for i in range(request.num_images)])


def wait_completed(client: TestClient, task_id: str, headers: dict[str, str], timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = client.get(f"/api/v1/model/prediction/{task_id}", headers=headers).json()["data"]
        if data["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_api_end_to_end_over_s3(s3: S3, tmp_path: Path, loopback_only: None) -> None:
    p = "p"
    settings = s3.settings(tmp_path, p)
    store = Store.open(settings.db_url)
    storage = open_storage(settings)
    worker = Worker(settings, store, storage, SolidEngine, poll_s=0.05)
    app = create_app(settings, store, storage, worker)
    _, token = store.create_key("s3")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with TestClient(app, base_url=BASE_URL) as client:
            # A reference given as a data: URI is kept in the bucket.
            body = {"model": MODEL, "prompt": "a red fox", "image_size": "256x256", "num_inference_steps": 2,
                    "num_images": 2,
                    "reference_image_urls": [f"data:image/png;base64,{base64.b64encode(PNG).decode()}"]}
            resp = client.post("/api/v1/model/generateImage", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            task_id = resp.json()["data"]["id"]
            assert s3.read(f"{p}/references/{task_id}/0.png") == PNG

            # The worker stores the outputs in the bucket; the prediction links to them by presigned URL.
            data = wait_completed(client, task_id, headers)
            assert data["status"] == "completed", data["error"]
            assert s3.keys(f"{p}/outputs/{task_id}") == [f"{p}/outputs/{task_id}/0.png", f"{p}/outputs/{task_id}/1.png"]
            assert len(data["outputs"]) == 2
            for i, url in enumerate(data["outputs"]):
                assert url.startswith(f"{s3.endpoint}/{BUCKET}/{p}/outputs/{task_id}/{i}.png?")
                assert "X-Amz-Signature=" in url and "/files/" not in url
                got = httpx.get(url)  # no credentials, no API key
                assert got.status_code == 200 and got.headers["content-type"] == "image/png"
                assert got.content == s3.read(f"{p}/outputs/{task_id}/{i}.png")
                image = Image.open(io.BytesIO(got.content))
                assert (image.format, image.size) == ("PNG", (256, 256))
                assert image.getpixel((0, 0)) == (10 + i * 40, 90, 160)

            # base64 output reads the bucket through the app.
            resp = client.post("/api/v1/model/generateImage", headers=headers, json={
                "model": MODEL, "prompt": "inline", "image_size": "256x256", "num_inference_steps": 1,
                "enable_base64_output": True, "enable_sync_mode": True})
            inline = resp.json()["data"]
            assert inline["status"] == "completed" and inline["outputs"][0].startswith("data:image/png;base64,")

            # Uploads keep their app-signed /files URL, served from the bucket.
            up = client.post("/api/v1/model/uploadMedia", headers=headers,
                             files={"file": ("ref.png", PNG, "image/png")})
            assert up.status_code == 200, up.text
            url = up.json()["data"]["url"]
            assert url.startswith(f"{BASE_URL}/files/uploads/")
            blob = urlsplit(url).path.removeprefix("/files/")
            assert s3.read(f"{p}/{blob}") == PNG
            assert client.get(url).content == PNG
    finally:
        store.engine.dispose()
