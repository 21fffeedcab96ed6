"""`hidream serve --tls-cert FILE --tls-key FILE`: https served directly, and start-up refusing what cannot work."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

try:
    from . import server_util as su
except ImportError:
    import server_util as su


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_serve_speaks_https_with_the_certificate_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    procs = su.Processes(tmp_path / "logs")
    try:
        proc = procs.serve(su.service_env(tmp_path / "home", None, tls_cert=cert, tls_key=key), worker=False)
        assert f"HiDream O1 image API on https://127.0.0.1:{proc.port}" in proc.output()
        token = proc.first_key()
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=proc.base_url, verify=trusted, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            (model,) = su.ok(c.get("/api/v1/models"))
            assert model["id"] == "hidream-o1-image"
            data = su.ok(c.post("/api/v1/model/generateImage",
                                json={"model": "hidream-o1-image", "prompt": "x", "image_size": "64x64"}))
            assert data["urls"]["get"].startswith(f"https://127.0.0.1:{proc.port}/")  # links are https too
        with pytest.raises(httpx.ConnectError):  # a client that does not trust it refuses the connection
            httpx.get(proc.base_url + "/healthz", timeout=10)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what docs/deploy.md tells httpx clients to set
        assert httpx.get(proc.base_url + "/healthz", timeout=10).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain http on the https port gets no answer
            httpx.get(f"http://127.0.0.1:{proc.port}/healthz", timeout=10)
    finally:
        procs.stop_all()


def test_serve_refuses_a_certificate_it_cannot_use(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    cases = {
        "only-cert": (["--tls-cert", str(cert)], "HIDREAM_TLS_KEY: is required with HIDREAM_TLS_CERT"),
        "missing": (["--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(key)], "no.pem is not a file"),
        "mismatched": (["--tls-cert", str(cert), "--tls-key", str(other_key)],
                       "do not load as a PEM certificate and its private key"),
    }
    encrypted = tmp_path / "encrypted-key.pem"  # a key behind a passphrase: an error, not a prompt
    encrypted.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cases["encrypted"] = (["--tls-cert", str(cert), "--tls-key", str(encrypted)], "do not load as a PEM certificate")
    for name, (flags, message) in cases.items():
        home = tmp_path / name
        result = su.run_cli(["serve", "--no-worker", "--host", "127.0.0.1", "--port", "0", *flags],
                            su.service_env(home, None))
        assert result.returncode == 2, (name, result.returncode, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
        assert "API key" not in result.stdout, name  # refused before anything started
